"""What a client can ask for: models and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.auth import AUTH_RESPONSES, require
from services.api.deps import SettingsDep, StoreDep
from shared.apikeys import Role
from shared.catalog import CATALOG
from shared.metrics import metric_registry
from shared.schemas import MetricRead, ModelRead

router = APIRouter(
    prefix="/v1", tags=["catalog"], dependencies=[Depends(require(Role.reader))], responses=AUTH_RESPONSES
)


@router.get("/models", response_model=list[ModelRead])
def list_models(settings: SettingsDep) -> list[ModelRead]:
    """The catalog, then the remote endpoints the operator configured (ENDPOINTS_FILE): their
    names, APIs, concurrency and prices, never their addresses or keys."""
    catalog = [
        ModelRead(
            name=entry.name,
            description=entry.description,
            source=entry.source,
            hub_id=entry.hub_id,
            available_offline=entry.packaged_path() is not None,
        )
        for entry in CATALOG.values()
    ]
    endpoints = [
        ModelRead(
            name=endpoint.name,
            description=f"Remote OpenAI-compatible endpoint ({endpoint.api} API); name a model it serves "
            f"as endpoint:{endpoint.name}/<model-id>.",
            source="endpoint",
            available_offline=False,
            model_format=f"endpoint:{endpoint.name}/<model-id>",
            api=endpoint.api,
            max_concurrency=endpoint.max_concurrency,
            price_per_1k_input=endpoint.price_per_1k_input,
            price_per_1k_output=endpoint.price_per_1k_output,
        )
        for endpoint in settings.endpoints.values()
    ]
    return catalog + endpoints


@router.get("/metrics", response_model=list[MetricRead])
def list_metrics(store: StoreDep) -> list[MetricRead]:
    return [
        MetricRead(
            name=info.name,
            description=info.description,
            group=info.group,
            greater_is_better=info.greater_is_better,
            needs_reference=info.needs_reference,
            needs_tokenizer=info.needs_tokenizer,
            needs_option=info.needs_option,
            needs_judge=info.needs_judge,
            offline=info.offline,
            default=info.default,
            custom=info.custom,
            scale=info.scale,
            min_value=info.min_value,
            max_value=info.max_value,
        )
        for info in metric_registry(store).values()
    ]

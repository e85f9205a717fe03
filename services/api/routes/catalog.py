"""What a client can ask for: models and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.api.auth import AUTH_RESPONSES, require
from services.api.deps import StoreDep
from shared.apikeys import Role
from shared.catalog import CATALOG
from shared.metrics import metric_registry
from shared.schemas import MetricRead, ModelRead

router = APIRouter(
    prefix="/v1", tags=["catalog"], dependencies=[Depends(require(Role.reader))], responses=AUTH_RESPONSES
)


@router.get("/models", response_model=list[ModelRead])
def list_models() -> list[ModelRead]:
    return [
        ModelRead(
            name=entry.name,
            description=entry.description,
            source=entry.source,
            hub_id=entry.hub_id,
            available_offline=entry.packaged_path() is not None,
        )
        for entry in CATALOG.values()
    ]


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
        for info in metric_registry(store.r, store.prefix).values()
    ]

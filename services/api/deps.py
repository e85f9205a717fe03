"""FastAPI dependencies: the process-wide settings, state store and queue publisher."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.api.queue import Publisher
from shared.settings import Settings
from shared.store import ComparisonStore


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> ComparisonStore:
    return request.app.state.store


def get_publisher(request: Request) -> Publisher:
    return request.app.state.publisher


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ComparisonStore, Depends(get_store)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]

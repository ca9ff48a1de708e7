"""Typed dependencies of the routers (``Annotated[..., Depends(...)]``).

All ``async def``: none of them blocks, and FastAPI runs a plain ``def`` dependency in its thread
pool, a thread hop per dependency per request that cost the event loop measurable CPU under load.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import validation_error
from app.inference import InferenceService, ModelRegistry
from app.metrics import Metrics
from app.settings import Settings


async def get_service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_registry(service: Annotated[InferenceService, Depends(get_service)]) -> ModelRegistry:
    """The loaded models; 503 NOT_READY while they are still loading."""
    return service.require_registry()


async def get_deadline(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    timeout_ms: Annotated[
        str | None,
        Header(
            alias="X-Request-Timeout-Ms",
            description="deadline in milliseconds from arrival; at most VISION_REQUEST_TIMEOUT_MS",
        ),
    ] = None,
) -> float:
    """The request's deadline on the event-loop clock: arrival + min(header, request_timeout_ms)."""
    budget = settings.request_timeout_ms
    if timeout_ms is not None:
        try:
            asked = int(timeout_ms)
        except ValueError:
            raise validation_error("header X-Request-Timeout-Ms must be whole milliseconds") from None
        if asked <= 0:
            raise validation_error("header X-Request-Timeout-Ms must be positive")
        budget = min(asked, budget)
    received_at = getattr(request.state, "received_at", None)
    start = received_at if received_at is not None else asyncio.get_running_loop().time()
    return float(start) + budget / 1000


ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
DeadlineDep = Annotated[float, Depends(get_deadline)]

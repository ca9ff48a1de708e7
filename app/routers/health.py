"""``/health/live``, ``/health/ready`` and ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.deps import MetricsDep, ServiceDep
from app.errors import RETRY_AFTER_SECONDS
from app.schemas import Status

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=Status)
async def live() -> JSONResponse:
    """200 while the process serves HTTP (even while models load or warm up)."""
    return JSONResponse({"status": "ok"})


@router.get("/health/ready", response_model=Status, responses={503: {"model": Status}})
async def ready(service: ServiceDep) -> JSONResponse:
    """200 once every model is loaded and warmed up; 503 with the reason before that and while draining."""
    if service.ready:
        return JSONResponse({"status": "ready"})
    reason = "draining: the server is shutting down" if service.draining else service.not_ready_reason
    return JSONResponse(
        {"status": "not_ready", "reason": reason},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


# load balancers that probe with HEAD get the same status (not listed in the OpenAPI document)
router.add_api_route("/health/live", live, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/health/ready", ready, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text exposition."""
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

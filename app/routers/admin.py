"""``POST /admin/models/reload``: reload the models file while serving (``app.reload``).

The route exists only when both ``VISION_API_KEYS`` and ``VISION_ADMIN_API_KEYS`` are set, and it
takes only an admin key (``app.auth``). The answer holds each serving process's report (one, or
one per ``VISION_WORKERS`` worker): 200 when the reload applied or found nothing to change; 422
``RELOAD_FAILED`` or ``RELOAD_REJECTED`` (a verification below its bound), with the reports, when
it changed nothing because something failed.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from app.deps import ServiceDep
from app.errors import error_response
from app.reload import overall, reload_everywhere
from app.schemas import ErrorBody, ReloadAnswer
from app.settings import Settings

router = APIRouter(prefix="/admin", tags=["admin"])

_FAILED = {"failed": "RELOAD_FAILED", "rejected": "RELOAD_REJECTED"}


@router.post(
    "/models/reload",
    response_model=ReloadAnswer,
    responses={
        401: {"model": ErrorBody, "description": "UNAUTHORIZED: no key, or an unknown one"},
        403: {"model": ErrorBody, "description": "FORBIDDEN: a key that is not an admin key"},
        422: {"description": "RELOAD_FAILED / RELOAD_REJECTED: nothing changed; the reports say why"},
    },
)
async def reload_models(request: Request, service: ServiceDep) -> JSONResponse:
    """Read the models file again: load, warm up and verify what changed, then swap it in."""
    reports = await reload_everywhere(service, "api")
    outcome = overall(reports)
    body = {"outcome": outcome, "reports": reports}
    if outcome in _FAILED:
        code = _FAILED[outcome]
        request.state.error_code = code
        message = "; ".join(str(r["error"]) for r in reports if r.get("error")) or outcome
        return error_response(422, code, message, request.state.request_id, extra=body)
    return JSONResponse(body)


def add_admin(app: FastAPI, settings: Settings) -> None:
    """The admin routes, where ``settings`` has admin keys (which need API keys: ``Settings``)."""
    if settings.admin_key_list:
        app.include_router(router)

"""The FastAPI application: ``create_app(settings)``.

The lifespan builds the :class:`~app.inference.InferenceService` and starts it: the models file is
loaded and every model warmed up in the background while ``/health/live`` answers and
``/health/ready`` says what it waits for (or, with ``VISION_WARM_BEFORE_LISTENING``, before the
lifespan lets the server listen). A failed start is kept in ``service.failure``: readiness shows
it and ``python -m app`` exits with it. Shutdown drains: queued images fail with 503 DRAINING.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import add_api_key_auth, add_cors
from app.errors import ApiError, error_response
from app.inference import InferenceService
from app.metrics import Metrics
from app.proxy import add_proxy_support
from app.reload import answer_after_start
from app.routers import admin, health, models, predict, render, ui, v2
from app.settings import Settings

log = logging.getLogger("app")
access_log = logging.getLogger("app.access")

#: A client's X-Request-ID is kept when it is printable ASCII and at most this long.
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_RE = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")

#: HTTP statuses Starlette raises itself, and our code for them.
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "BAD_REQUEST", 413: "PAYLOAD_TOO_LARGE"}


def create_app(settings: Settings) -> FastAPI:
    """Build the service for ``settings`` (the models of ``settings.models_file``)."""
    metrics = Metrics(settings.metrics_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = InferenceService(settings, metrics)
        app.state.service = service
        if settings.warm_before_listening:
            started = time.perf_counter()
            await service.start()
            log.info("models warmed up before serving in %.1f s", time.perf_counter() - started)
        else:
            service.start_in_background()
        service.in_background(answer_after_start(service))  # with VISION_WORKERS > 1 (app.reload)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="vision-serve",
        summary="VGG16 classification and SSD detection over HTTP",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(predict.router)
    app.include_router(v2.router)
    app.include_router(render.router)
    admin.add_admin(app, settings)  # POST /admin/models/reload, with admin keys only
    ui.add_ui(app, settings)  # the browser page at /, unless VISION_UI_ENABLED=false
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]  # Starlette types handlers loosely
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]  # as above
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]  # as above
    add_proxy_support(app)  # inside the key check: it sees paths without a proxy's prefix
    add_api_key_auth(app, settings)  # inside the request context: 401s get an id, a log line, metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    add_cors(app, settings)  # outermost: preflights pass, 401s carry the CORS headers
    return app


# -- errors -------------------------------------------------------------------------------------


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "")) or "-"


def _error_response(
    request: Request, status: int, code: str, message: str, headers: Mapping[str, str]
) -> JSONResponse:
    request.state.error_code = code
    return error_response(status, code, message, request_id_of(request), headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}.get(
        exc.status_code, str(exc.detail)
    )
    return _error_response(request, exc.status_code, code, message, exc.headers or {})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        where = f"{loc[0]} parameter '{'.'.join(loc[1:])}'" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return _error_response(request, 422, "VALIDATION_ERROR", "; ".join(parts) or "invalid request", {})


# -- request context ----------------------------------------------------------------------------


class RequestContextMiddleware:
    """Request id, the access-log line, request metrics, and the 500 answer of last resort.

    Pure ASGI (no body buffering). The request id is the client's ``X-Request-ID`` when it is
    printable and at most 128 characters, else a fresh UUID; it is on every response and every
    error body. An exception no handler took becomes 500 INTERNAL: traceback in the log, never in
    the body.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["received_at"] = asyncio.get_running_loop().time()
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers["Server-Timing"] = f"app;dur={(time.perf_counter() - start) * 1000:.1f}"
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            status = 500
            state["error_code"] = "INTERNAL"
            if not started:
                answer = error_response(500, "INTERNAL", "internal error; see the server log", request_id)
                await answer(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict[str, object], status: int, seconds: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        model = str(state.get("model") or "")
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.request_seconds.labels(endpoint, model, str(status)).observe(seconds)
        code = state.get("error_code")
        if code and status not in (404, 405):
            self.metrics.rejects.labels(str(code)).inc()
        access_log.info(
            "%s %s %d %.1fms id=%s%s%s",
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            state["request_id"],
            f" model={model}" if model else "",
            f" code={code}" if code else "",
        )


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = bytes(value).decode("latin-1")
            if _REQUEST_ID_RE.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex

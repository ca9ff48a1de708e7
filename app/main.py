"""The FastAPI application: ``create_app(settings, predictors=None)``.

Startup (the lifespan): with ``predictors`` given (``python -m app`` loads them before uvicorn
starts), serving begins at once and the warm-up runs in the background; without, the models file is
read and loaded in a worker thread first, also in the background. ``/health/live`` answers
throughout; ``/health/ready`` is 200 only after every model ran its warm-up forwards.
Shutdown marks the service draining (503 DRAINING), stops the batchers and the decode threads.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import add_api_key_auth, add_cors
from app.errors import ApiError, error_body
from app.metrics import Metrics
from app.models_file import read_models_file
from app.proxy import add_proxy_support
from app.routers import health, models, predict, render, ui, v2
from app.service import ServiceState, load_predictors, serve_models, warm_up
from app.settings import Settings
from models import Predictor

log = logging.getLogger("app")
access_log = logging.getLogger("app.access")

#: A client's X-Request-ID is kept when it is printable ASCII and at most this long.
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID_RE = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")

#: HTTP statuses Starlette raises itself, and our code for them.
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 400: "BAD_REQUEST", 413: "PAYLOAD_TOO_LARGE"}


def create_app(
    settings: Settings,
    predictors: Sequence[Predictor] | None = None,
    *,
    defaults: Mapping[str, str] | None = None,
    metrics: Metrics | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    warmed: bool = False,
) -> FastAPI:
    """Build the service.

    predictors: loaded models to serve (names from ``predictor.info.name``); None: load the models
        listed in ``settings.models_file`` during startup.
    defaults: task -> default model name (None: the first model of each task).
    metrics: a Metrics to record into (``python -m app`` passes the one holding the load times).
    on_fatal: called when loading or warm-up fails (``python -m app`` stops the server with it);
        the app itself keeps answering ``/health/ready`` 503 with the reason.
    warmed: the predictors already ran their warm-up (``app.service.warm_predictor``) before the
        app was built; they are ready as soon as the batchers start.
    """
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServiceState(
            settings=settings,
            metrics=metrics,
            decode_pool=ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode"),
        )
        app.state.service = state
        task = asyncio.get_running_loop().create_task(_start(state, predictors, defaults, on_fatal, warmed))
        state.background.append(task)
        try:
            yield
        finally:
            state.draining = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if state.registry is not None:
                await asyncio.gather(*(m.batcher.stop() for m in state.registry.models.values()))
            state.decode_pool.shutdown(wait=False, cancel_futures=True)
            log.info("stopped")

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
    ui.add_ui(app, settings)  # the browser page at /, unless VISION_UI_ENABLED=false
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    add_proxy_support(app)  # inside the key check: it sees paths without a proxy's prefix
    add_api_key_auth(app, settings)  # inside the request context: 401s get an id, a log line, metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    add_cors(app, settings)  # outermost: preflights pass, 401s carry the CORS headers
    return app


async def _start(
    state: ServiceState,
    predictors: Sequence[Predictor] | None,
    defaults: Mapping[str, str] | None,
    on_fatal: Callable[[BaseException], None] | None,
    warmed: bool = False,
) -> None:
    """Load (when needed), start the batchers, warm up; a failure leaves the reason in readiness."""
    settings = state.settings
    try:
        if predictors is None:
            state.not_ready_reason = f"loading the models in {settings.models_file}"
            models_file = await asyncio.to_thread(read_models_file, settings.models_file)
            predictors = await asyncio.to_thread(load_predictors, models_file, settings, state.metrics)
            defaults = models_file.defaults
        registry = serve_models(predictors, dict(defaults or {}), settings, state.metrics)
        for model in registry.models.values():
            model.batcher.start()
        state.registry = registry
        await warm_up(state, already_warm=warmed and predictors is not None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        state.not_ready_reason = f"startup failed: {exc}"
        log.error("startup failed: %s", exc, exc_info=exc)
        if on_fatal is not None:
            on_fatal(exc)


# -- errors -------------------------------------------------------------------------------------


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "")) or "-"


def _error_response(
    request: Request, status: int, code: str, message: str, headers: Mapping[str, str]
) -> JSONResponse:
    request.state.error_code = code
    return JSONResponse(
        error_body(code, message, request_id_of(request)), status_code=status, headers=dict(headers)
    )


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
                body = error_body("INTERNAL", "internal error; see the server log", request_id)
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
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

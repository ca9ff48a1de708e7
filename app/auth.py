"""Optional API keys and CORS, both from the settings.

API keys (``VISION_API_KEYS``, comma-separated; empty = off): every request must carry one of them
as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, else 401 ``UNAUTHORIZED`` with
``WWW-Authenticate: Bearer``. Several keys are accepted at once so that a key can be rotated
without downtime (add the new one, move the clients, drop the old one).

- The comparison takes the same time whichever key matches, or none: the presented key and each
  configured key are hashed with SHA-256 (so the lengths are equal and hide the keys' lengths), and
  ``hmac.compare_digest`` runs over every configured key with no early exit on a match.
- Always open: the health probes (``/health/*``, ``/v2/health/*``; orchestrators send no keys)
  and, while ``VISION_DOCS_ENABLED``, the docs pages (a browser loading ``/docs`` sends no key;
  turn the docs off to hide them), and while ``VISION_UI_ENABLED`` the page ``/`` and its files under
  ``/ui/`` (they hold no data; the page sends the key typed into it with its API calls).
  ``/metrics`` is open unless ``VISION_METRICS_PUBLIC=false``.
- The check runs inside the request-context middleware, so a 401 has its request id, its access
  log line and its ``vision_rejects_total{reason="UNAUTHORIZED"}``; and inside CORS, so a browser
  sees the CORS headers on a 401 too and preflight requests (which carry no key) pass.

CORS (``VISION_CORS_ORIGINS``; empty = no CORS headers): Starlette's ``CORSMiddleware`` with the
methods and headers of this API; no credentials (keys travel in headers, not cookies).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection, Sequence

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ApiError, error_response, unauthorized
from app.routers.ui import STATIC_DIR, UI_PREFIX
from app.settings import Settings

#: Paths open without a key whatever the settings (load balancer and orchestrator probes).
HEALTH_PATHS = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
METRICS_PATH = "/metrics"
#: Paths that take only an admin key (VISION_ADMIN_API_KEYS).
ADMIN_PREFIX = "/admin/"

#: Request headers a browser may send cross-origin, and response headers it may read.
CORS_REQUEST_HEADERS = (
    "Authorization",
    "Content-Type",
    "X-API-Key",
    "X-Request-ID",
    "X-Request-Timeout-Ms",
    "Inference-Header-Content-Length",
)
CORS_RESPONSE_HEADERS = (
    "X-Request-ID",
    "Retry-After",
    "WWW-Authenticate",
    "Inference-Header-Content-Length",
    "Server-Timing",
    "X-Model",
    "X-Model-Version",
    "X-Detections",
    "X-Predictions",
)


def public_paths(settings: Settings) -> frozenset[str]:
    """The paths that answer without a key under ``settings``."""
    paths = set(HEALTH_PATHS)
    if settings.docs_enabled:
        paths |= DOCS_PATHS
    if settings.metrics_public:
        paths.add(METRICS_PATH)
    if settings.ui_enabled:  # the page holds no data; its API calls carry the key typed into it
        paths |= ui_paths()
    return frozenset(paths)


def ui_paths() -> frozenset[str]:
    """``/`` and the page's static files (a browser's address bar sends no key)."""
    return frozenset({"/"} | {f"{UI_PREFIX}/{f.name}" for f in STATIC_DIR.iterdir() if f.is_file()})


class KeyRing:
    """The accepted keys, kept as SHA-256 digests; :meth:`accepts` runs in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys:
            raise ValueError("a KeyRing needs at least one key")
        self._digests = tuple(_digest(key.encode("utf-8")) for key in keys)

    def accepts(self, presented: bytes) -> bool:
        digest = _digest(presented)
        matched = False
        for known in self._digests:  # every key, always: no early exit that tells which matched
            matched |= hmac.compare_digest(digest, known)
        return matched


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def presented_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key of ``Authorization: Bearer <key>``, else of ``X-API-Key``, else None."""
    bearer: bytes | None = None
    api_key: bytes | None = None
    for name, value in headers:
        if name == b"authorization" and bearer is None:
            scheme, _, token = bytes(value).strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and api_key is None and value.strip():
            api_key = bytes(value).strip()
    return bearer if bearer is not None else api_key


class ApiKeyMiddleware:
    """Pure ASGI: refuses HTTP requests without a valid key (outside ``open_paths``) with 401; under
    :data:`ADMIN_PREFIX` only an admin key will do (403 for an ordinary one)."""

    def __init__(
        self, app: ASGIApp, keys: Sequence[str], open_paths: Collection[str], admin_keys: Sequence[str] = ()
    ) -> None:
        self.app = app
        self.ring = KeyRing(keys)
        self.admin_ring = KeyRing(admin_keys) if admin_keys else None
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        key = presented_key(scope["headers"])
        admin = self.admin_ring is not None and scope["path"].startswith(ADMIN_PREFIX)
        ring = self.admin_ring if admin else self.ring
        if key is not None and ring is not None and ring.accepts(key):
            await self.app(scope, receive, send)
            return
        if key is None:
            error = unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
        elif admin and self.ring.accepts(key):
            error = ApiError(403, "FORBIDDEN", f"{ADMIN_PREFIX} needs a key of VISION_ADMIN_API_KEYS")
        else:
            error = unauthorized("invalid API key")
        state = scope.setdefault("state", {})
        state["error_code"] = error.code
        request_id = str(state.get("request_id") or "-")
        response = error_response(error.status_code, error.code, error.message, request_id, error.headers)
        await response(scope, receive, send)


def add_api_key_auth(app: FastAPI, settings: Settings) -> None:
    """Install :class:`ApiKeyMiddleware` when ``settings`` has keys (call before the request-context
    middleware is added, so that it runs inside it)."""
    keys = settings.api_key_list
    if keys:
        app.add_middleware(
            ApiKeyMiddleware,
            keys=keys,
            open_paths=public_paths(settings),
            admin_keys=settings.admin_key_list,
        )


def add_cors(app: FastAPI, settings: Settings) -> None:
    """Install Starlette's CORSMiddleware when ``settings`` lists origins (call last: outermost)."""
    origins = settings.cors_origin_list
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "HEAD", "POST", "OPTIONS"],
            allow_headers=list(CORS_REQUEST_HEADERS),
            expose_headers=list(CORS_RESPONSE_HEADERS),
            allow_credentials=False,
            max_age=600,
        )

"""A path prefix taken from a reverse proxy in front of the service (``deploy/nginx``, an ingress).

A proxy that serves the service under a prefix and strips it (nginx ``location /vision/``,
Traefik's StripPrefix, ingress-nginx's ``x-forwarded-prefix``) names the prefix in
``X-Forwarded-Prefix``. It becomes the request's ASGI ``root_path``, so ``/docs`` loads
``<prefix>/openapi.json`` and the OpenAPI ``servers`` list names ``<prefix>``. Only a plain path is
taken (segments of letters, digits and ``._~-``, not ``.`` or ``..``); anything else is ignored,
so a client that sets the header itself can only misdirect its own docs page. (What the service
tells a proxy is ``app.errors.ERROR_CODE_HEADER`` on every error answer.)
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX_HEADER = "X-Forwarded-Prefix"

_PREFIX_RE = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")
_MAX_PREFIX_LENGTH = 256
_CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: Error bodies are a few hundred bytes; a longer one is passed on without the header.
_MAX_ERROR_BODY = 64 * 1024


def forwarded_prefix(headers: list[tuple[bytes, bytes]]) -> str:
    """The prefix a proxy names in ``X-Forwarded-Prefix`` (without a trailing slash), or ``""``."""
    name = PREFIX_HEADER.lower().encode("latin-1")
    for key, value in headers:
        if key == name:
            text = value.decode("latin-1").strip().rstrip("/")
            if (
                len(text) <= _MAX_PREFIX_LENGTH
                and _PREFIX_RE.fullmatch(text)
                and not {".", ".."} & set(text.split("/"))
            ):
                return text
            return ""
    return ""


class ForwardedPrefixMiddleware:
    """Moves ``X-Forwarded-Prefix`` into ``root_path`` (and ``path``, which includes it in ASGI).

    The scope is changed in place, not copied: the middlewares outside read the matched route
    from this same dict after the call.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            prefix = forwarded_prefix(scope["headers"])
            if prefix:
                root = scope.get("root_path", "")
                path = scope["path"]
                rest = path[len(root) :] if root and path.startswith(root) else path
                scope["root_path"] = root + prefix
                scope["path"] = root + prefix + rest
                raw = scope.get("raw_path")
                if isinstance(raw, bytes):
                    raw_root = root.encode("latin-1")
                    raw_rest = raw[len(raw_root) :] if raw_root and raw.startswith(raw_root) else raw
                    scope["raw_path"] = raw_root + prefix.encode("latin-1") + raw_rest
        await self.app(scope, receive, send)


def add_proxy_support(app: FastAPI) -> None:
    """Install :class:`ForwardedPrefixMiddleware` on ``app``.

    Call it before the API-key middleware is added, so that it runs inside it: the key check
    then sees the path as the service serves it, without the proxy's prefix.
    """
    app.add_middleware(ForwardedPrefixMiddleware)

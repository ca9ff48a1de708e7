"""What the service tells, and takes from, a reverse proxy in front of it (``deploy/nginx``, an ingress).

- ``X-Forwarded-Prefix`` (request): a proxy that serves the service under a path prefix and strips
  it (nginx ``location /vision/``, Traefik's StripPrefix, ingress-nginx's ``x-forwarded-prefix``)
  names the prefix here. It becomes the request's ASGI ``root_path``, so ``/docs`` loads
  ``<prefix>/openapi.json`` and the OpenAPI ``servers`` list names ``<prefix>``. Only a plain path
  is taken (segments of letters, digits and ``._~-``, not ``.`` or ``..``); anything else is
  ignored, so a client that sets the header itself can only misdirect its own docs page.
- ``X-Error-Code`` (response): a JSON error answer repeats its body's ``code`` as a header. A proxy
  cannot read bodies, and must tell a replica that is draining or starting (``DRAINING``,
  ``NOT_READY``: take it out of rotation) from one that is full (``OVERLOADED``: a pool-wide
  overload must not empty the pool), all three being 503 with ``Retry-After``.
"""

from __future__ import annotations

import json
import re

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX_HEADER = "X-Forwarded-Prefix"
ERROR_CODE_HEADER = "X-Error-Code"

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


def error_code_of(body: bytes) -> str | None:
    """The ``code`` of a contract error body (``{"error", "code", "request_id"}``), if it is one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("code") if isinstance(parsed, dict) else None
    return code if isinstance(code, str) and _CODE_RE.fullmatch(code) else None


class ErrorCodeHeaderMiddleware:
    """Adds ``X-Error-Code: <code>`` to JSON error answers (status 400 and up).

    The start of such an answer is held until its body has arrived (error bodies are small and
    sent in one piece), then sent with the header.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = bytearray()

        async def send_with_code(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                content_type = MutableHeaders(scope=message).get("content-type", "")
                if message["status"] >= 400 and content_type.startswith("application/json"):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if more and len(body) <= _MAX_ERROR_BODY:
                    return
                code = None if more else error_code_of(bytes(body))
                if code is not None:
                    MutableHeaders(scope=held)[ERROR_CODE_HEADER] = code
                start, held = held, None
                await send(start)
                await send({"type": "http.response.body", "body": bytes(body), "more_body": more})
                return
            await send(message)

        await self.app(scope, receive, send_with_code)


def add_proxy_support(app: FastAPI) -> None:
    """Install both middlewares on ``app``.

    Call it before the API-key middleware is added, so that it runs inside it: the key check
    then sees the path as the service serves it, without the proxy's prefix.
    """
    app.add_middleware(ErrorCodeHeaderMiddleware)
    app.add_middleware(ForwardedPrefixMiddleware)

"""The service's error type and the JSON error body of the contract.

Every error answer is ``{"error": "<human message>", "code": "<CODE>", "request_id": "<id>"}``
(``docs/api.md``, "Errors"). Code raises :class:`ApiError` (or one of the helpers
below) anywhere in a request; the handlers in ``app.main`` turn it into that body.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

#: Seconds a client should wait before retrying a 503 (sent as ``Retry-After``).
RETRY_AFTER_SECONDS = 1
#: Every error answer repeats its body's ``code`` in this header: a proxy cannot read bodies, and
#: must tell a replica that is draining or starting (``DRAINING``, ``NOT_READY``: out of rotation)
#: from one that is full (``OVERLOADED``: a pool-wide overload must not empty the pool), all 503.
ERROR_CODE_HEADER = "X-Error-Code"


class ApiError(Exception):
    """An error with its HTTP status and contract code; ``message`` is shown to the client."""

    def __init__(
        self, status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        if status_code == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))


def invalid_image(message: str) -> ApiError:
    return ApiError(400, "INVALID_IMAGE", message)


def unauthorized(message: str) -> ApiError:
    """401 UNAUTHORIZED with the challenge clients expect (``WWW-Authenticate: Bearer``)."""
    return ApiError(401, "UNAUTHORIZED", message, {"WWW-Authenticate": 'Bearer realm="vision-serve"'})


def model_not_found(message: str) -> ApiError:
    return ApiError(404, "MODEL_NOT_FOUND", message)


def wrong_task(message: str) -> ApiError:
    return ApiError(409, "WRONG_TASK", message)


def payload_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "PAYLOAD_TOO_LARGE",
        f"request body is larger than the limit of {limit} bytes (VISION_MAX_BODY_BYTES)",
    )


def image_too_large(limit: int, size: tuple[int, int] | None = None, pixels: int | None = None) -> ApiError:
    """413 for an image over ``limit`` pixels; ``size`` (width, height) or just ``pixels`` when known."""
    if size is not None:
        what = f"image of {size[0]}x{size[1]} = {size[0] * size[1]} pixels"
    else:
        what = f"image of {pixels} pixels" if pixels is not None else "image"
    return ApiError(
        413, "IMAGE_TOO_LARGE", f"{what} is over the limit of {limit} pixels (VISION_MAX_IMAGE_PIXELS)"
    )


def too_many_files(limit: int) -> ApiError:
    return ApiError(413, "TOO_MANY_FILES", f"more than {limit} images in one request (VISION_MAX_FILES)")


def unsupported_media_type(message: str) -> ApiError:
    return ApiError(415, "UNSUPPORTED_MEDIA_TYPE", message)


def validation_error(message: str) -> ApiError:
    return ApiError(422, "VALIDATION_ERROR", message)


def overloaded(model: str) -> ApiError:
    return ApiError(503, "OVERLOADED", f"model '{model}' has too many images waiting; retry later")


def too_much_waiting(model: str, late_by_s: float) -> ApiError:
    """503 OVERLOADED for a request the queue would take past its deadline; Retry-After is about
    how long the queue needs to shrink enough (whole seconds, 1 to 60)."""
    retry_after = min(60, max(RETRY_AFTER_SECONDS, math.ceil(late_by_s)))
    return ApiError(
        503,
        "OVERLOADED",
        f"model '{model}' has more images waiting than this request's deadline allows; retry later",
        headers={"Retry-After": str(retry_after)},
    )


def not_ready(message: str) -> ApiError:
    return ApiError(503, "NOT_READY", message)


def draining() -> ApiError:
    return ApiError(503, "DRAINING", "the server is shutting down")


def deadline_exceeded() -> ApiError:
    return ApiError(504, "DEADLINE_EXCEEDED", "the request waited past its deadline")


def internal(message: str = "internal error; see the server log") -> ApiError:
    return ApiError(500, "INTERNAL", message)


def error_body(code: str, message: str, request_id: str) -> dict[str, str]:
    """The contract's error JSON."""
    return {"error": message, "code": code, "request_id": request_id}


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """An error answer: the contract's body (plus ``extra`` fields), ``headers``, and the code in
    :data:`ERROR_CODE_HEADER`."""
    body = {**error_body(code, message, request_id), **(extra or {})}
    return JSONResponse(body, status_code=status, headers={**(headers or {}), ERROR_CODE_HEADER: code})

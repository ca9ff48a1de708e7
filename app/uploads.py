"""Read the images of a POST body, in any of the contract's request forms, within the limits.

Forms (``docs/api.md``, "Request forms"):
- ``multipart/form-data`` with one or more ``file`` parts (order kept; other parts ignored);
- a raw body with ``Content-Type: image/<jpeg|png|webp|bmp|gif|tiff|...>`` (or ``application/octet-stream``);
- JSON ``{"image": "<base64>"}`` or ``{"images": ["<base64>", ...]}``; ``data:...;base64,`` URLs tolerated.

The body size is refused from ``Content-Length`` before anything is read and, without one, while
streaming (reading stops at the limit). The multipart parser runs on the chunks as they arrive, so a
request with too many files stops at file ``max_files + 1``. Nothing here decodes pixels.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import (
    ApiError,
    invalid_image,
    payload_too_large,
    too_many_files,
    unsupported_media_type,
    validation_error,
)
from app.images import IMAGE_SUBTYPES

if TYPE_CHECKING:  # python-multipart declares its callback TypedDict for type checkers only
    from python_multipart.multipart import MultipartCallbacks

#: The multipart part name that carries an image.
FILE_FIELD = "file"

_FORMS_HINT = (
    "send multipart/form-data with 'file' parts, a raw image body "
    "(Content-Type: image/jpeg, image/png, ...), "
    'or JSON {"image": "<base64>"} / {"images": [...]}'
)


async def read_uploads(request: Request, max_body_bytes: int, max_files: int) -> list[bytes]:
    """The raw bytes of each image in the request, in order (at least one).

    Raises ApiError: 413 PAYLOAD_TOO_LARGE / TOO_MANY_FILES, 415 UNSUPPORTED_MEDIA_TYPE,
    422 VALIDATION_ERROR (bad JSON, base64 or multipart), 400 INVALID_IMAGE (empty raw body).
    """
    chunks = body_chunks(request, max_body_bytes)
    media_type, options = parse_options_header(request.headers.get("content-type"))
    kind = media_type.decode("latin-1").lower()
    if kind == "multipart/form-data":
        boundary = options.get(b"boundary")
        if not boundary:
            raise validation_error("multipart/form-data without a boundary")
        return await _read_multipart(chunks, boundary, max_files)
    if kind == "application/json" or kind.endswith("+json"):
        return _read_json(await _collect(chunks), max_files)
    if kind.startswith("image/") or kind == "application/octet-stream":
        if kind.startswith("image/") and kind.removeprefix("image/") not in IMAGE_SUBTYPES:
            raise unsupported_media_type(f"Content-Type {kind} is not an accepted image type; {_FORMS_HINT}")
        body = await _collect(chunks)
        if not body:
            raise invalid_image("empty request body")
        return [body]
    shown = kind or "none"
    raise unsupported_media_type(f"Content-Type {shown} is not accepted; {_FORMS_HINT}")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (413 PAYLOAD_TOO_LARGE as in :func:`body_chunks`)."""
    return await _collect(body_chunks(request, limit))


def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks as they arrive. 413 PAYLOAD_TOO_LARGE when ``Content-Length`` declares more
    than ``limit`` bytes (raised here, before anything is read), or as soon as more arrived."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise validation_error("Content-Length is not a number") from None
        if size > limit:
            raise payload_too_large(limit)
    return _limited(request, limit)


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise payload_too_large(limit)
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise ApiError(400, "CLIENT_DISCONNECTED", "the client closed the connection mid-body") from None


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


class _FileParts:
    """python-multipart callbacks that keep the bytes of each ``file`` part, in order."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[bytes] = []
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = bytearray()
        self._value = bytearray()
        self._data = bytearray()
        self._is_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._data = bytearray()
        self._is_file = False

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition"))
        self._is_file = params.get(b"name") == FILE_FIELD.encode()
        if self._is_file and len(self.files) >= self.max_files:
            raise too_many_files(self.max_files)  # stop reading at file max_files + 1

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self._data.extend(data[start:end])

    def _part_end(self) -> None:
        if self._is_file:
            self.files.append(bytes(self._data))

    def _end(self) -> None:
        self.ended = True


async def _read_multipart(chunks: AsyncIterator[bytes], boundary: bytes, max_files: int) -> list[bytes]:
    """The ``file`` parts of a multipart body, in order, parsed as the chunks arrive."""
    parts = _FileParts(max_files)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise validation_error(f"malformed multipart body: {exc}") from None
    if not parts.ended:
        raise validation_error("malformed multipart body: it ends before the closing boundary")
    if not parts.files:
        raise validation_error(f"no '{FILE_FIELD}' part in the multipart body; {_FORMS_HINT}")
    return parts.files


def _read_json(body: bytes, max_files: int) -> list[bytes]:
    """``{"image": b64}`` or ``{"images": [b64, ...]}`` -> the decoded bytes."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise validation_error(f"body is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or ("image" in document) == ("images" in document):
        raise validation_error('JSON body must be an object with "image" (a string) or "images" (a list)')
    if "image" in document:
        encoded = [document["image"]]
        where = ["image"]
    else:
        encoded = document["images"]
        if not isinstance(encoded, list) or not encoded:
            raise validation_error('"images" must be a non-empty list of base64 strings')
        if len(encoded) > max_files:
            raise too_many_files(max_files)
        where = [f"images[{i}]" for i in range(len(encoded))]
    return [_b64decode(value, name) for value, name in zip(encoded, where, strict=True)]


def _b64decode(value: object, name: str) -> bytes:
    if not isinstance(value, str):
        raise validation_error(f"{name} must be a base64 string")
    text = value.strip()
    if text.startswith("data:"):  # data:image/png;base64,....
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise validation_error(f"{name}: a data: URL must be base64 (data:<type>;base64,<data>)")
    text = "".join(text.split())  # tolerate line-wrapped base64
    text = text.replace("-", "+").replace("_", "/")  # and the URL-safe alphabet
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise validation_error(f"{name} is not valid base64") from None
    if not data:
        raise invalid_image(f"{name} is an empty image")
    return data

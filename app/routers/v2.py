"""The Open Inference Protocol (KServe v2) subset, over HTTP/REST, so that the service runs under
KServe and standard v2 clients (e.g. ``tritonclient.http``) drive it.

Endpoints: ``GET /v2`` (server metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``,
``GET /v2/models/{name}`` (metadata), ``GET /v2/models/{name}/ready``,
``POST /v2/models/{name}/infer``; the ``/versions/1`` forms of the model paths too (each model has
one version, ``"1"``).

Input: one tensor named ``image``, datatype ``BYTES``, shape ``[N]`` (or ``[N, 1]``): the encoded
image files (JPEG, PNG, ...). In JSON, each element is the file in base64; with the binary tensor
data extension (header ``Inference-Header-Content-Length``, what ``tritonclient`` sends by
default) the elements are the raw bytes, each prefixed by its length as a little-endian uint32.
Request ``parameters`` are the v1 query parameters of the model's task (classify: ``top_k``;
detect: ``score_threshold``, ``iou_threshold``, ``max_detections``).

Output: typed tensors, row-major ``data`` in JSON (never binary), padded where images differ.
- classify: ``scores`` FP32 [N, K] (probabilities, descending), ``class_ids`` INT64 [N, K],
  ``labels`` BYTES [N, K] (K = top_k, at most the number of classes); ``image_size`` INT32 [N, 2].
- detect: ``boxes`` FP32 [N, D, 4] (x1, y1, x2, y2 in pixels of the image as displayed),
  ``scores`` FP32 [N, D], ``class_ids`` INT64 [N, D], ``labels`` BYTES [N, D],
  ``num_detections`` INT32 [N], ``image_size`` INT32 [N, 2] (width, height). D is the largest
  count in the request; row i holds ``num_detections[i]`` detections, then padding (boxes and
  scores 0, class_ids -1, labels "").
A request's ``outputs`` list picks and orders the tensors returned.

Same path as v1: the model's micro-batcher, the body/file/pixel limits, the deadline. Errors are
the service's JSON error body, whose ``error`` field is the v2 error message; malformed v2
requests are 400 ``INVALID_INPUT``, the rest keep the v1 statuses and codes.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app.deps import DeadlineDep, ServiceDep
from app.errors import RETRY_AFTER_SECONDS, ApiError, model_not_found, too_many_files
from app.inference import AnyModel, ImageResult, InferenceService, ServedClassifier, ServedDetector
from app.schemas import ERROR_RESPONSES
from app.uploads import read_body
from models import ClassifyOutput, DetectOutput, Task

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"])

#: The one version of every model.
MODEL_VERSION = "1"
INPUT_NAME = "image"
#: Request parameters that v2 clients set for the protocol itself; accepted and ignored.
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout", "headers"})

#: Each task's output tensors: name -> (datatype, shape).
OUTPUTS: dict[Task, dict[str, tuple[str, list[int]]]] = {
    "classify": {
        "scores": ("FP32", [-1, -1]),
        "class_ids": ("INT64", [-1, -1]),
        "labels": ("BYTES", [-1, -1]),
        "image_size": ("INT32", [-1, 2]),
    },
    "detect": {
        "boxes": ("FP32", [-1, -1, 4]),
        "scores": ("FP32", [-1, -1]),
        "class_ids": ("INT64", [-1, -1]),
        "labels": ("BYTES", [-1, -1]),
        "num_detections": ("INT32", [-1]),
        "image_size": ("INT32", [-1, 2]),
    },
}

Name = Annotated[str, Path(description="a served model's name")]
Version = Annotated[str, Path(description=f'the model version; every model has one: "{MODEL_VERSION}"')]


def invalid_input(message: str) -> ApiError:
    """400: a malformed v2 request (the v2 protocol's status for it)."""
    return ApiError(400, "INVALID_INPUT", message)


# -- health and metadata ------------------------------------------------------------------------


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """The server's name, version and protocol extensions."""
    return {"name": "vision-serve", "version": request.app.version, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """200 while the process serves HTTP."""
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "loading, warming up or draining"}})
async def ready(service: ServiceDep) -> JSONResponse:
    """200 once every model is warmed up; 503 before that and while draining (as /health/ready)."""
    if service.ready:
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _model(service: InferenceService, name: str, version: str | None) -> AnyModel:
    model = service.require_registry().get(name)
    if version is not None and version != MODEL_VERSION:
        raise model_not_found(f"model {name!r} has no version {version!r} (it has {MODEL_VERSION!r})")
    return model


def _metadata(model: AnyModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": [MODEL_VERSION],
        "platform": "pytorch",
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": name, "datatype": datatype, "shape": shape}
            for name, (datatype, shape) in OUTPUTS[model.task].items()
        ],
    }


@router.get("/models/{name}", responses=ERROR_RESPONSES)
async def model_metadata(service: ServiceDep, name: Name) -> dict[str, Any]:
    """The model's input and output tensors (all versions: there is one)."""
    return _metadata(_model(service, name, None))


@router.get("/models/{name}/versions/{version}", responses=ERROR_RESPONSES)
async def model_version_metadata(service: ServiceDep, name: Name, version: Version) -> dict[str, Any]:
    """The model's input and output tensors."""
    return _metadata(_model(service, name, version))


def _model_ready(service: InferenceService, model: AnyModel) -> JSONResponse:
    is_ready = model.ready and not service.draining
    body = {"name": model.name, "ready": is_ready}
    if is_ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


@router.get("/models/{name}/ready", responses=ERROR_RESPONSES)
async def model_ready(service: ServiceDep, name: Name) -> JSONResponse:
    """200 once the model is warmed up (and the server not draining), else 503."""
    return _model_ready(service, _model(service, name, None))


@router.get("/models/{name}/versions/{version}/ready", responses=ERROR_RESPONSES)
async def model_version_ready(service: ServiceDep, name: Name, version: Version) -> JSONResponse:
    """200 once the model is warmed up (and the server not draining), else 503."""
    return _model_ready(service, _model(service, name, version))


# -- inference ----------------------------------------------------------------------------------

_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"const": INPUT_NAME},
                                    "datatype": {"const": "BYTES"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "data": {"type": "array", "items": {"type": "string"}},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "example": {
                    "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [1], "data": ["<base64>"]}],
                    "parameters": {"top_k": 3},
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data extension (header Inference-Header-Content-Length)",
            },
        },
    }
}


@router.post("/models/{name}/infer", responses=ERROR_RESPONSES, openapi_extra=_INFER_BODY)
async def infer(request: Request, service: ServiceDep, deadline: DeadlineDep, name: Name) -> JSONResponse:
    """Run the model on a batch of encoded images (see the module docstring for the tensors)."""
    return await _infer(request, service, _model(service, name, None), deadline)


@router.post("/models/{name}/versions/{version}/infer", responses=ERROR_RESPONSES, openapi_extra=_INFER_BODY)
async def infer_version(
    request: Request, service: ServiceDep, deadline: DeadlineDep, name: Name, version: Version
) -> JSONResponse:
    """Run the model on a batch of encoded images (see the module docstring for the tensors)."""
    return await _infer(request, service, _model(service, name, version), deadline)


async def _infer(
    request: Request, service: InferenceService, model: AnyModel, deadline: float
) -> JSONResponse:
    request.state.model = model.name
    with service.admit(model):
        return await _answer(request, service, model, deadline)


async def _answer(
    request: Request, service: InferenceService, model: AnyModel, deadline: float
) -> JSONResponse:
    settings = service.settings
    body = await read_body(request, settings.max_body_bytes)
    document, images = parse_infer_request(
        body, request.headers.get("inference-header-content-length"), settings.max_files
    )
    parameters = _parameters(model, document.get("parameters"))
    wanted = _requested_outputs(model, document.get("outputs"))
    match model:
        case ServedClassifier():
            classified = await service.infer(model, images, model.options(parameters), deadline)
            tensors = classify_tensors(classified, model.labels)
        case ServedDetector():
            detected = await service.infer(model, images, model.options(parameters), deadline)
            tensors = detect_tensors(detected, model.labels)
    request_id = document.get("id")
    return JSONResponse(
        {
            "model_name": model.name,
            "model_version": MODEL_VERSION,
            "id": request_id if isinstance(request_id, str) else request.state.request_id,
            "outputs": [tensors[name] for name in wanted],
        },
        headers={"X-Model-Version": model.version.id},
    )


def parse_infer_request(
    body: bytes, header_length: str | None, max_files: int
) -> tuple[dict[str, Any], list[bytes]]:
    """The request's JSON document and the encoded images of its ``image`` input, in order.

    ``header_length``: the ``Inference-Header-Content-Length`` header (binary tensor data
    extension: the JSON is the body's first that many bytes, tensor bytes follow), or None.
    Raises 400 INVALID_INPUT on anything malformed, 413 TOO_MANY_FILES past ``max_files``.
    """
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise invalid_input("Inference-Header-Content-Length must be a byte count within the body")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        document = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid_input(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise invalid_input("the inference request must be a JSON object")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise invalid_input(f"'inputs' must hold exactly one tensor, named {INPUT_NAME!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise invalid_input(f"the input tensor must be named {INPUT_NAME!r}, not {tensor.get('name')!r}")
    if tensor.get("datatype") != "BYTES":
        raise invalid_input(f"input {INPUT_NAME!r} must be BYTES (encoded image files)")
    count = _element_count(tensor.get("shape"))
    if count > max_files:
        raise too_many_files(max_files)
    parameters = tensor.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise invalid_input(f"input {INPUT_NAME!r}: 'parameters' must be an object")
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise invalid_input(
                f"input {INPUT_NAME!r}: binary_data_size {size!r} does not match the {len(binary)} "
                "bytes after the JSON header"
            )
        images = _unpack_bytes(binary, count)
    else:
        if binary:
            raise invalid_input("binary data after the JSON header, but no input declares binary_data_size")
        images = _json_bytes(tensor.get("data"), count)
    for index, data in enumerate(images):
        if not data:
            raise invalid_input(f"image {index} is empty")
    return document, images


def _element_count(shape: object) -> int:
    """N from a shape [N] or [N, 1]."""
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
        or shape[0] < 1
    ):
        raise invalid_input(f"input {INPUT_NAME!r} must have shape [N] or [N, 1] with N >= 1, not {shape!r}")
    return int(shape[0])


def _unpack_bytes(binary: bytes, count: int) -> list[bytes]:
    """BYTES tensor, binary form: each element a little-endian uint32 length, then its bytes."""
    images: list[bytes] = []
    offset = 0
    for index in range(count):
        if offset + 4 > len(binary):
            raise invalid_input(f"binary BYTES tensor ends before element {index} of {count}")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise invalid_input(f"binary BYTES tensor: element {index} runs past the end of the data")
        images.append(binary[offset : offset + length])
        offset += length
    if offset != len(binary):
        raise invalid_input(
            f"binary BYTES tensor has {len(binary) - offset} bytes after its {count} elements"
        )
    return images


def _json_bytes(data: object, count: int) -> list[bytes]:
    """BYTES tensor, JSON form: base64 strings (flat, or nested one deep for shape [N, 1])."""
    if not isinstance(data, list):
        raise invalid_input(f"input {INPUT_NAME!r} needs 'data' (base64 strings) or binary data")
    flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
    if len(flat) != count:
        raise invalid_input(
            f"input {INPUT_NAME!r} has shape with {count} element(s) but {len(flat)} in 'data'"
        )
    images = []
    for index, item in enumerate(flat):
        if not isinstance(item, str):
            raise invalid_input(f"data[{index}] must be a base64 string")
        try:
            images.append(base64.b64decode("".join(item.split()), validate=True))
        except (binascii.Error, ValueError):
            raise invalid_input(f"data[{index}] is not valid base64") from None
    return images


def _parameters(model: AnyModel, parameters: object) -> BaseModel:
    """The request ``parameters`` as the model's task's parameters; protocol ones are ignored."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise invalid_input("'parameters' must be an object")
    allowed = list(model.parameters.model_fields)
    takes = f"a {model.task} model takes {', '.join(allowed)}"
    values = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise invalid_input(f"unknown parameter(s) {', '.join(unknown)} ({takes})")
    try:
        return model.parameters.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"parameter {'.'.join(str(p) for p in e['loc']) or '?'}: {e['msg']}" for e in exc.errors()
        )
        raise invalid_input(f"{problems} ({takes})") from None


def _requested_outputs(model: AnyModel, outputs: object) -> list[str]:
    """The output tensors to return, in order (all of them when the request names none)."""
    known = OUTPUTS[model.task]
    if outputs is None:
        return list(known)
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise invalid_input("'outputs' must be a list of objects with a 'name'")
    names = [o.get("name") for o in outputs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise invalid_input(f"unknown output(s) {unknown!r}; model {model.name!r} has {', '.join(known)}")
    return [str(n) for n in names]


# -- output tensors -----------------------------------------------------------------------------


def _tensor(name: str, datatype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def classify_tensors(
    results: Sequence[ImageResult[ClassifyOutput]], labels: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The classify output tensors of a batch (rows padded to the longest, should k differ)."""
    n = len(results)
    k = max((len(r.output.scores) for r in results), default=0)
    scores: list[float] = []
    class_ids: list[int] = []
    names: list[str] = []
    for result in results:
        ids = result.output.class_ids.tolist()
        pad = k - len(ids)
        scores += result.output.scores.float().tolist() + [0.0] * pad
        class_ids += ids + [-1] * pad
        names += [labels[i] for i in ids] + [""] * pad
    return {
        "scores": _tensor("scores", "FP32", [n, k], scores),
        "class_ids": _tensor("class_ids", "INT64", [n, k], class_ids),
        "labels": _tensor("labels", "BYTES", [n, k], names),
        "image_size": _image_size(results),
    }


def detect_tensors(
    results: Sequence[ImageResult[DetectOutput]], labels: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The detect output tensors of a batch, padded to the image with the most detections."""
    n = len(results)
    d = max((len(r.output.scores) for r in results), default=0)
    boxes: list[float] = []
    scores: list[float] = []
    class_ids: list[int] = []
    names: list[str] = []
    counts: list[int] = []
    for result in results:
        out = result.output
        ids = out.class_ids.tolist()
        pad = d - len(ids)
        counts.append(len(ids))
        boxes += [c for box in out.boxes.float().tolist() for c in box] + [0.0] * (4 * pad)
        scores += out.scores.float().tolist() + [0.0] * pad
        class_ids += ids + [-1] * pad
        names += [labels[i] for i in ids] + [""] * pad
    return {
        "boxes": _tensor("boxes", "FP32", [n, d, 4], boxes),
        "scores": _tensor("scores", "FP32", [n, d], scores),
        "class_ids": _tensor("class_ids", "INT64", [n, d], class_ids),
        "labels": _tensor("labels", "BYTES", [n, d], names),
        "num_detections": _tensor("num_detections", "INT32", [n], counts),
        "image_size": _image_size(results),
    }


def _image_size(results: Sequence[ImageResult[Any]]) -> dict[str, Any]:
    return _tensor("image_size", "INT32", [len(results), 2], [v for r in results for v in r.size])

"""``POST /v1/detect/render`` and ``POST /v1/classify/render``: the answer drawn on the image.

The same inputs, query parameters, defaults, limits and errors as ``/v1/detect`` and
``/v1/classify`` (the same code path: ``app.routers.predict.run_request``), for ONE image: a second
image is refused with 413 ``TOO_MANY_FILES``, as the batch limit is, and for the same reason (the
body holds more images than this endpoint takes; a multipart body stops being read at the second
``file`` part). The answer is the image as displayed (EXIF orientation applied) with the boxes or
the top-k drawn by ``app.render``: PNG, or JPEG when ``Accept`` prefers it; an ``Accept`` that
allows neither is 406 ``NOT_ACCEPTABLE``, checked before the body is read. Errors are the JSON
error body. Headers: ``X-Request-ID`` (as everywhere), ``X-Model``, and ``X-Detections`` or
``X-Predictions`` (how many were drawn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from PIL import Image
from pydantic import BaseModel

from app.deps import DeadlineDep, ServiceDep
from app.errors import ApiError
from app.inference import ImageResult, InferenceService, ServedModel
from app.render import (
    RENDER_TYPES,
    DrawnBox,
    DrawnLabel,
    draw_detections,
    draw_predictions,
    encode,
    negotiate,
)
from app.routers.predict import run_request
from app.schemas import ERROR_RESPONSES, IMAGE_REQUEST_BODY, ClassifyQuery, DetectQuery, ErrorBody
from models import ClassifyOptions, ClassifyOutput, DetectOutput, DetectParams

OptT = TypeVar("OptT", ClassifyOptions, DetectParams)
OutT = TypeVar("OutT", ClassifyOutput, DetectOutput)

router = APIRouter(tags=["render"])

_IMAGE_ANSWER: dict[int | str, dict[str, object]] = {
    200: {
        "content": {
            media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in RENDER_TYPES
        },
        "description": "the image as displayed, with the answer drawn (PNG unless Accept prefers JPEG)",
    },
    406: {"model": ErrorBody, "description": "NOT_ACCEPTABLE: Accept allows neither PNG nor JPEG"},
}
_POST: dict[str, Any] = {
    "openapi_extra": IMAGE_REQUEST_BODY,
    "responses": {**ERROR_RESPONSES, **_IMAGE_ANSWER},
    "response_class": Response,
}


@router.post("/v1/detect/render", **_POST)
async def detect_render(
    request: Request,
    service: ServiceDep,
    deadline: DeadlineDep,
    query: Annotated[DetectQuery, Query()],
) -> Response:
    """Detect objects in one image and return it with the boxes, labels and scores drawn.

    ``box_format`` and ``normalized`` are accepted (the query of ``/v1/detect``) and change nothing.
    """
    model = service.require_registry().detector(query.model)
    return await _render(request, service, model, query, deadline, draw_boxes, "X-Detections")


@router.post("/v1/classify/render", **_POST)
async def classify_render(
    request: Request,
    service: ServiceDep,
    deadline: DeadlineDep,
    query: Annotated[ClassifyQuery, Query()],
) -> Response:
    """Classify one image and return it with the top-k labels, scores and bars drawn."""
    model = service.require_registry().classifier(query.model)
    return await _render(request, service, model, query, deadline, draw_top_k, "X-Predictions")


def draw_boxes(image: Image.Image, output: DetectOutput, labels: Sequence[str]) -> Image.Image:
    boxes = [
        DrawnBox((box[0], box[1], box[2], box[3]), class_id, labels[class_id], score)
        for box, class_id, score in zip(
            output.boxes.float().tolist(), output.class_ids.tolist(), output.scores.tolist(), strict=True
        )
    ]
    return draw_detections(image, boxes)


def draw_top_k(image: Image.Image, output: ClassifyOutput, labels: Sequence[str]) -> Image.Image:
    top = [
        DrawnLabel(class_id, labels[class_id], score)
        for class_id, score in zip(output.class_ids.tolist(), output.scores.tolist(), strict=True)
    ]
    return draw_predictions(image, top)


async def _render(
    request: Request,
    service: InferenceService,
    model: ServedModel[OptT, OutT],
    parameters: BaseModel,
    deadline: float,
    draw: Callable[[Image.Image, OutT, Sequence[str]], Image.Image],
    count_header: str,
) -> Response:
    """Negotiate the type (406 first), run the one image, draw and encode in the decode threads."""
    media_type = _media_type(request)
    result = await _run_one(request, service, model, parameters, deadline)
    image, labels = result.image, model.labels
    assert image is not None  # kept by _run_one
    body = await service.run_cpu(lambda: encode(draw(image, result.output, labels), media_type))
    return _image_response(body, media_type, model, {count_header: str(len(result.output.scores))})


def _image_response(
    body: bytes, media_type: str, model: ServedModel[Any, Any], count: dict[str, str]
) -> Response:
    headers = {
        "X-Model": model.name,
        "X-Model-Version": model.version.id,
        **count,
        "Vary": "Accept",
        "Cache-Control": "no-store",
    }
    return Response(body, media_type=media_type, headers=headers)


def _media_type(request: Request) -> str:
    """PNG or JPEG by the ``Accept`` header; 406 NOT_ACCEPTABLE when it allows neither."""
    accept = request.headers.get("accept")
    media_type = negotiate(accept)
    if media_type is None:
        raise ApiError(
            406, "NOT_ACCEPTABLE", f"this endpoint answers image/png or image/jpeg; Accept was {accept!r}"
        )
    return media_type


async def _run_one(
    request: Request,
    service: InferenceService,
    model: ServedModel[OptT, OutT],
    parameters: BaseModel,
    deadline: float,
) -> ImageResult[OutT]:
    """The ``/v1`` request path for exactly one image, keeping the decoded image to draw on."""
    try:
        results = await run_request(
            request, service, model, parameters, deadline, max_files=1, keep_images=True
        )
    except ApiError as error:
        if error.code == "TOO_MANY_FILES":
            error.message = (
                "this endpoint draws one image per request; send one, or use the JSON endpoint for a batch"
            )
        raise
    return results[0]

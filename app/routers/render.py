"""``POST /v1/detect/render`` and ``POST /v1/classify/render``: the answer drawn on the image.

The same inputs, query parameters, defaults, limits and errors as ``/v1/detect`` and
``/v1/classify`` (the same code path: ``app.routers.predict.run_model``), for ONE image: a second
image is refused with 413 ``TOO_MANY_FILES``, as the batch limit is, and for the same reason (the
body holds more images than this endpoint takes; a multipart body stops being read at the second
``file`` part). The answer is the image as displayed (EXIF orientation applied) with the boxes or
the top-k drawn by ``app.render``: PNG, or JPEG when ``Accept`` prefers it; an ``Accept`` that
allows neither is 406 ``NOT_ACCEPTABLE``, checked before the body is read. Errors are the JSON
error body. Headers: ``X-Request-ID`` (as everywhere), ``X-Model``, and ``X-Detections`` or
``X-Predictions`` (how many were drawn).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.deps import DeadlineDep, RegistryDep, StateDep
from app.errors import ApiError
from app.render import (
    RENDER_TYPES,
    DrawnBox,
    DrawnLabel,
    draw_detections,
    draw_predictions,
    encode,
    negotiate,
)
from app.routers.predict import ClassifyByDefault, DetectByDefault, ModelRun, _probability, run_model
from app.schemas import ERROR_RESPONSES, IMAGE_REQUEST_BODY, ErrorBody
from app.service import ServedModel, ServiceState
from models import ClassifyOutput, DetectOutput

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
_POST = {
    "openapi_extra": IMAGE_REQUEST_BODY,
    "responses": {**ERROR_RESPONSES, **_IMAGE_ANSWER},
    "response_class": Response,
}


@router.post("/v1/detect/render", **_POST)  # type: ignore[arg-type]
async def detect_render(
    request: Request,
    state: StateDep,
    registry: RegistryDep,
    deadline: DeadlineDep,
    query: Annotated[DetectByDefault, Query()],
) -> Response:
    """Detect objects in one image and return it with the boxes, labels and scores drawn.

    ``box_format`` and ``normalized`` are accepted (the query of ``/v1/detect``) and change nothing.
    """
    return await _render(request, state, registry.for_task("detect", query.model), query, deadline)


@router.post("/v1/classify/render", **_POST)  # type: ignore[arg-type]
async def classify_render(
    request: Request,
    state: StateDep,
    registry: RegistryDep,
    deadline: DeadlineDep,
    query: Annotated[ClassifyByDefault, Query()],
) -> Response:
    """Classify one image and return it with the top-k labels, scores and bars drawn."""
    return await _render(request, state, registry.for_task("classify", query.model), query, deadline)


async def _render(
    request: Request,
    state: ServiceState,
    served: ServedModel,
    query: DetectByDefault | ClassifyByDefault,
    deadline: float,
) -> Response:
    """Negotiate the type (406 first), run the predict path on one image, draw, encode."""
    media_type = _media_type(request)
    run = await _run_one(request, state, served, query, deadline)
    image, output, labels = run.images[0], run.outputs[0], served.predictor.info.labels

    def draw() -> bytes:  # CPU work: in the decode threads, off the event loop
        if isinstance(output, DetectOutput):
            boxes = [
                DrawnBox((box[0], box[1], box[2], box[3]), class_id, labels[class_id], _probability(score))
                for box, class_id, score in zip(
                    output.boxes.float().tolist(),
                    output.class_ids.tolist(),
                    output.scores.tolist(),
                    strict=True,
                )
            ]
            return encode(draw_detections(image, boxes), media_type)
        assert isinstance(output, ClassifyOutput)
        top = [
            DrawnLabel(class_id, labels[class_id], _probability(score))
            for class_id, score in zip(output.class_ids.tolist(), output.scores.tolist(), strict=True)
        ]
        return encode(draw_predictions(image, top), media_type)

    body = await asyncio.get_running_loop().run_in_executor(state.decode_pool, draw)
    count = len(output.scores)
    return Response(
        body,
        media_type=media_type,
        headers={
            "X-Model": served.name,
            "X-Detections" if run.task == "detect" else "X-Predictions": str(count),
            "Vary": "Accept",
            "Cache-Control": "no-store",
        },
    )


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
    state: ServiceState,
    served: ServedModel,
    query: DetectByDefault | ClassifyByDefault,
    deadline: float,
) -> ModelRun:
    """The predict path for exactly one image, keeping the decoded image to draw on."""
    try:
        return await run_model(request, state, served, query, deadline, max_files=1, keep_images=True)
    except ApiError as error:
        if error.code == "TOO_MANY_FILES":
            error.message = (
                "this endpoint draws one image per request; send one, or use the JSON endpoint for a batch"
            )
        raise

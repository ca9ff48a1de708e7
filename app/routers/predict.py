"""``POST /v1/classify``, ``POST /v1/detect`` and ``POST /v1/models/{name}/predict``.

Each route resolves its model (404 / 409), reads the request's images in any of the contract's
forms (:func:`run_request`), runs the inference core and writes the contract's JSON: one result
per image, in order.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.deps import DeadlineDep, ServiceDep
from app.errors import validation_error
from app.inference import ImageResult, InferenceService, ServedClassifier, ServedDetector, ServedModel
from app.schemas import (
    ERROR_RESPONSES,
    IMAGE_REQUEST_BODY,
    PREDICT_FIELDS,
    BoxFormat,
    BoxPresentation,
    ClassifyQuery,
    ClassifyResponse,
    DetectQuery,
    DetectResponse,
    PredictQuery,
)
from app.uploads import read_uploads
from models import ClassifyOptions, ClassifyOutput, DetectOutput, DetectParams

router = APIRouter(tags=["predict"])

OptT = TypeVar("OptT", ClassifyOptions, DetectParams)
OutT = TypeVar("OutT", ClassifyOutput, DetectOutput)

_POST: dict[str, Any] = {"openapi_extra": IMAGE_REQUEST_BODY, "responses": ERROR_RESPONSES}


@router.post("/v1/classify", response_model=ClassifyResponse, **_POST)
async def classify(
    request: Request,
    service: ServiceDep,
    deadline: DeadlineDep,
    query: Annotated[ClassifyQuery, Query()],
) -> JSONResponse:
    """Classify each image with the default classifier (or ``?model=NAME``)."""
    model = service.require_registry().classifier(query.model)
    results = await run_request(request, service, model, query, deadline)
    return answer(classify_body(request, model, results), model)


@router.post("/v1/detect", response_model=DetectResponse, **_POST)
async def detect(
    request: Request,
    service: ServiceDep,
    deadline: DeadlineDep,
    query: Annotated[DetectQuery, Query()],
) -> JSONResponse:
    """Detect objects in each image with the default detector (or ``?model=NAME``)."""
    model = service.require_registry().detector(query.model)
    results = await run_request(request, service, model, query, deadline)
    return answer(detect_body(request, model, results, query), model)


@router.post("/v1/models/{name}/predict", response_model=ClassifyResponse | DetectResponse, **_POST)
async def predict(
    request: Request,
    service: ServiceDep,
    deadline: DeadlineDep,
    name: Annotated[str, Path(description="a served model's name")],
    query: Annotated[PredictQuery, Query()],
) -> JSONResponse:
    """Run the named model's own task (classify or detect) on each image."""
    model = service.require_registry().get(name)
    misplaced = sorted(query.model_fields_set - PREDICT_FIELDS[model.task])
    if misplaced:
        raise validation_error(
            f"query parameter(s) {', '.join(misplaced)} do not apply to a {model.task} model"
        )
    match model:
        case ServedClassifier():
            results = await run_request(request, service, model, query, deadline)
            return answer(classify_body(request, model, results), model)
        case ServedDetector():
            detections = await run_request(request, service, model, query, deadline)
            return answer(detect_body(request, model, detections, query), model)


async def run_request(
    request: Request,
    service: InferenceService,
    model: ServedModel[OptT, OutT],
    parameters: BaseModel,
    deadline: float,
    *,
    max_files: int | None = None,
    keep_images: bool = False,
) -> list[ImageResult[OutT]]:
    """The ``/v1`` request path: check that ``model`` serves (503) and hold it, read the request's
    images (at most ``max_files``, default the setting), then the inference core with the
    request's options (``parameters`` over the model's defaults). Call it right after the registry
    lookup that gave ``model`` (``InferenceService.admit``)."""
    request.state.model = model.name
    with service.admit(model):
        settings = service.settings
        images = await read_uploads(request, settings.max_body_bytes, max_files or settings.max_files)
        return await service.infer(
            model, images, model.options(parameters), deadline, keep_images=keep_images
        )


def answer(body: dict[str, Any], model: ServedModel[Any, Any]) -> JSONResponse:
    """The JSON answer, with the version that computed it in ``X-Model-Version``."""
    return JSONResponse(body, headers={"X-Model-Version": model.version.id})


def classify_body(
    request: Request, model: ServedClassifier, results: list[ImageResult[ClassifyOutput]]
) -> dict[str, Any]:
    """The contract's classification answer (``ClassifyResponse``)."""
    labels = model.labels
    return {
        "request_id": request.state.request_id,
        "model": model.name,
        "model_version": model.version.id,
        "results": [
            {
                "index": index,
                "image": {"width": result.size[0], "height": result.size[1]},
                "predictions": [
                    {"label": labels[class_id], "class_id": class_id, "score": score}
                    for class_id, score in zip(
                        result.output.class_ids.tolist(), result.output.scores.tolist(), strict=True
                    )
                ],
            }
            for index, result in enumerate(results)
        ],
    }


def detect_body(
    request: Request,
    model: ServedDetector,
    results: list[ImageResult[DetectOutput]],
    presentation: BoxPresentation,
) -> dict[str, Any]:
    """The contract's detection answer (``DetectResponse``), boxes as ``presentation`` asks."""
    labels = model.labels
    box_format, normalized = presentation.box_format, presentation.normalized
    answers = []
    for index, result in enumerate(results):
        width, height = result.size
        detections = []
        out = result.output
        for box, score, class_id in zip(
            out.boxes.float().tolist(), out.scores.tolist(), out.class_ids.tolist(), strict=True
        ):
            detection: dict[str, Any] = {
                "label": labels[class_id],
                "class_id": class_id,
                "score": score,
                "box": format_box(box, box_format),
            }
            if normalized:
                x1, y1, x2, y2 = box
                detection["box_normalized"] = format_box(
                    [x1 / width, y1 / height, x2 / width, y2 / height], box_format
                )
            detections.append(detection)
        answers.append(
            {"index": index, "image": {"width": width, "height": height}, "detections": detections}
        )
    return {
        "request_id": request.state.request_id,
        "model": model.name,
        "model_version": model.version.id,
        "results": answers,
    }


def format_box(box: list[float], box_format: BoxFormat) -> dict[str, float]:
    """[x1, y1, x2, y2] -> the JSON object of ``box_format``."""
    x1, y1, x2, y2 = box
    if box_format == "xyxy":
        return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
    if box_format == "xywh":
        return {"x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1}
    return {"cx": (x1 + x2) / 2, "cy": (y1 + y2) / 2, "w": x2 - x1, "h": y2 - y1}

"""``POST /v1/classify``, ``POST /v1/detect`` and ``POST /v1/models/{name}/predict``.

Each request: resolve the model (404 / 409), check it serves (503), read the images (limits,
request forms: ``app.uploads``), reserve queue room (503 OVERLOADED), decode + preprocess in the
decode threads (``app.images``), then the model's micro-batcher; one result per image, in order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NamedTuple

import torch
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from app.deps import DeadlineDep, RegistryDep, StateDep
from app.errors import ApiError, deadline_exceeded, validation_error
from app.images import JpegUpload, decode_image, probe_jpeg
from app.schemas import ERROR_RESPONSES, IMAGE_REQUEST_BODY, ClassifyResponse, DetectResponse
from app.service import ServedModel, ServiceState
from app.uploads import read_uploads
from models import ClassifyOutput, DetectOutput, DetectParams

router = APIRouter(tags=["predict"])

#: Contract defaults (``docs/api.md``, "Query parameters") when neither the request
#: nor the model's entry in the models file sets them.
DEFAULT_TOP_K = 5
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100

BoxFormat = Literal["xyxy", "cxcywh", "xywh"]


class ClassifyQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(
        None, ge=1, le=1000, description="predictions per image (default 5 or the model's)"
    )


class DetectQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score_threshold: float | None = Field(None, ge=0, le=1, description="default 0.5 or the model's")
    iou_threshold: float | None = Field(None, gt=0, le=1, description="NMS IoU (default: the model's)")
    max_detections: int | None = Field(None, ge=1, le=10_000, description="per image (default 100)")
    normalized: bool = Field(False, description="add box_normalized: the box divided by width/height")
    box_format: BoxFormat = Field(
        "xyxy", description="xyxy {x1,y1,x2,y2}, cxcywh {cx,cy,w,h}, xywh {x,y,w,h}"
    )


class ClassifyByDefault(ClassifyQuery):
    model: str | None = Field(None, description="a classifier's name (default: the default classifier)")


class DetectByDefault(DetectQuery):
    model: str | None = Field(None, description="a detector's name (default: the default detector)")


class PredictQuery(ClassifyQuery, DetectQuery):
    """Parameters of either task; those of the other task are refused (422)."""


_POST = {"openapi_extra": IMAGE_REQUEST_BODY, "responses": ERROR_RESPONSES}


@router.post("/v1/classify", response_model=ClassifyResponse, **_POST)  # type: ignore[arg-type]
async def classify(
    request: Request,
    state: StateDep,
    registry: RegistryDep,
    deadline: DeadlineDep,
    query: Annotated[ClassifyByDefault, Query()],
) -> JSONResponse:
    """Classify each image with the default classifier (or ``?model=NAME``)."""
    served = registry.for_task("classify", query.model)
    return await _serve(request, state, served, query, deadline)


@router.post("/v1/detect", response_model=DetectResponse, **_POST)  # type: ignore[arg-type]
async def detect(
    request: Request,
    state: StateDep,
    registry: RegistryDep,
    deadline: DeadlineDep,
    query: Annotated[DetectByDefault, Query()],
) -> JSONResponse:
    """Detect objects in each image with the default detector (or ``?model=NAME``)."""
    served = registry.for_task("detect", query.model)
    return await _serve(request, state, served, query, deadline)


@router.post(
    "/v1/models/{name}/predict",
    response_model=ClassifyResponse | DetectResponse,
    **_POST,  # type: ignore[arg-type]
)
async def predict(
    request: Request,
    state: StateDep,
    registry: RegistryDep,
    deadline: DeadlineDep,
    name: Annotated[str, Path(description="a served model's name")],
    query: Annotated[PredictQuery, Query()],
) -> JSONResponse:
    """Run the named model's own task (classify or detect) on each image."""
    served = registry.get(name)
    other = DetectQuery if served.task == "classify" else ClassifyQuery
    misplaced = sorted(set(query.model_fields_set) & set(other.model_fields))
    if misplaced:
        raise validation_error(
            f"query parameter(s) {', '.join(misplaced)} do not apply to a {served.task} model"
        )
    return await _serve(request, state, served, query, deadline)


async def _serve(
    request: Request, state: ServiceState, served: ServedModel, query: BaseModel, deadline: float
) -> JSONResponse:
    run = await run_model(request, state, served, query, deadline)
    results: list[dict[str, Any]]
    if run.task == "classify":
        results = [_classify_result(i, run.sizes[i], out, served) for i, out in enumerate(run.outputs)]
    else:
        assert isinstance(query, DetectQuery)
        results = [
            _detect_result(i, run.sizes[i], out, served, query.box_format, query.normalized)
            for i, out in enumerate(run.outputs)
        ]
    body = {"request_id": request.state.request_id, "model": served.name, "results": results}
    return JSONResponse(body)


@dataclass
class ModelRun:
    """One request's images through a model: outputs, displayed sizes, and the decoded images
    (only when asked: ``keep_images``)."""

    task: Literal["classify", "detect"]
    outputs: list[Any]  # ClassifyOutput or DetectOutput, one per image, in order
    sizes: list[tuple[int, int]]  # (width, height) as displayed
    images: list[Image.Image] = field(default_factory=list)


async def run_model(
    request: Request,
    state: ServiceState,
    served: ServedModel,
    query: BaseModel,
    deadline: float,
    *,
    max_files: int | None = None,
    keep_images: bool = False,
) -> ModelRun:
    """The predict path every POST shares: serving check, uploads (at most ``max_files``, default
    the setting), metrics, queue reservation, decode + preprocess, deadline, the model's batcher."""
    request.state.model = served.name
    state.check_serving(served)
    settings = state.settings
    uploads = await read_uploads(request, settings.max_body_bytes, max_files or settings.max_files)
    state.metrics.images_per_request.labels(served.name).observe(len(uploads))
    with served.batcher.reserve(len(uploads)) as ticket:
        decoded = await _decode_each(state, served, uploads, keep_images)
        if asyncio.get_running_loop().time() >= deadline:
            raise deadline_exceeded()
        sizes = [d.size for d in decoded]
        images = [d.image for d in decoded if d.image is not None]
        if isinstance(query, ClassifyQuery) and served.task == "classify":
            top_k = query.top_k or _default(served, "top_k", DEFAULT_TOP_K)
            outputs = await served.batcher.submit([(d.tensor, top_k) for d in decoded], deadline, ticket)
            return ModelRun("classify", list(outputs), sizes, images)
        assert isinstance(query, DetectQuery)
        params = _detect_params(query, served)
        items = [(d.tensor, d.size, params) for d in decoded]
        outputs = await served.batcher.submit(items, deadline, ticket)
        return ModelRun("detect", list(outputs), sizes, images)


def _detect_params(query: DetectQuery, served: ServedModel) -> DetectParams:
    """Request values, else the model's defaults, else the contract's."""
    score = query.score_threshold
    iou = query.iou_threshold
    return DetectParams(
        score_threshold=score
        if score is not None
        else _default(served, "score_threshold", DEFAULT_SCORE_THRESHOLD),
        iou_threshold=iou if iou is not None else _default(served, "iou_threshold", None),
        max_detections=query.max_detections or _default(served, "max_detections", DEFAULT_MAX_DETECTIONS),
    )


def _default(served: ServedModel, key: str, fallback: Any) -> Any:
    """The model's own default for ``key`` (models file / checkpoint), else the contract's."""
    value = served.predictor.info.defaults.get(key)
    return fallback if value is None else value


class _Decoded(NamedTuple):
    tensor: torch.Tensor | JpegUpload  # the model's input, or a JPEG its device decodes in the batch
    size: tuple[int, int]  # (width, height) as displayed
    image: Image.Image | None  # the decoded RGB image, when kept


async def _decode_all(
    state: ServiceState, served: ServedModel, uploads: list[bytes]
) -> list[tuple[torch.Tensor | JpegUpload, tuple[int, int]]]:
    """Decode + preprocess every upload in the decode threads (or, with VISION_JPEG_DECODE on the
    device, read JPEG headers only); the first failure (by index) is raised."""
    return [(d.tensor, d.size) for d in await _decode_each(state, served, uploads, keep_images=False)]


async def _decode_each(
    state: ServiceState, served: ServedModel, uploads: list[bytes], keep_images: bool
) -> list[_Decoded]:
    """:func:`_decode_all`, optionally keeping each decoded image."""
    loop = asyncio.get_running_loop()
    max_pixels = state.settings.max_image_pixels
    predictor = served.predictor
    on_device = state.settings.jpeg_on_device and not keep_images

    def probe(index: int, data: bytes) -> _Decoded | None:
        """Header checks only: the JPEG is decoded in the batch, on the model's device."""
        found = probe_jpeg(data, max_pixels)
        if found is None or not predictor.tensor_path_ok(*found.size):
            return None
        label = f"image {index}: " if len(uploads) > 1 else ""
        return _Decoded(found._replace(label=label), found.size, None)

    def work(index: int, data: bytes) -> _Decoded:
        image = decode_image(data, max_pixels)
        return _Decoded(predictor.preprocess(image), image.size, image if keep_images else None)

    # A header probe takes microseconds: it runs here, on the event loop, where a hop to the
    # decode pool would cost more than it saves. Only full decodes go to the pool.
    done: list[_Decoded | BaseException | None] = [None] * len(uploads)
    jobs: dict[int, asyncio.Future[_Decoded]] = {}
    for index, data in enumerate(uploads):
        if on_device:
            try:
                done[index] = probe(index, data)
            except ApiError as exc:
                done[index] = exc
                break  # no later image can be the first failure
            if done[index] is not None:
                continue
        jobs[index] = loop.run_in_executor(state.decode_pool, work, index, data)
    if jobs:
        finished = await asyncio.gather(*jobs.values(), return_exceptions=True)
        for index, item in zip(jobs, finished, strict=True):
            done[index] = item
    for index, item in enumerate(done):
        if isinstance(item, ApiError):
            if len(uploads) > 1:
                item.message = f"image {index}: {item.message}"
            raise item
        if isinstance(item, BaseException):
            raise item
    return done  # type: ignore[return-value]


def _classify_result(
    index: int, size: tuple[int, int], out: ClassifyOutput, served: ServedModel
) -> dict[str, Any]:
    labels = served.predictor.info.labels
    predictions = [
        {"label": labels[class_id], "class_id": class_id, "score": _probability(score)}
        for class_id, score in zip(out.class_ids.tolist(), out.scores.tolist(), strict=True)
    ]
    return {"index": index, "image": {"width": size[0], "height": size[1]}, "predictions": predictions}


def _detect_result(
    index: int,
    size: tuple[int, int],
    out: DetectOutput,
    served: ServedModel,
    box_format: BoxFormat,
    normalized: bool,
) -> dict[str, Any]:
    labels = served.predictor.info.labels
    width, height = size
    detections = []
    for box, score, class_id in zip(
        out.boxes.float().tolist(), out.scores.tolist(), out.class_ids.tolist(), strict=True
    ):
        detection: dict[str, Any] = {
            "label": labels[class_id],
            "class_id": class_id,
            "score": _probability(score),
            "box": format_box(box, box_format),
        }
        if normalized:
            x1, y1, x2, y2 = box
            detection["box_normalized"] = format_box(
                [x1 / width, y1 / height, x2 / width, y2 / height], box_format
            )
        detections.append(detection)
    return {"index": index, "image": {"width": width, "height": height}, "detections": detections}


def format_box(box: list[float], box_format: BoxFormat) -> dict[str, float]:
    """[x1, y1, x2, y2] -> the JSON object of ``box_format``."""
    x1, y1, x2, y2 = box
    if box_format == "xyxy":
        return {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
    if box_format == "xywh":
        return {"x": x1, "y": y1, "w": x2 - x1, "h": y2 - y1}
    return {"cx": (x1 + x2) / 2, "cy": (y1 + y2) / 2, "w": x2 - x1, "h": y2 - y1}


def _probability(score: float) -> float:
    return min(1.0, max(0.0, float(score)))  # low-precision softmax can overshoot 1 by an ulp

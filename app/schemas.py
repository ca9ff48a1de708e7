"""The request parameters and response shapes of the contract (``docs/api.md``).

Each request parameter's limits are declared once here (``TopK``, ``ScoreThreshold``, ...) and
reused by the routes' query models, the ``/v2`` inference parameters and the models file; the
defaults come from ``models.ClassifyOptions`` and ``models.DetectParams``. The response models
describe what the routes answer (the routes build the JSON themselves, for speed; the API tests
validate every answer against these models, whose ``extra="forbid"`` catches a stray field).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.settings import Runtime
from models import ClassifyOptions, DetectParams

# -- request parameters: limits declared once ---------------------------------------------------

TopK = Annotated[
    int,
    Field(
        ge=1, le=1000, description=f"predictions per image (default {ClassifyOptions.top_k} or the model's)"
    ),
]
ScoreThreshold = Annotated[
    float,
    Field(ge=0, le=1, description=f"lowest score (default {DetectParams.score_threshold} or the model's)"),
]
IouThreshold = Annotated[float, Field(gt=0, le=1, description="NMS IoU threshold (default: the model's)")]
MaxDetections = Annotated[
    int,
    Field(ge=1, le=10_000, description=f"per image (default {DetectParams.max_detections} or the model's)"),
]
BoxFormat = Literal["xyxy", "cxcywh", "xywh"]


class ClassifyParameters(BaseModel):
    """A classifier's per-request options; None: not sent (the model's default applies)."""

    model_config = ConfigDict(extra="forbid")

    top_k: TopK | None = None


class DetectParameters(BaseModel):
    """A detector's per-request options; None: not sent (the model's default applies)."""

    model_config = ConfigDict(extra="forbid")

    score_threshold: ScoreThreshold | None = None
    iou_threshold: IouThreshold | None = None
    max_detections: MaxDetections | None = None


class BoxPresentation(BaseModel):
    """How ``/v1`` detection answers write boxes."""

    normalized: bool = Field(False, description="add box_normalized: the box divided by width/height")
    box_format: BoxFormat = Field(
        "xyxy", description="xyxy {x1,y1,x2,y2}, cxcywh {cx,cy,w,h}, xywh {x,y,w,h}"
    )


class ClassifyQuery(ClassifyParameters):
    """``/v1/classify`` and ``/v1/classify/render``."""

    model: str | None = Field(None, description="a classifier's name (default: the default classifier)")


class DetectQuery(DetectParameters, BoxPresentation):
    """``/v1/detect`` and ``/v1/detect/render``."""

    model: str | None = Field(None, description="a detector's name (default: the default detector)")


class PredictQuery(ClassifyParameters, DetectParameters, BoxPresentation):
    """``/v1/models/{name}/predict``: the parameters of either task; the other task's are refused."""


#: The query parameters each task takes on ``/v1/models/{name}/predict``.
PREDICT_FIELDS: dict[str, frozenset[str]] = {
    "classify": frozenset(ClassifyParameters.model_fields),
    "detect": frozenset(DetectParameters.model_fields) | frozenset(BoxPresentation.model_fields),
}


# -- responses ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Strict):
    error: str = Field(description="what went wrong, for people")
    code: str = Field(description="machine-readable code, e.g. INVALID_IMAGE")
    request_id: str


class Status(_Strict):
    status: Literal["ok", "ready", "not_ready"]
    reason: str | None = None


class ImageSize(_Strict):
    width: int
    height: int


class ModelVersionInfo(_Strict):
    id: str = Field(
        description="changes with anything that changes the answers: checkpoint, entry, precision"
    )
    sha256: str | None = Field(description="of the checkpoint file")
    source: str = Field(description="the checkpoint file")
    loaded_at: str = Field(description="ISO 8601, UTC")


class ClassifierAgreement(_Strict):
    """A classifier's agreement check at start (``models.agreement_report``): softmax scores against
    torch fp32's on the same images."""

    images: int = Field(description="calibration images compared (the first 16 at most)")
    top1_agreement: float = Field(description="share of images with the same top-1 class")
    score_diff_max: float = Field(description="largest |score difference| over all images and classes")
    top1_score_diff_max: float = Field(description="largest |score difference| at torch fp32's top-1 class")
    top1_score_diff_mean: float = Field(description="mean |score difference| at torch fp32's top-1 class")


class DetectorAgreement(_Strict):
    """A detector's agreement check at start (``models.agreement_report``): torch fp32's detections
    with score >= 0.5, matched to this model's of the same class on the same images."""

    images: int = Field(description="calibration images compared (the first 16 at most)")
    reference_detections: int = Field(description="torch fp32's detections with score >= 0.5")
    matched: int = Field(description="of those, matched at IoU >= 0.5 (greedy, one to one)")
    recall: float | None = Field(description="matched / reference_detections (null: none)")
    high_iou_recall: float | None = Field(description="share found again at IoU >= 0.9 (null: none)")
    score_diff_max: float | None = Field(description="over matched pairs (null: no match)")
    score_diff_mean: float | None
    box_diff_max_px: float | None = Field(description="largest coordinate difference over matched pairs, px")
    box_diff_mean_px: float | None
    extra_detections: int = Field(description="this model's detections >= 0.5 left unmatched")


class ModelSummary(_Strict):
    name: str
    task: Literal["classify", "detect"]
    arch: str
    format: str
    num_classes: int
    device: str
    dtype: str = Field(description='e.g. "float32", "bfloat16"')
    input_size: ImageSize = Field(description="the network's input size")
    default: bool = Field(description="the default model of its task")
    sha256: str | None
    ready: bool = Field(description="warmed up and serving")
    runtime: Runtime = Field(description="what runs the network (VISION_RUNTIME resolved)")
    agreement: ClassifierAgreement | DetectorAgreement | None = Field(
        description="the agreement check at start: this model against torch fp32 on its calibration "
        "images (in-sample); null when none ran (torch at fp32, bf16 or fp16; OpenVINO fp32 without images)"
    )
    version: ModelVersionInfo


class ModelDetail(ModelSummary):
    labels: list[str] = Field(description="class_id i is labels[i]")
    last_reload: ReloadReport | None = Field(description="this process's last reload (None: none yet)")
    defaults: dict[str, float | int | None] = Field(
        description="what a request gets for each parameter of the model's task that it does not send"
    )


class ModelChange(_Strict):
    model: str
    action: Literal["added", "replaced", "removed", "unchanged"]
    from_version: str | None
    to_version: str | None
    verification: dict[str, float | int | None] | None = Field(
        description="the new version against the old on the entry's verify_dir: agreement, min_agreement, ..."
    )


class ReloadReport(_Strict):
    """One serving process's reload."""

    id: str | None = None
    trigger: str | None = None
    started_at: str | None = None
    models_file: str | None = None
    pid: int | None = None
    worker: int | None = Field(None, description="the VISION_WORKERS worker (None: a single process)")
    outcome: Literal["applied", "unchanged", "failed", "rejected"]
    seconds: float | None = None
    changes: list[ModelChange] = Field(default_factory=list)
    error: str | None = None


class ReloadAnswer(_Strict):
    outcome: Literal["applied", "unchanged", "failed", "rejected"] = Field(
        description="the worst of the processes' outcomes"
    )
    reports: list[ReloadReport]


class ModelList(_Strict):
    models: list[ModelSummary]
    last_reload: ReloadReport | None = Field(description="this process's last reload (None: none yet)")


class Prediction(_Strict):
    label: str
    class_id: int
    score: float = Field(ge=0, le=1)


class BoxXYXY(_Strict):
    x1: float
    y1: float
    x2: float
    y2: float


class BoxCXCYWH(_Strict):
    cx: float
    cy: float
    w: float
    h: float


class BoxXYWH(_Strict):
    x: float
    y: float
    w: float
    h: float


Box = BoxXYXY | BoxCXCYWH | BoxXYWH


class Detection(_Strict):
    label: str
    class_id: int
    score: float = Field(ge=0, le=1)
    box: Box = Field(description="pixels of the displayed image, in the request's box_format")
    box_normalized: Box | None = Field(
        None, description="the box divided by the image width/height (only with ?normalized=true)"
    )


class ClassifyResult(_Strict):
    index: int
    image: ImageSize
    predictions: list[Prediction]


class DetectResult(_Strict):
    index: int
    image: ImageSize
    detections: list[Detection]


class ClassifyResponse(_Strict):
    request_id: str
    model: str
    model_version: str = Field(description="the version that answered (``version.id`` in /v1/models)")
    results: list[ClassifyResult]


class DetectResponse(_Strict):
    request_id: str
    model: str
    model_version: str = Field(description="the version that answered (``version.id`` in /v1/models)")
    results: list[DetectResult]


#: Error answers every POST may give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "INVALID_IMAGE: not decodable, truncated or empty",
        404: "MODEL_NOT_FOUND",
        409: "WRONG_TASK: a detector asked to classify, or the reverse",
        413: "PAYLOAD_TOO_LARGE / IMAGE_TOO_LARGE / TOO_MANY_FILES",
        415: "UNSUPPORTED_MEDIA_TYPE",
        422: "VALIDATION_ERROR: bad query parameter, JSON or base64",
        503: "OVERLOADED / NOT_READY / DRAINING (with Retry-After)",
        504: "DEADLINE_EXCEEDED",
    }.items()
}

#: The request forms every POST accepts, for the OpenAPI document (the body is read by hand).
IMAGE_REQUEST_BODY: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                },
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "base64 (or a data: URL)"},
                        "images": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    }
}

"""Response shapes of the contract, for the OpenAPI document (/docs).

The handlers build plain dicts for speed and return them as JSON; these models describe them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong, for people")
    code: str = Field(description="machine-readable code, e.g. INVALID_IMAGE")
    request_id: str


class Status(BaseModel):
    status: Literal["ok", "ready", "not_ready"]
    reason: str | None = None


class ImageSize(BaseModel):
    width: int
    height: int


class ModelSummary(BaseModel):
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


class ModelDetail(ModelSummary):
    labels: list[str] = Field(description="class_id i is labels[i]")
    defaults: dict[str, float | int | None] = Field(description="per-model request defaults")


class ModelList(BaseModel):
    models: list[ModelSummary]


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float = Field(ge=0, le=1)


class Detection(BaseModel):
    label: str
    class_id: int
    score: float = Field(ge=0, le=1)
    box: dict[str, float] = Field(
        description="pixels of the displayed image: {x1,y1,x2,y2} (xyxy), {cx,cy,w,h} (cxcywh) "
        "or {x,y,w,h} (xywh)"
    )
    box_normalized: dict[str, float] | None = Field(
        None, description="the box divided by the image width/height (only with ?normalized=true)"
    )


class ClassifyResult(BaseModel):
    index: int
    image: ImageSize
    predictions: list[Prediction]


class DetectResult(BaseModel):
    index: int
    image: ImageSize
    detections: list[Detection]


class ClassifyResponse(BaseModel):
    request_id: str
    model: str
    results: list[ClassifyResult]


class DetectResponse(BaseModel):
    request_id: str
    model: str
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

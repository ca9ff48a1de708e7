"""``/v1/models`` and ``/v1/models/{name}``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter

from app.deps import ServiceDep
from app.inference import AnyModel
from app.schemas import ErrorBody, ModelDetail, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


def describe(model: AnyModel, *, detail: bool = False) -> dict[str, Any]:
    """The contract's model fields (``labels`` and ``defaults`` only in the detail view)."""
    info = model.predictor.info
    height, width = info.input_size
    out: dict[str, Any] = {
        "name": info.name,
        "task": info.task,
        "arch": info.arch,
        "format": info.format,
        "num_classes": info.num_classes,
        "device": info.device,
        "dtype": info.dtype,
        "input_size": {"width": width, "height": height},
        "default": model.default,
        "sha256": info.sha256,
        "ready": model.ready,
        "runtime": model.version.runtime,
        "agreement": model.version.agreement,
        "version": {
            "id": model.version.id,
            "sha256": model.version.sha256,
            "source": model.version.source,
            "loaded_at": datetime.fromtimestamp(model.version.loaded_at, UTC).isoformat(timespec="seconds"),
        },
    }
    if detail:
        out["labels"] = list(info.labels)
        out["defaults"] = dict(info.defaults)
    return out


@router.get("", response_model=ModelList)
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """Every served model, in the models file's order, and the last reload's report."""
    models = [describe(m) for m in service.require_registry().models.values()]
    return {"models": models, "last_reload": service.last_reload}


@router.get("/{name}", response_model=ModelDetail, responses={404: {"model": ErrorBody}})
async def get_model(name: str, service: ServiceDep) -> dict[str, Any]:
    """One model, with its labels (``class_id`` i is ``labels[i]``), request defaults, version and
    the last reload's report."""
    return {**describe(service.require_registry().get(name), detail=True), "last_reload": service.last_reload}

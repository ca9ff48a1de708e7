"""``/v1/models`` and ``/v1/models/{name}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import RegistryDep
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
    }
    if detail:
        out["labels"] = list(info.labels)
        out["defaults"] = dict(info.defaults)
    return out


@router.get("", response_model=ModelList)
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    """Every served model, in the models file's order."""
    return {"models": [describe(m) for m in registry.models.values()]}


@router.get("/{name}", response_model=ModelDetail, responses={404: {"model": ErrorBody}})
async def get_model(name: str, registry: RegistryDep) -> dict[str, Any]:
    """One model, with its labels (``class_id`` i is ``labels[i]``) and request defaults."""
    return describe(registry.get(name), detail=True)

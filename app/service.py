"""What the app serves: the loaded models, their batchers, and the readiness state.

``ServiceState`` lives on ``app.state.service``; the routers reach it through ``app.deps``.
Loading and warming up are here too, so ``python -m app`` (which loads before uvicorn starts) and
the lifespan (which loads when it was given nothing) share them.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.batching import ItemFailure, MicroBatcher, is_out_of_memory
from app.errors import ApiError, draining, model_not_found, not_ready, wrong_task
from app.images import JpegUpload, decode_image
from app.metrics import Metrics
from app.models_file import ModelsFile
from app.settings import Settings
from models import (
    Classifier,
    Detector,
    DetectParams,
    ModelConfigError,
    ModelSpec,
    Predictor,
    load_calibration_images,
    load_model,
    quantize_predictor_with_report,
)

log = logging.getLogger(__name__)

#: One image's input: its preprocessed tensor [3, H, W] (decoded by PIL in the decode threads), or
#: the JPEG itself, to be decoded in the batch on the model's device (VISION_JPEG_DECODE).
ImageInput = torch.Tensor | JpegUpload
#: One classifier input: (image, top_k).
ClassifyItem = tuple[ImageInput, int]
#: One detector input: (image, displayed (width, height), post-processing params).
DetectItem = tuple[ImageInput, tuple[int, int], DetectParams]


@dataclass
class ServedModel:
    """A loaded model with its batcher; ``ready`` once its warm-up forwards ran."""

    name: str
    predictor: Predictor
    batcher: MicroBatcher[Any, Any]
    default: bool
    ready: bool = False

    @property
    def task(self) -> str:
        return self.predictor.info.task


class ModelRegistry:
    """Served models by name, and the default of each task."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.defaults: dict[str, str] = {m.task: m.name for m in models if m.default}

    def get(self, name: str) -> ServedModel:
        """Raises 404 MODEL_NOT_FOUND."""
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise model_not_found(f"no model named {name!r} (served: {known})") from None

    def for_task(self, task: str, name: str | None) -> ServedModel:
        """The named model (checked to serve ``task``: else 409 WRONG_TASK) or the task's default."""
        if name is None:
            if task not in self.defaults:
                raise model_not_found(f"no {task} model is served")
            return self.models[self.defaults[task]]
        served = self.get(name)
        if served.task != task:
            raise wrong_task(f"model {name!r} is a {served.task} model; it cannot {task}")
        return served


@dataclass
class ServiceState:
    """Everything the request handlers need, on ``app.state.service``."""

    settings: Settings
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    registry: ModelRegistry | None = None
    not_ready_reason: str | None = "starting"
    draining: bool = False
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None and not self.draining

    def check_serving(self, model: ServedModel) -> None:
        """Raises 503 DRAINING / NOT_READY unless ``model`` takes requests now."""
        if self.draining:
            raise draining()
        if not model.ready:
            raise not_ready(f"model {model.name!r} is still warming up")

    def require_registry(self) -> ModelRegistry:
        if self.registry is None:
            if self.draining:
                raise draining()
            raise not_ready(f"models are not loaded yet ({self.not_ready_reason})")
        return self.registry


# -- building -----------------------------------------------------------------------------------


def batch_inputs(
    predictor: Predictor, inputs: Sequence[ImageInput]
) -> tuple[torch.Tensor | None, dict[int, ApiError]]:
    """The batch [B', 3, H, W] of the images that could be read, and the errors of those that could not.

    Tensors (PIL-decoded) are taken as they are. JPEGs are decoded together on the model's device
    (``Predictor.preprocess_jpegs``: one nvJPEG call on CUDA, no host sync). When that batch fails
    (one corrupt file fails it all), each of its JPEGs is decoded again with PIL, so the good ones
    are answered and a bad one gets the 400 that the CPU path gives. The batch is None when no
    image could be read. Runs in the model's inference thread.
    """
    jpegs = [i for i, value in enumerate(inputs) if isinstance(value, JpegUpload)]
    if not jpegs:
        return torch.stack(list(inputs)), {}  # type: ignore[arg-type]  # all tensors: B x [3, H, W]
    tensors: dict[int, torch.Tensor] = {i: v for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)}
    errors: dict[int, ApiError] = {}
    uploads = [inputs[i] for i in jpegs]
    try:
        decoded = predictor.preprocess_jpegs([u.data for u in uploads], [u.orientation for u in uploads])  # type: ignore[union-attr]
        tensors.update(zip(jpegs, decoded, strict=True))
    except (RuntimeError, ValueError) as exc:
        if is_out_of_memory(exc):
            raise  # the batcher splits the batch
        log.warning(
            "model %s: decoding %d JPEG(s) on %s failed (%s); decoding them with PIL",
            predictor.info.name,
            len(jpegs),
            predictor.device,
            str(exc).splitlines()[0] if str(exc) else exc,
        )
        for i, upload in zip(jpegs, uploads, strict=True):
            assert isinstance(upload, JpegUpload)
            try:
                tensors[i] = predictor.preprocess(
                    decode_image(upload.data, max_pixels=upload.size[0] * upload.size[1])
                )
            except ApiError as error:
                error.message = upload.label + error.message
                errors[i] = error
    if not tensors:
        return None, errors
    device = predictor.device
    return torch.stack([tensors[i].to(device, non_blocking=True) for i in sorted(tensors)]), errors


def _with_failures(outputs: Sequence[Any], errors: dict[int, ApiError], count: int) -> list[Any]:
    """``outputs`` of the readable images, with an ItemFailure in each unreadable image's place."""
    readable = iter(outputs)
    return [ItemFailure(errors[i]) if i in errors else next(readable) for i in range(count)]


def batch_predict_fn(predictor: Predictor) -> Callable[[list[Any]], Sequence[Any]]:
    """The function a model's batcher calls: the items' images as one batch (:func:`batch_inputs`),
    predict, one output each (an ItemFailure for an image that could not be read)."""
    if isinstance(predictor, Classifier):
        classifier = predictor

        def classify(items: list[ClassifyItem]) -> list[Any]:
            batch, errors = batch_inputs(classifier, [image for image, _ in items])
            ks = [k for i, (_, k) in enumerate(items) if i not in errors]
            outputs = classifier.predict(batch, top_k=ks) if batch is not None else []
            return _with_failures(outputs, errors, len(items))

        return classify
    if isinstance(predictor, Detector):
        detector = predictor

        def detect(items: list[DetectItem]) -> list[Any]:
            batch, errors = batch_inputs(detector, [image for image, _, _ in items])
            kept = [item for i, item in enumerate(items) if i not in errors]
            outputs = (
                detector.predict(
                    batch, image_sizes=[size for _, size, _ in kept], params=[p for *_, p in kept]
                )
                if batch is not None
                else []
            )
            return _with_failures(outputs, errors, len(items))

        return detect
    raise TypeError(f"not a Classifier or Detector: {type(predictor).__name__}")


def serve_models(
    predictors: Sequence[Predictor], defaults: dict[str, str] | None, settings: Settings, metrics: Metrics
) -> ModelRegistry:
    """Wrap loaded predictors for serving; ``defaults`` maps task -> name (else the first of each task)."""
    chosen = dict(defaults or {})
    served: list[ServedModel] = []
    for predictor in predictors:
        info = predictor.info
        if any(m.name == info.name for m in served):
            raise ValueError(f"two models are named {info.name!r}")
        chosen.setdefault(info.task, info.name)
        batcher: MicroBatcher[Any, Any] = MicroBatcher(
            info.name,
            batch_predict_fn(predictor),
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue_images,
            metrics=metrics,
        )
        served.append(ServedModel(info.name, predictor, batcher, default=chosen[info.task] == info.name))
        metrics.model_ready.labels(info.name).set(0)
    return ModelRegistry(served)


def load_predictors(
    models_file: ModelsFile, settings: Settings, metrics: Metrics | None = None
) -> list[Predictor]:
    """``load_model`` for each entry in file order (blocking; seconds per full-size model).

    Raises CheckpointError / ModelConfigError from ``models`` unchanged.
    """
    predictors: list[Predictor] = []
    for spec in models_file.specs:
        predictor = load_one(spec, settings, metrics)
        if settings.int8:
            predictor = quantize_one(
                predictor, models_file.calibration_dirs.get(spec.name) or settings.int8_calibration_dir
            )
        predictors.append(predictor)
    return predictors


def quantize_one(predictor: Predictor, calibration_dir: Path | None) -> Predictor:
    """Quantize a CPU fp32 predictor to int8, calibrated on ``calibration_dir``; log the accuracy cost.

    Raises ModelConfigError when there are no calibration images: int8 is never calibrated on
    something that is not the model's own kind of image.
    """
    name = predictor.info.name
    if calibration_dir is None:
        raise ModelConfigError(
            f"model {name!r}: VISION_PRECISION=int8 needs calibration images of the model's own kind: "
            "set VISION_INT8_CALIBRATION_DIR, or calibration_dir in the models file entry"
        )
    start = time.perf_counter()
    images = load_calibration_images(calibration_dir)
    predictor, report = quantize_predictor_with_report(predictor, images)
    shown = {key: round(value, 4) if isinstance(value, float) else value for key, value in report.items()}
    log.info(
        "model %s quantized to int8 on %d calibration images from %s in %.1f s; "
        "int8 vs fp32 on %d of them (in-sample): %s",
        name,
        len(images),
        calibration_dir,
        time.perf_counter() - start,
        report["images"],
        shown,
    )
    return predictor


def load_one(spec: ModelSpec, settings: Settings, metrics: Metrics | None = None) -> Predictor:
    start = time.perf_counter()
    predictor = load_model(spec, device=settings.torch_device, precision=settings.torch_precision)
    seconds = time.perf_counter() - start
    log.info(
        "loaded model %s (%s %s, %s) on %s in %.2f s",
        spec.name,
        spec.arch,
        spec.format,
        predictor.info.dtype,
        predictor.info.device,
        seconds,
    )
    if metrics is not None:
        metrics.model_load_seconds.labels(spec.name).set(seconds)
    return predictor


@functools.cache
def blank_jpeg() -> bytes:
    """A small grey JPEG for warming up the device's JPEG decoder."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def warm_predictor(predictor: Predictor, settings: Settings) -> None:
    """One forward (and post-processing) per batch size 1..max_batch_size, and one call of the
    device's JPEG decoder when it is used (its first call sets it up: nvJPEG handles). Blocking."""
    sizes = list(range(1, settings.max_batch_size + 1))
    predictor.warmup(sizes)
    if settings.jpeg_on_device:
        predictor.preprocess_jpegs([blank_jpeg()] * sizes[-1], [1] * sizes[-1])


async def warm_up(state: ServiceState, *, already_warm: bool = False) -> None:
    """Run every model's warm-up (:func:`warm_predictor`) in its own inference thread, then mark it
    ready; ``already_warm``: the caller warmed the models before serving, just mark them."""
    registry = state.require_registry()
    sizes = list(range(1, state.settings.max_batch_size + 1))
    for index, model in enumerate(registry.models.values(), start=1):
        state.not_ready_reason = f"warming up model {model.name!r} ({index}/{len(registry.models)})"
        start = time.perf_counter()
        if not already_warm:
            warm = functools.partial(warm_predictor, model.predictor, state.settings)
            await model.batcher.run_in_thread(warm)
        seconds = time.perf_counter() - start
        model.ready = True
        state.metrics.model_warmup_seconds.labels(model.name).set(seconds)
        state.metrics.model_ready.labels(model.name).set(1)
        log.info("model %s warmed up (batch sizes 1..%d) in %.2f s", model.name, sizes[-1], seconds)
    state.not_ready_reason = None
    log.info("ready: %d model(s) serving", len(registry.models))

"""The inference core: what every image endpoint shares, from uploaded bytes to model outputs.

``InferenceService.infer(model, images, options, deadline)`` is the one path: reserve room in the
model's queue (503 OVERLOADED), prepare each image with the decoder chosen at start
(``app.images``), check the deadline, queue one :class:`ImageItem` per image in the model's
micro-batcher (``app.batching``), which stacks them and calls the predictor's ``run``. Routers
only parse their input form and format the :class:`ImageResult` list they get back.

The service also owns the start: the models file is read and every model loaded, served and
warmed up here (the app's lifespan calls :meth:`InferenceService.start`), so there is one loader
and one warm-up. A served model is a :class:`ServedClassifier` or a :class:`ServedDetector`, chosen
once when it is served; everything after that is typed by its options and outputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from PIL import Image
from pydantic import BaseModel

from app.batching import ItemFailure, MicroBatcher
from app.errors import deadline_exceeded, draining, model_not_found, not_ready, wrong_task
from app.images import ImageDecoder, PreparedImage, make_decoder
from app.metrics import Metrics
from app.models_file import ModelsFile, ModelsFileError, check_weights_exist, read_models_file
from app.schemas import ClassifyParameters, DetectParameters
from app.settings import Runtime, RuntimeChoice, Settings
from models import (
    TASK_OPTIONS,
    CheckpointError,
    Classifier,
    ClassifyOptions,
    ClassifyOutput,
    Detector,
    DetectOutput,
    DetectParams,
    ModelConfigError,
    ModelSpec,
    Predictor,
    Task,
    apply_with_report,
    device_memory,
    load_calibration_images,
    load_model,
    quantize_predictor,
    use_openvino,
)

log = logging.getLogger(__name__)

OptT = TypeVar("OptT", ClassifyOptions, DetectParams)
OutT = TypeVar("OutT", ClassifyOutput, DetectOutput)
R = TypeVar("R")


@dataclass(frozen=True)
class ModelVersion:
    """Which version of a model answers. ``id`` changes with anything that changes its answers:
    the checkpoint's bytes, its models-file entry, the precision (and the int8 calibration), the
    runtime. ``agreement`` is the agreement check at start (:func:`adapt_one`), None when none ran."""

    id: str
    sha256: str | None  # of the checkpoint file
    source: str  # the checkpoint file
    loaded_at: float  # Unix time
    runtime: Runtime = "torch"
    agreement: dict[str, Any] | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded for serving: its predictor, version, and whether it is its task's default."""

    predictor: Classifier | Detector
    version: ModelVersion
    default: bool


@dataclass(frozen=True)
class ImageItem(Generic[OptT]):
    """One image in a model's queue: its prepared input and its request's options."""

    image: PreparedImage
    options: OptT


@dataclass(frozen=True)
class ImageResult(Generic[OutT]):
    """One image's answer: its size as displayed (width, height), the model's output, and the
    decoded image when the caller asked to keep it (drawing)."""

    size: tuple[int, int]
    output: OutT
    image: Image.Image | None = None


class ServedModel(Generic[OptT, OutT]):
    """A loaded model as the service serves it: its predictor, its batcher and its state."""

    task: ClassVar[Task]
    #: the request parameters of the model's task (``/v1`` query, ``/v2`` parameters)
    parameters: ClassVar[type[BaseModel]]

    def __init__(
        self,
        predictor: Predictor[OptT, OutT],
        batcher: MicroBatcher[ImageItem[OptT], OutT],
        *,
        default: bool,
        version: ModelVersion,
    ) -> None:
        self.predictor: Predictor[OptT, OutT] = predictor
        self.batcher: MicroBatcher[ImageItem[OptT], OutT] = batcher
        self.default = default
        self.version = version
        self.ready = False  # its warm-up forwards ran
        self.in_flight = 0  # requests that hold this model (see lease)
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        return self.predictor.info.name

    @property
    def labels(self) -> list[str]:
        return self.predictor.info.labels

    def options(self, parameters: BaseModel) -> OptT:
        """The options of one request: the parameters it sent, else the model's defaults."""
        sent = parameters.model_dump(include=set(TASK_OPTIONS[self.task]), exclude_none=True)
        return replace(self.predictor.default_options, **sent)

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Count a request that holds this model, from when it picked it until its answer is
        computed: a reload retires a replaced model only once none does (:meth:`until_idle`)."""
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def until_idle(self) -> None:
        """Wait until no request holds this model."""
        await self._idle.wait()


class ServedClassifier(ServedModel[ClassifyOptions, ClassifyOutput]):
    task = "classify"
    parameters = ClassifyParameters


class ServedDetector(ServedModel[DetectParams, DetectOutput]):
    task = "detect"
    parameters = DetectParameters


AnyModel = ServedClassifier | ServedDetector
M = TypeVar("M", ServedClassifier, ServedDetector)


class ModelRegistry:
    """Served models by name (in the models file's order), and the default of each task."""

    def __init__(self, models: Sequence[AnyModel]) -> None:
        self.models: dict[str, AnyModel] = {m.name: m for m in models}
        self.defaults: dict[str, str] = {m.task: m.name for m in models if m.default}

    def get(self, name: str) -> AnyModel:
        """Raises 404 MODEL_NOT_FOUND."""
        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise model_not_found(f"no model named {name!r} (served: {known})") from None

    def classifier(self, name: str | None) -> ServedClassifier:
        """The named classifier (409 WRONG_TASK for a detector), or the default one."""
        return self._of_task(ServedClassifier, name)

    def detector(self, name: str | None) -> ServedDetector:
        """The named detector (409 WRONG_TASK for a classifier), or the default one."""
        return self._of_task(ServedDetector, name)

    def _of_task(self, kind: type[M], name: str | None) -> M:
        if name is None:
            if kind.task not in self.defaults:
                raise model_not_found(f"no {kind.task} model is served")
            name = self.defaults[kind.task]
        model = self.get(name)
        if not isinstance(model, kind):
            raise wrong_task(f"model {name!r} is a {model.task} model; it cannot {kind.task}")
        return model


class StartupError(Exception):
    """Loading or warming up failed; the message names the file and the problem."""


class InferenceService:
    """The served models and everything a request needs on its way to them (``app.state.service``)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.decoder: ImageDecoder = make_decoder(
            settings.jpeg_on_device, self.pool, settings.max_image_pixels
        )
        self.registry: ModelRegistry | None = None
        self.not_ready_reason: str | None = "starting"
        self.draining = False
        #: why the start failed (``python -m app`` stops with this message), or None
        self.failure: str | None = None
        self._start_task: asyncio.Task[None] | None = None
        #: reloads (``app.reload``): one at a time; the last one's report; models being retired
        self.reload_lock = asyncio.Lock()
        self.last_reload: dict[str, Any] | None = None
        self.retiring: set[AnyModel] = set()
        self.background: set[asyncio.Task[None]] = set()

    # -- state ----------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None and not self.draining

    def require_registry(self) -> ModelRegistry:
        """The served models; 503 DRAINING or NOT_READY while there are none."""
        if self.registry is None:
            if self.draining:
                raise draining()
            raise not_ready(f"models are not loaded yet ({self.not_ready_reason})")
        return self.registry

    def check_serving(self, model: ServedModel[Any, Any]) -> None:
        """Raises 503 DRAINING / NOT_READY unless ``model`` takes requests now."""
        if self.draining:
            raise draining()
        if not model.ready:
            raise not_ready(f"model {model.name!r} is still warming up")

    def admit(self, model: ServedModel[Any, Any]) -> AbstractContextManager[None]:
        """503 unless ``model`` serves; else its lease (:meth:`ServedModel.lease`) for the request.
        Call it in the same step (no ``await`` between) as the registry lookup that gave ``model``."""
        self.check_serving(model)
        return model.lease()

    # -- requests -------------------------------------------------------------------------------

    async def infer(
        self,
        model: ServedModel[OptT, OutT],
        images: Sequence[bytes],
        options: OptT,
        deadline: float,
        *,
        keep_images: bool = False,
    ) -> list[ImageResult[OutT]]:
        """Run ``model`` on the encoded ``images`` with ``options``; one result per image, in order.

        ``deadline`` is on the event-loop clock. Raises ApiError: 503 OVERLOADED (queue full),
        400 / 413 / 415 for an image (the first failing one), 504 past the deadline, 500 when the
        batch failed.
        """
        self.metrics.images_per_request.labels(model.name).observe(len(images))
        with model.batcher.reserve(len(images), deadline) as ticket:
            start = time.perf_counter()
            prepared = await self.decoder.prepare(images, model.predictor, keep_images=keep_images)
            self.metrics.stage_seconds.labels(model.name, "decode").observe(time.perf_counter() - start)
            if asyncio.get_running_loop().time() >= deadline:
                raise deadline_exceeded()
            items = [ImageItem(image, options) for image in prepared]
            outputs = await model.batcher.submit(items, deadline, ticket)
        return [ImageResult(p.size, out, p.image) for p, out in zip(prepared, outputs, strict=True)]

    async def run_cpu(self, fn: Callable[[], R]) -> R:
        """Run blocking CPU work (drawing, encoding) in the decode threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    # -- start and stop -------------------------------------------------------------------------

    def start_in_background(self) -> None:
        """:meth:`start` as a task of the running loop (the socket serves meanwhile)."""
        self._start_task = asyncio.get_running_loop().create_task(self.start(), name="start")

    async def start(self) -> None:
        """Load the models file, serve every model, warm each up; then ready. A failure is kept in
        :attr:`failure` and in readiness, never raised."""
        try:
            self.not_ready_reason = f"loading the models in {self.settings.models_file}"
            loaded = await asyncio.to_thread(load_models, self.settings, self.metrics)
            registry = ModelRegistry([self.serve(model) for model in loaded])
            for model in registry.models.values():
                self.metrics.model_ready.labels(model.name).set(0)
                model.batcher.start()
            self.registry = registry
            await self.warm_up(registry)
        except asyncio.CancelledError:
            raise
        except StartupError as exc:
            self.fail(str(exc))
        except Exception as exc:
            log.error("startup failed", exc_info=exc)
            self.fail(f"warm-up failed: {exc}" if self.registry is not None else str(exc))

    async def until_started(self) -> None:
        """Wait until the start (:meth:`start_in_background`) has ended, however it ended."""
        task = self._start_task
        if task is not None and not task.done():
            await asyncio.shield(task)  # a waiter that is cancelled does not cancel the start

    def fail(self, message: str) -> None:
        self.failure = message
        self.not_ready_reason = f"startup failed: {message}"
        log.error("startup failed: %s", message)

    def serve(self, loaded: LoadedModel) -> AnyModel:
        """Wrap a loaded model for serving: its batcher and its task's served type."""
        predictor, version, default = loaded.predictor, loaded.version, loaded.default
        if isinstance(predictor, Classifier):  # the one place the task decides the type
            return ServedClassifier(predictor, self.batcher(predictor), default=default, version=version)
        return ServedDetector(predictor, self.batcher(predictor), default=default, version=version)

    def batcher(self, predictor: Predictor[OptT, OutT]) -> MicroBatcher[ImageItem[OptT], OutT]:
        settings = self.settings
        return MicroBatcher(
            predictor.info.name,
            batch_runner(predictor, self.decoder, self.metrics),
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_delay_ms / 1000,
            max_queue=settings.queue_share,
            metrics=self.metrics,
        )

    async def warm_up(self, registry: ModelRegistry) -> None:
        """Each model's warm-up in its own inference thread (one forward per batch size, and the
        decoder's set-up), then it takes requests; ready once every model is warm."""
        for index, model in enumerate(registry.models.values(), start=1):
            self.not_ready_reason = f"warming up model {model.name!r} ({index}/{len(registry.models)})"
            await self.warm(model)
            self.metrics.model_ready.labels(model.name).set(1)
        self.not_ready_reason = None
        log.info("ready: %d model(s) serving", len(registry.models))

    async def warm(self, model: AnyModel) -> None:
        """``model``'s warm-up in its own inference thread: one forward per batch size 1..max, and
        the decoder's set-up; then one timed full batch gives the batcher its first pace, and it
        takes requests."""
        sizes = self.settings.max_batch_size
        predictor = model.predictor
        start = time.perf_counter()

        def forwards() -> float:
            predictor.warmup(range(1, sizes + 1))
            self.decoder.warm_up(predictor, sizes)
            timed = time.perf_counter()  # one more full batch, warm now: the pace admission starts with
            predictor.warmup([sizes])
            return time.perf_counter() - timed

        model.batcher.set_pace(await model.batcher.run_in_thread(forwards), sizes)
        seconds = time.perf_counter() - start
        self.metrics.record_device_memory(str(predictor.device), device_memory(predictor.device))
        model.ready = True
        self.metrics.model_warmup_seconds.labels(model.name).set(seconds)
        log.info("model %s warmed up (batch sizes 1..%d) in %.2f s", model.name, sizes, seconds)

    def in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task the service keeps (and cancels when it stops)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop(self) -> None:
        """Draining: the start is cancelled, queued images fail with 503 DRAINING, threads end."""
        self.draining = True
        tasks = [t for t in (self._start_task, *self.background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        models = [*(self.registry.models.values() if self.registry else ()), *self.retiring]
        await asyncio.gather(*(m.batcher.stop() for m in models))
        self.pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")


def batch_runner(
    predictor: Predictor[OptT, OutT], decoder: ImageDecoder, metrics: Metrics | None = None
) -> Callable[[list[ImageItem[OptT]]], list[OutT | ItemFailure]]:
    """The function a model's batcher calls with a batch of items (in the inference thread):
    stack their images (``decoder.stack``), run the predictor once, one output per item, and an
    ItemFailure in the place of an image that could not be read. ``metrics`` gets the time of
    both steps (``vision_stage_seconds``: stack, run) and, after each batch on a GPU, this
    worker's device memory. No synchronisation is added: on a GPU, work that the stack queued
    (the copy, nvJPEG) may end inside the run, which ends with the outputs on the host."""
    device, device_label = predictor.device, str(predictor.device)
    name = predictor.info.name

    def run(items: list[ImageItem[OptT]]) -> list[OutT | ItemFailure]:
        start = time.perf_counter()
        batch = decoder.stack(predictor, [item.image for item in items])
        stacked = time.perf_counter()
        kept = [item for i, item in enumerate(items) if i not in batch.failures]
        outputs = (
            predictor.run(batch.tensor, [k.image.size for k in kept], [k.options for k in kept])
            if batch.tensor is not None
            else []
        )
        if metrics is not None:
            metrics.stage_seconds.labels(name, "stack").observe(stacked - start)
            if batch.tensor is not None:
                metrics.stage_seconds.labels(name, "run").observe(time.perf_counter() - stacked)
            metrics.record_device_memory(device_label, device_memory(device))
        readable = iter(outputs)
        return [
            ItemFailure(batch.failures[i]) if i in batch.failures else next(readable)
            for i in range(len(items))
        ]

    return run


# -- loading --------------------------------------------------------------------------------------


def load_models(settings: Settings, metrics: Metrics) -> list[LoadedModel]:
    """Every model of ``settings.models_file``, loaded in file order. Blocking: seconds per
    full-size model. Raises StartupError naming the file and the problem."""
    models_file = read_checked(settings.models_file)
    runtime = runtime_of(settings)
    log.info(
        "loading %d model(s) from %s on %s (%s), runtime %s (%s)",
        len(models_file.specs),
        models_file.path,
        settings.torch_device,
        settings.precision,
        runtime.name,
        runtime.reason,
    )
    return [load_entry(models_file, spec, settings, metrics) for spec in models_file.specs]


def runtime_of(settings: Settings) -> RuntimeChoice:
    """``settings.runtime_choice``; raises StartupError when the runtime asked for cannot run here."""
    try:
        return settings.runtime_choice
    except ValueError as exc:
        raise StartupError(str(exc)) from None


def read_checked(path: Path) -> ModelsFile:
    """The models file at ``path`` with every checkpoint present; raises StartupError."""
    try:
        models_file = read_models_file(path)
        check_weights_exist(models_file)
    except ModelsFileError as exc:
        raise StartupError(str(exc)) from None
    return models_file


def load_entry(models_file: ModelsFile, spec: ModelSpec, settings: Settings, metrics: Metrics) -> LoadedModel:
    """One entry of ``models_file`` loaded and made ready for its runtime and precision (int8:
    quantized; OpenVINO: converted; both checked against torch fp32), with its version. Raises
    StartupError naming the file and the problem."""
    runtime = runtime_of(settings)
    try:
        predictor = load_one(spec, settings, metrics)
        predictor, agreement = adapt_one(predictor, settings, images_dir(models_file, spec, settings))
    except (CheckpointError, ModelConfigError) as exc:
        raise StartupError(f"{models_file.path}: {exc}") from None
    version = ModelVersion(
        version_id(spec, predictor.info.sha256, settings, calibration_dir(models_file, spec, settings)),
        predictor.info.sha256,
        str(spec.weights),
        time.time(),
        runtime.name,
        agreement,
    )
    return LoadedModel(predictor, version, models_file.defaults.get(spec.task) == spec.name)


def images_dir(models_file: ModelsFile, spec: ModelSpec, settings: Settings) -> Path | None:
    """The folder of ``spec``'s own kind of images: its entry's ``calibration_dir``, else
    ``VISION_INT8_CALIBRATION_DIR``; None when neither is set."""
    return models_file.calibration_dirs.get(spec.name) or settings.int8_calibration_dir


def calibration_dir(models_file: ModelsFile, spec: ModelSpec, settings: Settings) -> Path | None:
    """Where ``spec``'s int8 calibration images are (None: not int8, or none given)."""
    return images_dir(models_file, spec, settings) if settings.int8 else None


def version_id(spec: ModelSpec, sha256: str | None, settings: Settings, calibration: Path | None) -> str:
    """12 hex digits naming what a model answers with: the checkpoint's SHA-256, the entry (labels,
    request defaults, preprocessing; not its name or file path), the precision, the calibration,
    the runtime."""
    entry = {key: value for key, value in asdict(spec).items() if key not in ("name", "weights")}
    described = {
        "sha256": sha256,
        "entry": entry,
        "precision": settings.precision,
        "calibration": calibration,
        "runtime": runtime_of(settings).name,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:12]


def load_one(spec: ModelSpec, settings: Settings, metrics: Metrics) -> Classifier | Detector:
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
    metrics.model_load_seconds.labels(spec.name).set(seconds)
    return predictor


def adapt_one(
    predictor: Classifier | Detector, settings: Settings, folder: Path | None
) -> tuple[Classifier | Detector, dict[str, Any] | None]:
    """The loaded predictor made ready for the settings' runtime and precision, and the agreement
    check at start: its answers against the torch fp32 predictor it was, on its calibration images
    in ``folder`` (``models.apply_with_report``: in-sample), logged; None when nothing changed or, for
    OpenVINO fp32, when there are no images to check on.

    torch at fp32 / bf16 / fp16 serves the predictor as loaded; torch int8 quantizes it
    (``models.quantize_predictor``); OpenVINO converts its network, at int8 quantized by NNCF
    (``models.use_openvino``), calibrated on the same images as the torch int8 path. Raises
    ModelConfigError when int8 has no calibration images, or conversion fails.
    """
    runtime = runtime_of(settings).name
    name = predictor.info.name
    if runtime == "torch" and not settings.int8:
        return predictor, None
    if settings.int8 and folder is None:
        raise ModelConfigError(
            f"model {name!r}: VISION_PRECISION=int8 needs calibration images of the model's own kind: "
            "set VISION_INT8_CALIBRATION_DIR, or calibration_dir in the models file entry"
        )
    start = time.perf_counter()
    images = load_calibration_images(folder) if folder is not None else []
    change: Callable[[Classifier | Detector], Classifier | Detector]
    if runtime == "openvino":
        precision: Literal["fp32", "int8"] = "int8" if settings.int8 else "fp32"
        cache, threads = settings.openvino_cache_dir, settings.torch_threads
        what = f"OpenVINO {precision}"

        def change(p: Classifier | Detector) -> Classifier | Detector:
            return use_openvino(p, precision, images, cache_dir=cache, threads=threads)

    else:
        what = "torch int8"

        def change(p: Classifier | Detector) -> Classifier | Detector:
            return quantize_predictor(p, images)

    if not images:  # OpenVINO fp32 without images of the model's kind: converted, not checked
        predictor = change(predictor)
        log.warning(
            "model %s runs on %s (ready in %.1f s); no agreement check against torch fp32: no "
            "calibration_dir in its entry and no VISION_INT8_CALIBRATION_DIR",
            name,
            what,
            time.perf_counter() - start,
        )
        return predictor, None
    predictor, report = apply_with_report(predictor, images, change)
    log.info(
        "model %s runs on %s (ready in %.1f s, %d images from %s); agreement with torch fp32 on %d "
        "of them (in-sample): %s",
        name,
        what,
        time.perf_counter() - start,
        len(images),
        folder,
        report["images"],
        {key: float(f"{value:.4g}") if isinstance(value, float) else value for key, value in report.items()},
    )
    return predictor, report

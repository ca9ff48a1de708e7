"""Reload the models file while serving: new versions are loaded, warmed up and checked beside the
old ones, then swapped in at once; nothing changes when anything fails.

A reload (SIGHUP, or ``POST /admin/models/reload``) reads the models file again and compares each
entry with what serves, by version (``app.inference.version_id``: the checkpoint's bytes, the
entry, the precision). Added entries and changed ones are loaded and warmed up in their own
inference threads while the old versions keep answering; a changed entry with ``verify_dir`` must
answer those images like the version it replaces (``models.agreement``). Only when every one of
them is ready does the registry change, in one assignment: requests that picked a model before
keep it until they are answered, and a replaced or removed model is stopped and freed once none
holds it (``ServedModel.lease``). A bad models file, a checkpoint that does not load, a warm-up
that fails or a verification below its bound leave everything as it was; the report says why.

With ``VISION_WORKERS`` > 1 every worker reloads (the supervisor passes SIGHUP on), and the worker
that took the HTTP request waits for the others' reports in the workers' shared folder.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from app.inference import (
    AnyModel,
    InferenceService,
    LoadedModel,
    ModelRegistry,
    StartupError,
    calibration_dir,
    load_entry,
    read_checked,
    version_id,
)
from app.models_file import ModelsFile, Verification
from models import (
    ModelSpec,
    agreement_report,
    load_calibration_images,
    reference_outputs,
    sha256_file,
)

log = logging.getLogger(__name__)

Outcome = Literal["applied", "unchanged", "failed", "rejected"]
Action = Literal["added", "replaced", "removed", "unchanged"]


@dataclass
class ModelChange:
    """What a reload does (or, when it fails, would have done) to one model."""

    model: str
    action: Action
    from_version: str | None = None
    to_version: str | None = None
    verification: dict[str, Any] | None = None


@dataclass
class ReloadReport:
    """One process's reload: what changed, and how it ended."""

    id: str
    trigger: str
    started_at: str
    models_file: str
    pid: int = field(default_factory=os.getpid)
    worker: int | None = None
    outcome: Outcome | None = None
    seconds: float | None = None
    changes: list[ModelChange] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class ReloadFailed(Exception):
    """A reload that must change nothing: ``outcome`` is "failed" or "rejected" (verification)."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


def plan(registry: ModelRegistry, models_file: ModelsFile, service: InferenceService) -> list[ModelChange]:
    """Each model's change, in the file's order, then the removed ones. Blocking: it hashes every
    checkpoint file, since a file replaced in place is a new version."""
    settings = service.settings
    changes = []
    for spec in models_file.specs:
        current = registry.models.get(spec.name)
        new = version_id(
            spec, sha256_file(spec.weights), settings, calibration_dir(models_file, spec, settings)
        )
        if current is None:
            changes.append(ModelChange(spec.name, "added", None, new))
        elif current.version.id != new:
            changes.append(ModelChange(spec.name, "replaced", current.version.id, new))
        else:
            changes.append(ModelChange(spec.name, "unchanged", new, new))
    listed = {spec.name for spec in models_file.specs}
    changes += [
        ModelChange(name, "removed", model.version.id, None)
        for name, model in registry.models.items()
        if name not in listed
    ]
    return changes


async def reload_models(service: InferenceService, trigger: str) -> ReloadReport:
    """Reload ``service``'s models file (module docstring); one reload at a time. Never raises: the
    report says what happened, and it is kept as ``service.last_reload``."""
    async with service.reload_lock:
        started = time.perf_counter()
        report = ReloadReport(
            id=uuid.uuid4().hex[:12],
            trigger=trigger,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            models_file=str(service.settings.models_file),
            worker=service.settings.worker_slot,
        )
        try:
            report.outcome = await _apply(service, report)
        except ReloadFailed as exc:
            report.outcome, report.error = exc.outcome, str(exc)
        except Exception as exc:  # a reload must never take the service down
            log.error("reload %s failed", report.id, exc_info=exc)
            report.outcome, report.error = "failed", f"{type(exc).__name__}: {exc}"
        report.seconds = round(time.perf_counter() - started, 3)
        service.metrics.reloads.labels(report.outcome).inc()
        service.last_reload = report.as_json()
        summary = ", ".join(f"{c.model} {c.action}" for c in report.changes if c.action != "unchanged")
        log_level = logging.INFO if report.outcome in ("applied", "unchanged") else logging.ERROR
        log.log(
            log_level,
            "reload %s (%s): %s in %.1f s%s%s",
            report.id,
            trigger,
            report.outcome,
            report.seconds,
            f"; {summary}" if summary else "",
            f"; {report.error}" if report.error else "",
        )
        return report


async def _apply(service: InferenceService, report: ReloadReport) -> Outcome:
    """Load, warm up and verify what changed, then swap; raises ReloadFailed and changes nothing."""
    if service.draining:
        raise ReloadFailed("failed", "the service is draining")
    if service.not_ready_reason is not None and service.failure is None:
        # asked while starting (a worker's start can overlap a reload request to the pool): the
        # start reads the models file itself, so this reload runs after it, usually "unchanged"
        log.info("reload %s waits for the start to end", report.id)
        await service.until_started()
    if service.failure is not None:
        raise ReloadFailed("failed", f"the service did not start: {service.failure}")
    registry = service.registry
    if registry is None or service.not_ready_reason is not None:
        raise ReloadFailed(
            "failed", "the service is draining" if service.draining else "the service has not started"
        )
    try:
        models_file = await asyncio.to_thread(read_checked, service.settings.models_file)
    except StartupError as exc:
        raise ReloadFailed("failed", str(exc)) from None
    report.changes = await asyncio.to_thread(plan, registry, models_file, service)
    defaults = {name for name in models_file.defaults.values()}
    fresh: dict[str, AnyModel] = {}
    try:
        for change in report.changes:
            if change.action in ("added", "replaced"):
                fresh[change.model] = await _prepare(service, models_file, change, registry)
    except BaseException:
        await asyncio.gather(*(model.batcher.stop() for model in fresh.values()))
        raise
    if (
        not fresh
        and not any(c.action == "removed" for c in report.changes)
        and defaults == {name for name in registry.defaults.values()}
    ):
        return "unchanged"
    served = []
    for spec in models_file.specs:
        model = fresh.get(spec.name) or registry.models[spec.name]
        model.default = spec.name in defaults
        served.append(model)
    service.registry = ModelRegistry(served)  # the swap: one assignment on the event loop
    retired = [registry.models[c.model] for c in report.changes if c.action in ("replaced", "removed")]
    service.retiring.update(retired)
    for model in fresh.values():
        service.metrics.model_ready.labels(model.name).set(1)
    for change in report.changes:
        if change.action == "removed":
            service.metrics.forget_model(change.model)
    service.in_background(_retire(service, retired))
    return "applied"


async def _prepare(
    service: InferenceService, models_file: ModelsFile, change: ModelChange, registry: ModelRegistry
) -> AnyModel:
    """The new version of ``change.model``: loaded, serving in its own batcher, warmed up, verified."""
    spec = next(s for s in models_file.specs if s.name == change.model)
    try:
        loaded: LoadedModel = await asyncio.to_thread(
            load_entry, models_file, spec, service.settings, service.metrics
        )
    except StartupError as exc:
        raise ReloadFailed("failed", str(exc)) from None
    change.to_version = loaded.version.id
    model = service.serve(loaded)
    model.batcher.start()
    try:
        try:
            await service.warm(model)
        except Exception as exc:
            raise ReloadFailed("failed", f"model {spec.name!r}: warm-up failed: {exc}") from None
        verification = models_file.verifications.get(spec.name)
        old = registry.models.get(spec.name)
        if verification is not None and old is not None:
            change.verification = await verify(old, model, spec, verification)
    except BaseException:
        await model.batcher.stop()
        raise
    return model


async def verify(old: AnyModel, new: AnyModel, spec: ModelSpec, verification: Verification) -> dict[str, Any]:
    """Run ``verification.folder``'s images through both versions (each in its own inference thread)
    and compare: a classifier's top-1 agreement, or for a detector the detections of either version
    (score >= 0.5) matched in the other at IoU >= 0.5 with the same label, over all of them. Raises
    ReloadFailed("rejected") below ``verification.min_agreement``."""
    if old.task != new.task:
        raise ReloadFailed(
            "rejected", f"model {spec.name!r}: the new version is a {new.task} model; it cannot be verified"
        )
    try:
        images = await asyncio.to_thread(load_calibration_images, verification.folder)
    except Exception as exc:
        raise ReloadFailed("failed", f"model {spec.name!r}: verify_dir: {exc}") from None
    reference = await old.batcher.run_in_thread(lambda: reference_outputs(old.predictor, images))
    candidate = await new.batcher.run_in_thread(lambda: reference_outputs(new.predictor, images))
    try:
        result = agreement_report(reference, candidate)
    except ValueError as exc:  # e.g. a classifier whose class count changed
        raise ReloadFailed(
            "rejected", f"model {spec.name!r}: the versions cannot be compared: {exc}"
        ) from None
    if "top1_agreement" in result:
        agreement = float(result["top1_agreement"])
    else:
        compared = result["reference_detections"] + result["extra_detections"]
        agreement = result["matched"] / compared if compared else 1.0
    result["agreement"] = round(agreement, 4)
    result["min_agreement"] = verification.min_agreement
    if agreement < verification.min_agreement:
        raise ReloadFailed(
            "rejected",
            f"model {spec.name!r}: the new version agrees with the old one on {agreement:.1%} of "
            f"{verification.folder}, under the entry's verify_agreement {verification.min_agreement:.1%}",
        )
    return result


async def _retire(service: InferenceService, models: list[AnyModel]) -> None:
    """Stop and free replaced or removed models once no request holds them."""
    for model in models:
        await model.until_idle()
        await model.batcher.stop()
        service.retiring.discard(model)
        log.info("model %s version %s retired", model.name, model.version.id)
    models.clear()
    gc.collect()  # the networks, their batchers and threads are unreferenced now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- workers --------------------------------------------------------------------------------------


class WorkerReloads:
    """One reload across ``VISION_WORKERS`` processes, through their shared folder.

    The worker that takes ``POST /admin/models/reload`` writes a request file and sends SIGHUP to
    the supervisor, which passes it to every worker; each reloads once and writes its report under
    the request's id; the first waits for all of them.
    """

    def __init__(self, folder: Path, slot: int, workers: int) -> None:
        self.folder = folder / "reloads"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.slot = slot
        self.workers = workers

    def request(self) -> str:
        """Ask every worker to reload; the request's id."""
        request_id = uuid.uuid4().hex[:12]
        (self.folder / f"{request_id}.request").touch()
        os.kill(os.getppid(), signal.SIGHUP)
        return request_id

    def pending(self) -> list[str]:
        """Requests this worker has not answered yet."""
        return [
            path.stem
            for path in sorted(self.folder.glob("*.request"))
            if not (self.folder / f"{path.stem}.{self.slot}.json").exists()
        ]

    def answer(self, request_ids: list[str], report: ReloadReport) -> None:
        for request_id in request_ids:
            target = self.folder / f"{request_id}.{self.slot}.json"
            partial = target.with_suffix(".part")
            partial.write_text(json.dumps(report.as_json()))
            partial.replace(target)  # whole or absent for a reader

    async def collect(self, request_id: str, timeout_s: float) -> list[dict[str, Any]]:
        """Every worker's report for ``request_id`` (a worker that did not answer in time gets a
        "failed" entry); the files are removed afterwards."""
        deadline = time.monotonic() + timeout_s
        paths = [self.folder / f"{request_id}.{slot}.json" for slot in range(self.workers)]
        while not all(path.exists() for path in paths) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        reports = []
        for slot, path in enumerate(paths):
            if path.exists():
                reports.append(json.loads(path.read_text()))
                path.unlink()
            else:
                reports.append({"worker": slot, "outcome": "failed", "error": "no answer from this worker"})
        (self.folder / f"{request_id}.request").unlink(missing_ok=True)
        return reports


async def reload_everywhere(service: InferenceService, trigger: str) -> list[dict[str, Any]]:
    """Reload in this process, or with ``VISION_WORKERS`` > 1 in every worker; each one's report."""
    reloads = worker_reloads(service)
    if reloads is None:
        return [(await reload_models(service, trigger)).as_json()]
    request_id = reloads.request()  # this worker reloads on the SIGHUP the supervisor sends back
    return await reloads.collect(request_id, timeout_s=service.settings.reload_timeout_s)


async def on_hangup(service: InferenceService) -> None:
    """SIGHUP: reload, and answer every worker request that is waiting for this process."""
    reloads = worker_reloads(service)
    waiting = reloads.pending() if reloads is not None else []
    report = await reload_models(service, "api" if waiting else "SIGHUP")
    if reloads is not None:
        reloads.answer(waiting, report)


async def answer_after_start(service: InferenceService) -> None:
    """A worker that was starting (or was started again) while the pool was asked to reload may
    have missed the SIGHUP: once its start has ended, it answers the requests still waiting for it."""
    reloads = worker_reloads(service)
    if reloads is None:
        return
    await service.until_started()
    if service.failure is None and reloads.pending():
        await on_hangup(service)


def worker_reloads(service: InferenceService) -> WorkerReloads | None:
    settings = service.settings
    if settings.worker_slot is None or settings.worker_dir is None:
        return None
    return WorkerReloads(settings.worker_dir, settings.worker_slot, settings.workers)


def overall(reports: list[dict[str, Any]]) -> Outcome:
    """The outcome of a reload over all processes: the worst one."""
    order: list[Outcome] = ["failed", "rejected", "applied", "unchanged"]
    return next(o for o in order if any(r.get("outcome") == o for r in reports))

"""Read the models file (TOML) into :class:`models.ModelSpec` entries.

Format (``docs/api.md``, "Starting the service")::

    [[models]]
    name = "ssd-voc"              # [a-z0-9][a-z0-9._-]*, unique
    task = "detect"               # classify | detect
    arch = "ssd300"               # models.ARCHS
    format = "ssd.pytorch"        # models.FORMATS
    weights = "ssd300_mAP_77.43_v2.pth"   # relative to this file's folder
    labels = ["aeroplane", "..."] # or labels_file = "voc.txt"; neither: the checkpoint's / format's own
    sha256 = "..."                # optional, 64 hex digits
    default = true                # at most one per task; none marked: the first of the task
    # classify only: resize, crop, top_k; detect only: score_threshold, iou_threshold, max_detections
    calibration_dir = "calib/"    # optional: images of this model's own kind for VISION_PRECISION=int8
    verify_dir = "verify/"        # optional: on a reload, the new version must answer these images
    verify_agreement = 0.9        #   like the old one on at least this fraction (app.reload)

Every problem raises :class:`ModelsFileError` whose message names the file and the entry.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.schemas import IouThreshold, MaxDetections, ScoreThreshold, TopK
from app.settings import DEFAULT_MODELS_FILE, PUBLIC_MODELS_FILE
from models import ModelConfigError, ModelSpec, Task

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class ModelsFileError(ValueError):
    """The models file is missing, not TOML, or has a bad entry; the message says where."""


class _Entry(BaseModel):
    """One ``[[models]]`` table, as written (``ModelSpec`` checks how the fields fit together)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=128)]
    task: Task
    arch: str
    format: str
    weights: Annotated[str, Field(min_length=1)]
    labels: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    labels_file: str | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    default: bool = False
    resize: Annotated[int, Field(ge=1, le=4096)] | None = None
    crop: Annotated[int, Field(ge=1, le=4096)] | None = None
    top_k: TopK | None = None
    score_threshold: ScoreThreshold | None = None
    iou_threshold: IouThreshold | None = None
    max_detections: MaxDetections | None = None
    calibration_dir: Annotated[str, Field(min_length=1)] | None = None
    verify_dir: Annotated[str, Field(min_length=1)] | None = None
    verify_agreement: Annotated[float, Field(gt=0.0, le=1.0)] | None = None

    @model_validator(mode="after")
    def _one_label_source(self) -> _Entry:
        if self.labels is not None and self.labels_file is not None:
            raise ValueError("give labels or labels_file, not both")
        if self.verify_agreement is not None and self.verify_dir is None:
            raise ValueError("verify_agreement needs verify_dir (the images to compare on)")
        return self


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[dict[str, object]] = Field(default_factory=list)


#: The least agreement a reloaded version needs with the one it replaces, unless the entry says.
DEFAULT_VERIFY_AGREEMENT = 0.9


@dataclass(frozen=True)
class Verification:
    """A reload's check of a new version (``verify_dir``): answer these images like the old one on
    at least ``min_agreement`` of them (classifiers: top-1; detectors: matched detections)."""

    folder: Path
    min_agreement: float


@dataclass(frozen=True)
class ModelsFile:
    """The served models in file order, and the default model name of each task present."""

    path: Path
    specs: list[ModelSpec]
    defaults: dict[str, str]
    #: per-model folders of int8 calibration images (``calibration_dir``), resolved
    calibration_dirs: dict[str, Path] = field(default_factory=dict)
    #: per-model reload checks (``verify_dir``, ``verify_agreement``), resolved
    verifications: dict[str, Verification] = field(default_factory=dict)


def read_models_file(path: Path) -> ModelsFile:
    """Parse and check ``path``; relative ``weights``/``labels_file`` paths resolve against its folder.

    Raises ModelsFileError naming the file (and entry) on any problem.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelsFileError(f"{path}: models file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelsFileError(f"{path}: cannot read the models file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelsFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        document = _File.model_validate(raw)
    except ValidationError as exc:
        raise ModelsFileError(f"{path}: {_describe(exc)} (expected only [[models]] tables)") from None
    if not document.models:
        raise ModelsFileError(f"{path}: no [[models]] entries: nothing to serve")

    folder = path.parent
    specs: list[ModelSpec] = []
    defaults: dict[str, str] = {}
    seen: set[str] = set()
    calibration_dirs: dict[str, Path] = {}
    verifications: dict[str, Verification] = {}
    for index, table in enumerate(document.models):
        where = f"{path}: models[{index}]" + (
            f" ({table['name']!r})" if isinstance(table.get("name"), str) else ""
        )
        try:
            entry = _Entry.model_validate(table)
        except ValidationError as exc:
            raise ModelsFileError(f"{where}: {_describe(exc)}") from None
        if entry.name in seen:
            raise ModelsFileError(f"{where}: the name {entry.name!r} is used twice")
        seen.add(entry.name)
        if entry.default:
            if entry.task in defaults:
                raise ModelsFileError(
                    f"{where}: a second default {entry.task} model (the first is {defaults[entry.task]!r})"
                )
            defaults[entry.task] = entry.name
        if entry.calibration_dir is not None:
            calibration_dirs[entry.name] = folder / entry.calibration_dir
        if entry.verify_dir is not None:
            agreement = entry.verify_agreement or DEFAULT_VERIFY_AGREEMENT
            verifications[entry.name] = Verification(folder / entry.verify_dir, agreement)
        labels = tuple(entry.labels) if entry.labels is not None else None
        if entry.labels_file is not None:
            labels = _read_labels(folder / entry.labels_file, where)
        try:
            spec = ModelSpec(
                name=entry.name,
                task=entry.task,
                arch=entry.arch,
                format=entry.format,
                weights=folder / entry.weights,
                labels=labels,
                sha256=entry.sha256.lower() if entry.sha256 else None,
                resize=entry.resize,
                crop=entry.crop,
                score_threshold=entry.score_threshold,
                iou_threshold=entry.iou_threshold,
                max_detections=entry.max_detections,
                top_k=entry.top_k,
            )
        except ModelConfigError as exc:
            raise ModelsFileError(f"{where}: {str(exc).removeprefix(f'model {entry.name!r}: ')}") from None
        specs.append(spec)
    for spec in specs:  # unmarked tasks: the first model of the task is the default
        defaults.setdefault(spec.task, spec.name)
    return ModelsFile(path, specs, defaults, calibration_dirs, verifications)


def check_weights_exist(models_file: ModelsFile) -> None:
    """Raises ModelsFileError naming every checkpoint file that is not there, and what to do."""
    missing = [spec for spec in models_file.specs if not spec.weights.is_file()]
    if missing:
        names = ", ".join(f"{spec.name} ({spec.weights})" for spec in missing)
        raise ModelsFileError(
            f"{models_file.path}: checkpoint file(s) not found: {names}{how_to_get_weights(models_file.path)}"
        )


def how_to_get_weights(path: Path) -> str:
    """What to do when a shipped models file's checkpoints are not there (empty for other files)."""
    resolved = path.resolve()
    if resolved == DEFAULT_MODELS_FILE.resolve():
        return (
            f"\n{path} serves the demo checkpoints committed under weights/demo/; they are part"
            "\nof the repository, so this checkout is incomplete (git checkout -- weights/demo restores"
            "\nthem), or point VISION_MODELS_FILE at your own models file (see weights/README.md)."
        )
    if resolved == PUBLIC_MODELS_FILE.resolve():
        return (
            f"\n{path} lists public checkpoints that are not in the repository."
            "\nEither run (from the repository root)"
            "\n    python weights/download.py"
            "\nwhich needs the network and checks each file's SHA-256, or point VISION_MODELS_FILE"
            "\nat your own models file (see weights/README.md)."
        )
    return ""


def _read_labels(path: Path, where: str) -> tuple[str, ...]:
    """One label per line; blank lines at the end ignored, blank lines inside refused."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelsFileError(f"{where}: cannot read labels_file {path}: {exc.strerror or exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = tuple(line.strip() for line in lines)
    if not labels:
        raise ModelsFileError(f"{where}: labels_file {path} is empty")
    if "" in labels:
        raise ModelsFileError(f"{where}: labels_file {path} has a blank line at line {labels.index('') + 1}")
    return labels


def _describe(exc: ValidationError) -> str:
    """pydantic errors in one line: ``key: message; key: message``."""
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "entry"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{key}: {message}")
    return "; ".join(parts)

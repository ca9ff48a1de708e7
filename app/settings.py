"""Service settings, read from ``VISION_*`` environment variables and an optional ``.env``.

Every variable the service reads goes through :class:`Settings`. Bad values, and a ``VISION_*``
variable that is not a setting (a misspelling would otherwise be ignored), stop the start:
``python -m app`` prints the message and exits 2. Nothing here runs at import time.

``precision="auto"`` picks bf16 where the hardware does it natively -- a CUDA device that reports
bf16 support, or a CPU with AMX or AVX512-BF16 (``/proc/cpuinfo`` flags ``amx_bf16`` /
``avx512_bf16``) -- and fp32 everywhere else. It never picks int8 or fp16. ``int8`` (CPU only)
loads fp32 weights and quantizes them, calibrated on ``int8_calibration_dir`` (or a models-file
entry's ``calibration_dir``); without calibration images the start stops.

``runtime`` says what runs the networks: torch, or OpenVINO (CPU, fp32 or int8: the optional
openvino extra) behind the same pre- and post-processing. ``auto`` takes OpenVINO where it is
installed and applies, else torch; :attr:`Settings.runtime_choice` resolves it once, with the reason.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
PREFIX = "VISION_"
#: The default models file: the small demo checkpoints committed under ``weights/demo/``.
DEFAULT_MODELS_FILE = Path("weights/models.toml")
#: The public checkpoints' models file; ``weights/download.py`` fetches its checkpoints.
PUBLIC_MODELS_FILE = Path("weights/public.toml")

#: ``VISION_*`` variables that belong to the deployment files (docker compose reads them from the
#: shell to fill in deploy/ and docker-compose.yml), not to the service.
DEPLOYMENT_VARIABLES = frozenset({"VISION_HOST_PORT", "VISION_TORCH_INDEX", "VISION_IMAGE", "VISION_2_GPU"})


#: What can run a served model's network (``VISION_RUNTIME`` resolved).
Runtime = Literal["torch", "openvino"]


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime that runs every model's network, and why (logged at start)."""

    name: Runtime
    reason: str


def _default_decode_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class Settings(BaseSettings):
    """All settings of the service; each field is ``VISION_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_file=".env", env_file_encoding="utf-8", extra="forbid", frozen=True
    )

    models_file: Path = Field(default=DEFAULT_MODELS_FILE, description="TOML list of the served models")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N (auto: cuda when available)")
    precision: Literal["fp32", "bf16", "fp16", "int8", "auto"] = Field(
        default="fp32",
        description="inference dtype; auto = bf16 where the device does it natively, else fp32",
    )
    runtime: Literal["torch", "openvino", "auto"] = Field(
        default="torch",
        description="what runs the networks: torch; openvino (CPU only, fp32 or int8; the openvino extra); "
        "auto = openvino where it is installed and applies, else torch",
    )
    openvino_cache_dir: Path | None = Field(
        default=None,
        description="folder where models converted for runtime openvino are kept and read back by later "
        "starts and by every worker (default: none, each start converts)",
    )
    max_body_bytes: int = Field(default=20 * MiB, gt=0, description="largest request body in bytes")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="largest image (width*height), checked before decoding"
    )
    max_files: int = Field(default=32, gt=0, description="most images in one request")
    max_batch_size: int = Field(default=8, ge=1, le=256, description="most images in one forward pass")
    max_delay_ms: float = Field(
        default=5.0, ge=0, le=10_000, description="how long a batch waits for more images"
    )
    max_queue_images: int = Field(
        default=64, gt=0, description="images waiting per model before 503 OVERLOADED"
    )
    request_timeout_ms: int = Field(
        default=30_000,
        gt=0,
        description="request deadline; X-Request-Timeout-Ms may shorten it, never lengthen",
    )
    docs_enabled: bool = Field(default=True, description="serve /docs, /redoc and /openapi.json")
    ui_enabled: bool = Field(default=True, description="serve the browser page at / (its files under /ui/)")
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads (default: all cores)"
    )
    decode_threads: int = Field(
        default_factory=_default_decode_threads,
        gt=0,
        le=64,
        description="threads that decode and preprocess images",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="serving processes sharing the port, each with its own copy of the models "
        "(app/workers.py); more than one lets one GPU be fed by several cores",
    )
    jpeg_decode: Literal["auto", "device", "cpu"] = Field(
        default="auto",
        description="where JPEGs are decoded: device = on the model's device in the batch (nvJPEG on "
        "CUDA), cpu = PIL in the decode threads; auto = device on CUDA, cpu on the CPU",
    )
    int8_calibration_dir: Path | None = Field(
        default=None,
        description="images of the served models' own kind, for precision=int8 calibration "
        "(a models-file entry's calibration_dir overrides it)",
    )
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="comma-separated API keys (several: rotation); empty = no authentication",
    )
    metrics_public: bool = Field(
        default=True, description="/metrics answers without an API key (health paths always do)"
    )
    cors_origins: str = Field(
        default="", description="comma-separated origins allowed by CORS ('*' = any); empty = no CORS"
    )
    drain_delay_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="after SIGTERM: seconds of 503 DRAINING (readiness and new work) with the socket "
        "still open, so load balancers notice, before the graceful shutdown starts",
    )
    drain_grace_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="graceful shutdown: seconds in-flight requests get to finish before they are cut",
    )
    keep_alive_s: float = Field(
        default=75.0,
        gt=0,
        le=3600,
        description="idle keep-alive connections are closed after this many seconds; longer than the "
        "load balancer's idle timeout (60 s for nginx and most cloud balancers), so that the balancer "
        "closes first and never sends a request on a connection the server is closing",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = Field(default=False, description="one JSON object per log line")
    allocator_tuning: bool = Field(
        default=True,
        description="re-execute the start with glibc malloc tuned for large activation buffers "
        "(app/allocator.py); false leaves the allocator as it is",
    )
    warm_before_listening: bool = Field(
        default=False,
        description="load and warm up every model before the socket opens (a restarted worker does); "
        "by default the socket opens first and /health/ready answers 503 until the models are warm",
    )
    worker_slot: int | None = Field(
        default=None,
        ge=0,
        description="set by the VISION_WORKERS supervisor for each worker process (not for users): "
        "the worker listens on its own SO_REUSEPORT socket",
    )
    worker_dir: Path | None = Field(
        default=None,
        description="set by the VISION_WORKERS supervisor (not for users): the workers' shared folder",
    )
    admin_api_keys: SecretStr = Field(
        default=SecretStr(""),
        description="comma-separated keys for /admin/ (POST /admin/models/reload); needs VISION_API_KEYS; "
        "empty = no /admin/ routes",
    )
    reload_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="how long POST /admin/models/reload waits for every worker's reload",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto":
            from models import ModelConfigError, check_device_name  # torch: only for a named device

            try:
                check_device_name(value)
            except ModelConfigError:
                raise ValueError(f"must be auto, cpu, cuda or cuda:N, not {value!r}") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_int8(self) -> Settings:
        if self.precision == "int8" and self.device.startswith("cuda"):
            raise ValueError(
                "precision int8 runs on the CPU only (x86 quantized kernels); on CUDA use fp16 or bf16"
            )
        return self

    @model_validator(mode="after")
    def _check_runtime(self) -> Settings:
        if self.runtime != "openvino":
            return self
        from models import OPENVINO_PRECISIONS  # torch: only for runtime openvino

        if self.device.startswith("cuda"):
            raise ValueError(
                "runtime openvino runs on the CPU only; set VISION_DEVICE=cpu, or use VISION_RUNTIME=torch "
                "(or auto) on CUDA"
            )
        if self.precision not in OPENVINO_PRECISIONS:
            raise ValueError(
                f"runtime openvino runs precision {' or '.join(OPENVINO_PRECISIONS)}, not {self.precision}; "
                f"set VISION_PRECISION to one of them, or use VISION_RUNTIME=torch (or auto)"
            )
        return self

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        unknown = unknown_variables(os.environ)
        if unknown:
            raise ValueError("; ".join(unknown))
        return self

    @model_validator(mode="after")
    def _admin_keys_need_api_keys(self) -> Settings:
        if self.admin_key_list and not self.api_key_list:
            raise ValueError(
                "VISION_ADMIN_API_KEYS needs VISION_API_KEYS: the admin routes exist only where every "
                "request is authenticated"
            )
        if set(self.admin_key_list) & set(self.api_key_list):
            raise ValueError("a key is in both VISION_API_KEYS and VISION_ADMIN_API_KEYS; keep them apart")
        return self

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.max_queue_images < self.max_files:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must be at least max_files ({self.max_files}), "
                "or a request with max_files images could never be queued"
            )
        return self

    @cached_property
    def torch_device(self) -> str:
        """The device models load on: ``auto`` resolved, the name and CUDA availability checked.

        Raises ValueError (``models.ModelConfigError``) for an unknown name or a missing GPU.
        """
        import torch

        from models import ModelConfigError, resolve_device

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return str(resolve_device(self.device))
        except ModelConfigError as exc:
            raise ValueError(f"VISION_DEVICE: {exc}") from None

    @cached_property
    def torch_precision(self) -> Literal["fp32", "bf16", "fp16"]:
        """The precision models load in: ``auto`` resolved for :attr:`torch_device`; int8 models load
        in fp32 and are then quantized (:attr:`int8`)."""
        if self.precision == "auto":
            return "bf16" if _bf16_native(self.torch_device) else "fp32"
        if self.precision == "int8":
            if self.torch_device != "cpu":
                raise ValueError(
                    f"VISION_PRECISION=int8 runs on the CPU only, but the device is {self.torch_device}: "
                    "set VISION_DEVICE=cpu, or use fp16/bf16 on CUDA"
                )
            return "fp32"
        return self.precision

    @cached_property
    def runtime_choice(self) -> RuntimeChoice:
        """What runs the networks: ``runtime`` resolved for :attr:`torch_device` and the precision,
        with the reason. ``openvino`` is checked (a CPU device, the packages importable); ``auto``
        takes OpenVINO on the CPU at fp32 or int8 when its packages import, else torch.

        Raises ValueError when ``openvino`` cannot run here (the message says what to do).
        """
        if self.runtime == "torch":
            return RuntimeChoice("torch", "VISION_RUNTIME=torch")
        from models import OPENVINO_PRECISIONS, ModelConfigError, require_openvino

        device = self.torch_device
        precision = "int8" if self.int8 else self.torch_precision
        if self.runtime == "openvino":
            if device != "cpu":
                raise ValueError(
                    f"VISION_RUNTIME=openvino runs on the CPU only, but the device is {device}: "
                    "set VISION_DEVICE=cpu, or use VISION_RUNTIME=torch (or auto)"
                )
            try:
                require_openvino(precision)
            except ModelConfigError as exc:
                raise ValueError(f"VISION_RUNTIME=openvino: {exc}") from None
            return RuntimeChoice("openvino", "VISION_RUNTIME=openvino")
        if device != "cpu":
            return RuntimeChoice("torch", f"auto: the device is {device}, and OpenVINO runs on the CPU only")
        if precision not in OPENVINO_PRECISIONS:
            return RuntimeChoice(
                "torch",
                f"auto: OpenVINO runs {' or '.join(OPENVINO_PRECISIONS)}, and the precision is {precision}",
            )
        try:
            modules = require_openvino(precision)
        except ModelConfigError as exc:
            return RuntimeChoice("torch", f"auto: {exc}")
        versions = ", ".join(f"{m.__name__} {m.__version__}" for m in modules if m is not None)
        return RuntimeChoice("openvino", f"auto: {precision} on the CPU, and {versions} installed")

    @property
    def jpeg_on_device(self) -> bool:
        """Whether JPEG uploads are decoded in the batch on the model's device (``jpeg_decode``)."""
        if self.jpeg_decode == "auto":
            return self.torch_device.startswith("cuda")
        return self.jpeg_decode == "device"

    @property
    def int8(self) -> bool:
        """Whether models are quantized to int8 after loading (CPU only, calibrated)."""
        return self.precision == "int8"

    @property
    def api_key_list(self) -> tuple[str, ...]:
        """The API keys (blanks dropped); empty: authentication is off."""
        return _split_list(self.api_keys.get_secret_value())

    @property
    def metrics_dir(self) -> Path | None:
        """The workers' shared folder of Prometheus values (None: a single process)."""
        return self.worker_dir / "metrics" if self.worker_dir is not None else None

    @property
    def queue_share(self) -> int:
        """This process's share of ``max_queue_images``: all of it, or in a worker its 1/N, so the
        pool queues what the setting says (never under ``max_files``: a full request must fit)."""
        if self.worker_slot is None:
            return self.max_queue_images
        return max(self.max_files, -(-self.max_queue_images // self.workers))

    @property
    def admin_key_list(self) -> tuple[str, ...]:
        """The admin keys (blanks dropped); empty: no /admin/ routes."""
        return _split_list(self.admin_api_keys.get_secret_value())

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        """The CORS origins; empty: no CORS headers at all."""
        return _split_list(self.cors_origins)

    @property
    def resolved_torch_threads(self) -> int:
        return self.torch_threads or os.cpu_count() or 1


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``VISION_*`` name in ``environ`` that is no setting, with the closest one."""
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    messages = []
    for name in sorted(environ):
        if name.upper().startswith(PREFIX) and name.upper() not in known | DEPLOYMENT_VARIABLES:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            messages.append(f"{name} is not a setting{hint}")
    return messages


def _split_list(text: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _bf16_native(device: str) -> bool:
    """Whether ``device`` runs bf16 in hardware (see the module docstring)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", cpuinfo, flags=re.MULTILINE)
    return set(match.group(1).split()) if match else set()

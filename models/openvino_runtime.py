"""Run a predictor's network with OpenVINO on the CPU: fp32, or int8 quantized by NNCF.

Only the network changes runtime: :func:`use_openvino` replaces ``Predictor.model`` by an
:class:`OpenVINONetwork`, a module with the same call (FloatTensor[B, 3, H, W] -> logits [B, C], or
an SSD's (loc [B, A, 4], conf [B, A, C])), so the project's preprocessing, default boxes, decoding,
NMS and thresholds still run in torch and the answers stay the project's. Typical use::

    det = load_model(spec, device="cpu", precision="fp32")
    use_openvino(det, "int8", load_calibration_images(Path("calibration/")), cache_dir=Path("ov-cache"))
    det.predict(batch, sizes, params)                      # same call, same outputs' meaning

The torch network is converted once (``torch.export`` with a dynamic batch dimension, then
``openvino.convert_model``); int8 is NNCF's post-training quantization of that OpenVINO model,
calibrated on the preprocessed calibration images one by one. Converted models can be cached on
disk under a key of everything they depend on (:func:`cache_key`). Inference runs with OpenVINO's
latency hint (one request uses every core: the service sends one batch at a time) and an explicit
f32 inference precision: the CPU plugin would otherwise run "fp32" in bf16 on CPUs with bf16
instructions, and fp32 must match torch within the fidelity tolerances.

openvino (and nncf, for int8) are optional packages, imported only when called; missing ones give
a :class:`~models.errors.ModelConfigError` saying what to install.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar, get_args

import torch
from PIL import Image
from torch import Tensor, nn

from models.agreement import apply_with_report
from models.errors import ModelConfigError
from models.predictors import Predictor
from models.preprocess import calibration_batches

P = TypeVar("P", bound="Predictor[Any, Any]")

__all__ = [
    "OPENVINO_PRECISIONS",
    "OpenVINONetwork",
    "OpenVINOPrecision",
    "cache_key",
    "compile_network",
    "convert_network",
    "quantize_network",
    "require_openvino",
    "use_openvino",
    "use_openvino_with_report",
]

OpenVINOPrecision = Literal["fp32", "int8"]
#: The precisions this runtime offers.
OPENVINO_PRECISIONS: tuple[str, ...] = get_args(OpenVINOPrecision)
#: What to install for this runtime (pyproject.toml's extra pins the tested versions).
INSTALL_HINT = "install the project's openvino extra (pip install -e '.[openvino]')"


def require_openvino(precision: str = "fp32") -> tuple[ModuleType, ModuleType | None]:
    """The ``openvino`` module, and ``nncf`` for int8 (None otherwise).

    Raises ModelConfigError naming the missing package when it is not installed, or when
    ``precision`` is not one of :data:`OPENVINO_PRECISIONS`.
    """
    if precision not in OPENVINO_PRECISIONS:
        raise ModelConfigError(
            f"the OpenVINO runtime runs {' or '.join(OPENVINO_PRECISIONS)}, not {precision!r}; "
            "use torch for other precisions"
        )
    try:
        import openvino
    except ImportError as e:
        raise ModelConfigError(
            f"the OpenVINO runtime needs the 'openvino' package, which cannot be imported here ({e}); "
            f"{INSTALL_HINT}, or use the torch runtime"
        ) from e
    if precision != "int8":
        return openvino, None
    try:
        import nncf
    except ImportError as e:
        raise ModelConfigError(
            f"int8 with the OpenVINO runtime needs the 'nncf' package (post-training quantization), which "
            f"cannot be imported here ({e}); {INSTALL_HINT}, or use fp32 or the torch runtime"
        ) from e
    return openvino, nncf


def convert_network(network: nn.Module, input_size: tuple[int, int]) -> Any:
    """``network`` (fp32, on the CPU) as an ``openvino.Model`` with input [?, 3, H, W] (dynamic batch).

    The network is captured by ``torch.export`` (the batch dimension marked dynamic; an example of two
    images, as export specialises a batch of one) and converted from that program; the spatial size
    is then fixed to ``input_size``. Raises ModelConfigError when openvino is missing or the network
    cannot be exported or converted.
    """
    ov, _ = require_openvino("fp32")
    height, width = input_size
    example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(network.eval(), (example,), dynamic_shapes=({0: batch},))
        ov_model = ov.convert_model(program)
        ov_model.reshape([-1, 3, height, width])
    except Exception as e:  # export and the converter raise their own exception types for every failure
        raise ModelConfigError(
            f"OpenVINO {ov.__version__} cannot convert {type(network).__name__}: {str(e).strip()[:500]}"
        ) from e
    return ov_model


def quantize_network(ov_model: Any, calibration: Sequence[Tensor]) -> Any:
    """An int8 copy of ``ov_model`` from NNCF's post-training quantization, calibrated on ``calibration``
    (preprocessed batches FloatTensor[b, 3, H, W], fed one image at a time so that the statistics do
    not depend on how the images were batched). ``ov_model`` is not changed.

    Raises ModelConfigError without calibration images or when nncf is missing or fails.
    """
    _, nncf = require_openvino("int8")
    assert nncf is not None
    images = [image[None].float().contiguous().numpy() for batch in calibration for image in batch]
    if not images:
        raise ModelConfigError(
            "int8 needs calibration images of the model's own kind and none were given; refusing to quantize"
        )
    try:
        return nncf.quantize(ov_model.clone(), nncf.Dataset(images), subset_size=len(images))
    except Exception as e:  # NNCF raises its own exception types
        raise ModelConfigError(f"NNCF {nncf.__version__} cannot quantize the network: {e}") from e


class OpenVINONetwork(nn.Module):
    """A compiled OpenVINO model with a torch network's call: x (FloatTensor[B, 3, H, W] on the CPU,
    any memory format) -> FloatTensor outputs, one tensor or a tuple as the converted network returned.

    One inference request serves the calls, under a lock (a request runs one batch at a time, and
    the latency hint gives it every core). ``precision`` and ``source`` (the cache file, or None) say
    what runs.
    """

    def __init__(self, compiled: Any, precision: str, source: Path | None = None) -> None:
        super().__init__()
        self.compiled = compiled
        self.precision = precision
        self.source = source
        self._outputs = list(compiled.outputs)
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        if x.device.type != "cpu":
            raise ValueError(f"the OpenVINO runtime takes CPU tensors, got one on {x.device}")
        array = x.detach().to(torch.float32).contiguous().numpy()
        with self._lock:
            result = self._request.infer({0: array})  # outputs are copies: the request is reused
            outputs = tuple(torch.from_numpy(result[port]) for port in self._outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def extra_repr(self) -> str:
        return f"precision={self.precision!r}, source={str(self.source) if self.source else None!r}"


def compile_network(ov_model: Any, precision: str, threads: int | None = None) -> OpenVINONetwork:
    """Compile ``ov_model`` for the CPU (latency hint, f32 for whatever int8 does not cover, ``threads``
    inference threads or OpenVINO's default: all cores)."""
    ov, _ = require_openvino("fp32")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return OpenVINONetwork(ov.Core().compile_model(ov_model, "CPU", config), precision)


def _calibration_digest(calibration: Sequence[Tensor]) -> str:
    digest = hashlib.sha256()
    for batch in calibration:
        digest.update(batch.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    sha256: str, arch: str, input_size: tuple[int, int], precision: str, calibration: Sequence[Tensor] = ()
) -> str:
    """The name a converted model is cached under: a digest of the checkpoint's SHA-256, the
    architecture and input size, the precision, the openvino, nncf and torch versions (any of which
    may change the converted graph) and, for int8, the calibration tensors."""
    ov, nncf = require_openvino(precision)
    parts = {
        "checkpoint": sha256,
        "arch": arch,
        "input_size": list(input_size),
        "precision": precision,
        "openvino": ov.__version__,
        "nncf": nncf.__version__ if nncf is not None else None,
        "torch": torch.__version__,
        "calibration": _calibration_digest(calibration) if precision == "int8" else None,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return f"{arch}-{precision}-{digest}"


def _save_atomically(ov: ModuleType, ov_model: Any, xml: Path) -> None:
    """Write ``xml`` and its ``.bin`` so that a reader never sees a half-written pair: both go to
    temporary names in the same folder first; the ``.xml``, whose presence means "cached", is
    renamed last. fp32 weights are kept as they are (``save_model`` would halve them to fp16)."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=".converting-") as tmp:
        tmp_xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp_xml, xml)


def use_openvino(
    predictor: P,
    precision: OpenVINOPrecision,
    images: Sequence[Image.Image] = (),
    *,
    cache_dir: Path | None = None,
    threads: int | None = None,
    batch_size: int = 8,
) -> P:
    """Replace a CPU fp32 predictor's network by an :class:`OpenVINONetwork` at ``precision``.

    int8 is calibrated on ``images`` (the model's own kind, through the predictor's preprocessing) and
    sets ``info.dtype`` to ``"int8"``. With ``cache_dir``, the converted model is read from
    ``<cache_dir>/<cache_key>.xml`` when there, else converted and written there. Returns the same
    predictor.

    Raises ModelConfigError when openvino / nncf are missing, the network cannot be converted or
    quantized, int8 has no images, or the predictor is not a CPU fp32 torch one.
    """
    ov, _ = require_openvino(precision)
    info = predictor.info
    if isinstance(predictor.model, OpenVINONetwork):
        raise ModelConfigError(f"{info.name!r} already runs on OpenVINO ({predictor.model.precision})")
    if predictor.device.type != "cpu" or predictor.dtype != torch.float32 or info.dtype != "float32":
        raise ModelConfigError(
            f"the OpenVINO runtime starts from a CPU fp32 torch model; {info.name!r} is {info.dtype} on "
            f"{predictor.device}: load it with device 'cpu' and precision 'fp32'"
        )
    calibration: list[Tensor] = []
    if precision == "int8":
        if not images:
            raise ModelConfigError(
                f"int8 for {info.name!r} needs calibration images of the model's own kind; none were given"
            )
        calibration = calibration_batches(list(images), predictor.preprocess, batch_size)
    xml = None
    if cache_dir is not None and info.sha256:
        key = cache_key(info.sha256, info.arch, info.input_size, precision, calibration)
        xml = Path(cache_dir) / f"{key}.xml"
    if xml is not None and xml.is_file():
        ov_model = ov.Core().read_model(str(xml))
    else:
        ov_model = convert_network(predictor.model, info.input_size)
        if precision == "int8":
            ov_model = quantize_network(ov_model, calibration)
        if xml is not None:
            _save_atomically(ov, ov_model, xml)
    network = compile_network(ov_model, precision, threads)
    network.source = xml
    predictor.model = network
    if precision == "int8":
        predictor.info = dataclasses.replace(info, dtype="int8")  # info may be shared with a copy
    return predictor


def use_openvino_with_report(
    predictor: P,
    precision: OpenVINOPrecision,
    images: Sequence[Image.Image],
    *,
    report_images: int = 16,
    cache_dir: Path | None = None,
    threads: int | None = None,
) -> tuple[P, dict[str, Any]]:
    """:func:`use_openvino`, plus how closely the OpenVINO network reproduces the torch fp32 one on the
    first ``report_images`` of ``images`` (:func:`~models.agreement.apply_with_report`). For fp32 it is
    the fidelity check, for int8 the accuracy cost, measured in-sample on calibration images."""
    return apply_with_report(
        predictor,
        images,
        lambda p: use_openvino(p, precision, images, cache_dir=cache_dir, threads=threads),
        report_images=report_images,
    )

"""bench.device_check on the CPU: one real run at width 1/8 (the CPU stands in for the device), the
pass/fail rules on crafted reports at and past each bound, and failures that are recorded, not raised."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import bench.device_check as dc
from models import DetectOutput, ModelSpec, Task, agreement_report


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str, Path]:
    """(exit code, JSON document, stdout, work dir) of one small run on the CPU."""
    tmp = tmp_path_factory.mktemp("device_check")
    out = io.StringIO()
    argv = ["--device", "cpu", "--width", "0.125", "--images", "4", "--precisions", "bf16"]
    argv += ["--work-dir", str(tmp / "work"), "--json", str(tmp / "check.json")]
    with contextlib.redirect_stdout(out):
        code = dc.main(argv)
    return code, json.loads((tmp / "check.json").read_text()), out.getvalue(), tmp / "work"


def test_cpu_run_passes_with_identical_answers(cpu_run: tuple[int, dict[str, Any], str, Path]) -> None:
    code, doc, stdout, _ = cpu_run
    assert code == 0 and doc["pass"] is True
    assert doc["schema"] == "vision-serve-device-check/1" and doc["device"] == "cpu"
    assert doc["torch"] == torch.__version__ and doc["cuda"] == torch.version.cuda
    assert doc["width"] == 0.125 and doc["images"] == 4 and doc["image_sizes"][0] == [500, 375]
    assert len({tuple(size) for size in doc["image_sizes"]}) == 4  # varied sizes
    models = doc["models"]
    assert {name: (m["task"], m["format"]) for name, m in models.items()} == {
        "book_vgg16": ("classify", "state_dict"),
        "torchvision_vgg16": ("classify", "torchvision"),
        "book_ssd300": ("detect", "ssd.pytorch"),
    }
    for name, entry in models.items():
        fp32 = entry["fp32_vs_cpu"]
        assert fp32["pass"] is True and fp32["failures"] == [], name
        assert fp32["images"] == 4 and fp32["score_diff_max"] == 0.0, name  # the same CPU kernels
        assert "fp16_vs_fp32" not in entry  # only the precisions asked for
        bf16 = entry["bf16_vs_fp32"]
        assert isinstance(bf16["ok"], bool) and bf16["score_diff_max"] > 0.0, name  # really ran in bf16
    for name in ("book_vgg16", "torchvision_vgg16"):
        assert models[name]["fp32_vs_cpu"]["top1_agreement"] == 1.0
        assert 0.0 <= models[name]["bf16_vs_fp32"]["top1_agreement"] <= 1.0
    ssd = models["book_ssd300"]["fp32_vs_cpu"]
    # the check has power: the confident tiny SSD gives detections >= 0.5 on every image
    assert ssd["reference_detections"] >= 4 and ssd["matched"] == ssd["reference_detections"]
    assert ssd["box_diff_max_px"] == 0.0 and ssd["extra_detections"] == 0 and ssd["high_iou_recall"] == 1.0
    bf16 = models["book_ssd300"]["bf16_vs_fp32"]
    assert 0.0 <= bf16["high_iou_recall"] <= 1.0 and 0.0 <= bf16["recall"] <= 1.0
    assert bf16["ok"] is (bf16["high_iou_recall"] >= 0.9)
    assert "| book_ssd300 | fp32_vs_cpu | pass |" in stdout and "| book_vgg16 | bf16_vs_fp32 |" in stdout
    assert ": PASS" in stdout.splitlines()[0]


def test_book_checkpoints_are_saved_from_cuda0(cpu_run: tuple[int, dict[str, Any], str, Path]) -> None:
    work = cpu_run[3]
    for name, expected in (
        ("book_vgg16", {"cuda:0"}),
        ("book_ssd300", {"cuda:0"}),
        ("torchvision_vgg16", {"cpu"}),
    ):
        seen: set[str] = set()

        def record(storage: Any, location: str, seen: set[str] = seen) -> Any:
            seen.add(location)
            return storage

        torch.load(work / f"{name}_w0.125.pth", map_location=record, weights_only=True)
        assert seen == expected, name


# --------------------------------------------------------------------------- the rules


def _classifier(**changes: Any) -> dict[str, Any]:
    """A classifier report exactly at the bounds."""
    report = {"images": 4, "top1_agreement": 1.0, "score_diff_max": 2e-3}
    return {**report, **changes}


def _detector(**changes: Any) -> dict[str, Any]:
    """A detector report exactly at the bounds."""
    report = {
        "images": 4,
        "reference_detections": 5,
        "matched": 5,
        "recall": 1.0,
        "score_diff_max": 2e-3,
        "box_diff_max_px": 0.5,
        "extra_detections": 0,
        "high_iou_recall": 1.0,
    }
    return {**report, **changes}


def test_fp32_rules_pass_at_the_bounds() -> None:
    assert dc.judge_fp32(_classifier(), "classify") == []
    assert dc.judge_fp32(_classifier(score_diff_max=0.0), "classify") == []
    assert dc.judge_fp32(_detector(), "detect") == []


@pytest.mark.parametrize(
    ("task", "report", "reason"),
    [
        ("classify", _classifier(score_diff_max=3e-3), "probability differs"),
        ("classify", _classifier(top1_agreement=0.75), "top-1 class differs on 1 of 4"),
        ("classify", _classifier(score_diff_max=float("nan")), "probability differs"),
        ("detect", _detector(score_diff_max=3e-3), "score differs"),
        ("detect", _detector(box_diff_max_px=0.6), "box differs"),
        ("detect", _detector(matched=4, recall=0.8), "1 of 5 reference detection(s) not found"),
        ("detect", _detector(extra_detections=1), "1 extra detection"),
    ],
)
def test_fp32_rules_fail_past_each_bound(task: Task, report: dict[str, Any], reason: str) -> None:
    failures = dc.judge_fp32(report, task)
    assert len(failures) == 1 and reason in failures[0], failures


def test_fp32_rule_fails_without_reference_detections() -> None:
    empty = _detector(
        reference_detections=0,
        matched=0,
        recall=None,
        score_diff_max=None,
        box_diff_max_px=None,
        high_iou_recall=None,
    )
    failures = dc.judge_fp32(empty, "detect")
    assert len(failures) == 1 and "no reference detection" in failures[0]
    assert len(dc.judge_fp32({**empty, "extra_detections": 2}, "detect")) == 2


def _detections(
    boxes: Sequence[Sequence[float]], scores: Sequence[float], classes: Sequence[int]
) -> DetectOutput:
    return DetectOutput(torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes))


def test_fp32_rules_read_agreement_reports_keys() -> None:
    """The rules on real ``agreement_report`` outputs: the same keys, the same bounds."""
    reference = [_detections([[10.0, 20.0, 110.0, 220.0], [200.0, 50.0, 300.0, 150.0]], [0.9, 0.7], [3, 7])]

    def shifted(dx: float, score: float = 0.0) -> list[DetectOutput]:
        ref = reference[0]
        return [DetectOutput(ref.boxes + dx, ref.scores + score, ref.class_ids)]

    assert dc.judge_fp32(agreement_report(reference, shifted(0.5, 0.001953125)), "detect") == []
    assert "box differs" in " ".join(dc.judge_fp32(agreement_report(reference, shifted(0.625)), "detect"))
    assert "score differs" in " ".join(
        dc.judge_fp32(agreement_report(reference, shifted(0.0, 0.00390625)), "detect")
    )
    missing = [DetectOutput(reference[0].boxes[:1], reference[0].scores[:1], reference[0].class_ids[:1])]
    assert "not found" in " ".join(dc.judge_fp32(agreement_report(reference, missing), "detect"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert dc.judge_fp32(agreement_report(logits, logits.clone()), "classify") == []
    assert "top-1" in " ".join(dc.judge_fp32(agreement_report(logits, logits.flip(1)), "classify"))


def test_precision_rules() -> None:
    assert dc.precision_ok(_classifier(top1_agreement=0.9), "classify")
    assert not dc.precision_ok(_classifier(top1_agreement=0.875), "classify")
    assert dc.precision_ok(_detector(high_iou_recall=0.9, recall=0.5), "detect")
    assert not dc.precision_ok(_detector(high_iou_recall=0.85, recall=1.0), "detect")
    assert not dc.precision_ok(_detector(high_iou_recall=None), "detect")


def test_bf16_is_skipped_on_gpus_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = dc.unsupported_reason(cuda, "bf16")
    assert reason is not None and "Tesla T4" in reason and "7.5" in reason
    assert dc.unsupported_reason(cuda, "fp16") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert dc.unsupported_reason(cuda, "bf16") is None
    assert dc.unsupported_reason(torch.device("cpu"), "bf16") is None
    assert dc.unsupported_reason(torch.device("cpu"), "fp16") is None


# --------------------------------------------------------------------------- failures are recorded


def test_a_model_that_does_not_load_is_recorded(tmp_path: Path) -> None:
    model = dc.CHECK_MODELS[0]
    entry = dc.check_model(model, tmp_path / "missing.pth", torch.device("cpu"), ["bf16"], [], 4)
    assert "missing.pth" in entry["error"] and "bf16_vs_fp32" not in entry
    assert (
        entry["fp32_vs_cpu"]["pass"] is False
        and "could not load or run" in entry["fp32_vs_cpu"]["failures"][0]
    )


def test_a_precision_that_fails_or_is_skipped_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]])

    def fake_outputs(
        spec: ModelSpec, device: torch.device, precision: str, images: Sequence[Image.Image], batch_size: int
    ) -> torch.Tensor:
        if precision == "fp16":
            raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'")
        return logits.clone()

    monkeypatch.setattr(dc, "_outputs", fake_outputs)
    monkeypatch.setattr(dc, "unsupported_reason", lambda device, p: "no bf16 here" if p == "bf16" else None)
    entry = dc.check_model(
        dc.CHECK_MODELS[1], Path("unused.pth"), torch.device("cpu"), ["fp16", "bf16"], [], 4
    )
    assert entry["fp32_vs_cpu"]["pass"] is True
    assert entry["fp16_vs_fp32"] == {
        "error": "RuntimeError: \"slow_conv2d_cpu\" not implemented for 'Half'",
        "ok": False,
    }
    assert entry["bf16_vs_fp32"] == {"skipped": "no bf16 here", "ok": None}
    doc = {"device": "cpu", "torch": "x", "cuda": None, "width": 1.0, "images": 1, "pass": True}
    table = dc.markdown_table({**doc, "models": {"m": entry}})
    assert (
        "| m | fp16_vs_fp32 | error: RuntimeError" in table
        and "| m | bf16_vs_fp32 | skipped: no bf16 here" in table
    )


def test_setup_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert dc.main(["--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert dc.main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        dc.main(["--device", "cpu", "--precisions", "int8"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        dc.main(["--device", "cpu", "--images", "0"])

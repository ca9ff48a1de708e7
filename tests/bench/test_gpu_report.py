"""bench.gpu_report: one document from a gpu.sh folder (hand-made stage outputs, no GPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from bench import gpu_report
from bench.report import finish
from tests.bench.test_bench_report import closed, overload, server

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="tests.app.test_gpu" name="test_cuda_answers_match_the_cpu" time="1.0"/>
<testcase classname="tests.models.test_detect" name="test_cuda_postprocess_matches_cpu" time="0.1">
<failure message="assert 0.003 &lt;= 0.002">trace</failure></testcase>
<testcase classname="tests.models.test_quantize" name="test_cuda_model_is_refused" time="0.0">
<skipped message="needs CUDA"/></testcase></testsuite></testsuites>"""


#: bench.breakdown's figures for a level: a model thread busy 0.6 of the time, the app's own
#: HTTP work the largest part of the feed
BREAKDOWN = {"requests": 900, "batches": 30, "mean_batch": 48.0, "busy": 0.6, "request_ms": 25.0,
             "decode_ms": 2.0, "queue_wait_ms": 4.0, "batch_ms": 12.0, "stack_ms": 1.5, "run_ms": 10.0,
             "app_other_ms": 7.0}  # fmt: skip


def bench_results(model: str) -> dict[str, Any]:
    """A ``python -m bench --device cuda`` results.json for one model, as finish() leaves it."""
    by_batch = [{"batch": 64, "images_per_s": 4000.0}, {"batch": 256, "images_per_s": 5000.0}]
    ceiling = {"precision": "fp16", "by_batch": by_batch, "best": by_batch[-1]}
    four = server("ours fp16 decode device x4 workers", "ours", "fp16",
                  [closed(64, 2100.0, 30, 80), closed(32, 2400.0, 60, 95, k=8)], [overload()])  # fmt: skip
    four["closed"][0]["breakdown"] = BREAKDOWN  # the 8-image level was not read: no row for it
    four["gpu_memory_mib"] = {"101": {"peak_reserved": 2048.0}, "102": {"peak_reserved": 1900.0}}
    four["nvidia_smi_mib"] = {"101": 2600.0}
    return {
        "machine": {"gpu": "NVIDIA H100 80GB HBM3", "cores": 16, "torch": "2.11.0"},
        "config": {"device": "cuda", "image_size": "500x375", "ours": ["fp16"], "max_batch_size": 64},
        "models": {
            model: {
                "ceiling": [{"results": [ceiling]}],
                "openvino": [],
                "servers": {four["label"]: [four]},
            }
        },
        "errors": [],
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "pytest-gpu.xml").write_text(JUNIT)
    check = {"schema": "vision-serve-device-check/1", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
             "cuda": "13.0", "width": 1.0, "images": 12, "pass": True, "models": {}}  # fmt: skip
    (tmp_path / "device-check.json").write_text(json.dumps(check))
    finish(results := bench_results("vgg16"), tmp_path / "vgg16")
    assert results["models"]["vgg16"]["summary"]["targets"]
    return tmp_path  # no ssd300/: that stage did not run


def test_device_names_become_file_names() -> None:
    assert gpu_report.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_report.device_slug("NVIDIA H200") == "h200"
    assert gpu_report.device_slug(None) == "cpu"


def test_junit_counts_and_names_failures(folder: Path) -> None:
    tests = gpu_report.junit_summary(folder / "pytest-gpu.xml")
    assert tests == {
        "tests": 3,
        "passed": 1,
        "failed": ["tests.models.test_detect::test_cuda_postprocess_matches_cpu"],
        "skipped": ["tests.models.test_quantize::test_cuda_model_is_refused"],
    }
    assert gpu_report.junit_summary(folder / "missing.xml") is None


def test_the_document_holds_every_stage_and_says_what_is_missing(folder: Path) -> None:
    identity = {"name": "NVIDIA H100 80GB HBM3", "memory": "81559 MiB", "driver": "580.1", "torch": "2.11.0",
                "cuda": "13.0", "cudnn": 91000}  # fmt: skip
    doc = gpu_report.compose(folder, "abc1234", identity, "2026-12-05")
    assert doc["missing"] == ["ssd300"] and list(doc["models"]) == ["vgg16"]
    targets = {t["name"]: t for t in doc["models"]["vgg16"]["targets"]}
    fast = targets["ours images/s with p99 <= 100 ms"]
    assert fast["value"] == 2400.0 and fast["met"] is True  # the 8-images-per-request level counts
    assert targets["that level / eager fp16 loop at the service's batch (64)"]["value"] == pytest.approx(0.6)
    text = gpu_report.markdown(doc)
    assert text.startswith("# GPU run: NVIDIA H100 80GB HBM3, 2026-12-05")
    assert "driver 580.1; torch 2.11.0, CUDA 13.0" in text and "commit abc1234" in text
    assert "1 passed, 1 failed, 1 skipped." in text
    assert "- FAILED tests.models.test_detect::test_cuda_postprocess_matches_cpu" in text
    assert (
        "| ours fp16 decode device x4 workers | 32 x 8 | 2400 | 60 | 95 | 0 | 0 | 2048/2600, 1900 |" in text
    )
    assert "| fp16 | 4000 | 5000 |" in text  # the loop per batch size
    # where the time goes: client 30 ms, 25 in the app; 48 images a batch at 4000/s take 12 ms alone
    assert (
        "| ours fp16 decode device x4 workers | 64 x 1 | 2100 | 48.0 | 0.60 | 30.0 | 5.0 | 7.0 | 2.0 "
        "| 4.0 | 1.5 | 10.0 | 12.0 | feed: HTTP/multipart/JSON in the app |" in text
    )
    assert "## ssd300: not measured" in text


def test_main_writes_the_named_files(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    identity = {
        "name": "NVIDIA H200",
        "memory": None,
        "driver": None,
        "torch": "x",
        "cuda": None,
        "cudnn": None,
    }
    monkeypatch.setattr(gpu_report, "gpu_identity", lambda: identity)
    assert gpu_report.main([str(folder), "--commit", "c0ffee", "--date", "2026-12-06"]) == 0
    saved = json.loads((folder / "gpu-h200-2026-12-06.json").read_text())
    assert saved["schema"] == gpu_report.SCHEMA and saved["commit"] == "c0ffee"
    assert saved["best_one_image_levels"]["vgg16"]["images_per_s"] == 2100.0
    assert (folder / "gpu-h200-2026-12-06.md").read_text().startswith("# GPU run: NVIDIA H200, 2026-12-06")


def test_the_gpu_is_named_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 81559, 580.159.04'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    identity = gpu_report.gpu_identity()
    assert (identity["name"], identity["memory"], identity["driver"]) == (
        "NVIDIA H100 80GB HBM3",
        "81559 MiB",
        "580.159.04",
    )
    assert identity["torch"]  # this process's torch
    fake.write_text("#!/bin/sh\nexit 9\n")
    assert gpu_report.gpu_identity()["driver"] is None


def test_the_model_only_time_is_interpolated_at_the_mean_batch() -> None:
    rates = {8: 800.0, 64: 3200.0}  # 10 ms and 20 ms a batch
    assert gpu_report.loop_ms(rates, 8) == pytest.approx(10.0)
    assert gpu_report.loop_ms(rates, 36) == pytest.approx(15.0)  # halfway between the two
    assert gpu_report.loop_ms(rates, 4) == pytest.approx(5.0)  # below: the smallest batch's pace
    assert gpu_report.loop_ms(rates, 128) == pytest.approx(40.0)  # above: the largest's
    assert gpu_report.loop_ms({}, 8) is None


def test_the_limit_is_the_model_when_busy_else_the_feeds_largest_part() -> None:
    assert gpu_report.limit_of({**BREAKDOWN, "busy": 0.9}, 30.0) == "model"
    assert gpu_report.limit_of(BREAKDOWN, 30.0) == "feed: HTTP/multipart/JSON in the app"
    assert gpu_report.limit_of(BREAKDOWN, 40.0) == "feed: outside the app"  # 15 ms outside
    slow_decode = {**BREAKDOWN, "decode_ms": 9.0}
    assert gpu_report.limit_of(slow_decode, None) == "feed: decode"

"""bench/gpu.sh on the GPU path, with a stand-in interpreter that records what it is asked to run:
every stage runs, each command line is one the real programs accept, and $OUT gets few files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bench import device_check
from bench.run import build_parser, resolve_defaults

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/bin/sh
line=""
for a in "$@"; do line="$line$a$(printf '\\037')"; done
printf '%s\\n' "$line" >> "$CALLS"  # one write per call: two stages run at once
exit 0
"""


def run_script(tmp_path: Path) -> tuple[list[list[str]], Path, str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls, out = tmp_path / "calls.txt", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls), "OUT": str(out), "COMMIT": "abc"}
    env["BENCH_WORK"] = str(tmp_path / "work")
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()  # one call a line, its arguments ended by \x1f
    return [line.split("\x1f")[:-1] for line in lines], out, done.stdout


def test_every_stage_runs_with_arguments_the_programs_accept(tmp_path: Path) -> None:
    calls, _, _ = run_script(tmp_path)
    modules = [c[1] for c in calls if c[:1] == ["-m"] and c[1] != "pip"]  # pip: where .whl/ exists
    # the tests and the device check run at once, then the two benches, then the report
    assert sorted(m for m in modules[:2]) == ["bench.device_check", "pytest"]
    assert modules[2:] == ["bench", "bench", "bench.gpu_report"]
    pytest_call = next(c for c in calls if c[1:2] == ["pytest"])
    assert pytest_call[pytest_call.index("-m", 2) + 1] == "gpu or cuda"

    check = next(c for c in calls if c[1:2] == ["bench.device_check"])
    args = device_check.build_parser().parse_args(check[2:])
    assert args.device == "cuda" and args.precisions == ["fp16", "bf16"] and args.width == 1.0

    vgg, ssd = (resolve_defaults(build_parser().parse_args(c[2:])) for c in calls if c[1:2] == ["bench"])
    for run in (vgg, ssd):  # issue 16: fp16, device and CPU decode, 1 and 4 workers, 1 and 8 images
        assert run.device == "cuda" and run.ours == ["fp16"] and run.peers == []
        assert sorted(run.ours_decodes) == ["cpu", "device"] and sorted(run.ours_workers) == [1, 4]
        assert {"x8" in t for t in run.concurrency.split(",")} == {True, False}
        assert run.batches[0] == 1 and run.batches[-1] == 256 and 4.0 in run.open_factors
        assert run.image_size == "500x375" and run.budget_s is not None
    assert vgg.models == ["vgg16"] and ssd.models == ["ssd300"]
    assert vgg.budget_s + ssd.budget_s <= 6 * 60  # with the tests' stage, within 8 minutes


def test_out_gets_the_report_the_log_and_one_archive(tmp_path: Path) -> None:
    calls, out, stdout = run_script(tmp_path)
    report = next(c for c in calls if c[1:2] == ["bench.gpu_report"])
    assert report[3:] == ["--commit", "abc"]
    # the stand-in wrote no report; the device tool brings back at most 8 files, 2 folders deep
    files = sorted(p.name for p in out.iterdir())
    assert files == ["all.tar.gz", "gpu.log"] and not (out / "run").exists()
    assert "gpu.sh: finished" in (out / "gpu.log").read_text() and "gpu.sh: finished" in stdout
    json.dumps(files)  # names the tool can return: letters, digits, '.', '_', '-'

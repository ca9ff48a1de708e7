"""``python -m bench.gpu_report``: one document from everything ``bench/gpu.sh`` measured.

``bench/gpu.sh`` leaves in its folder: ``pytest-gpu.xml`` (the CUDA tests, JUnit XML),
``device-check.json`` (:mod:`bench.device_check`: CUDA against the CPU, fp16 / bf16 against fp32)
and one ``results.json`` of ``python -m bench`` per model (``vgg16/``, ``ssd300/``). This command
reads what is there (a stage that did not run is reported as missing, never guessed) and writes
``gpu-<device>-<date>.md`` and ``.json`` beside them: the device with its driver and torch, the
tests, the correctness checks, every served configuration's levels with GPU memory per worker,
the model-only ceiling per batch size, and issue 16's targets.

    python -m bench.gpu_report bench-results/gpu --commit "$(git rev-parse --short HEAD)"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import primary_levels
from bench.servers import nvidia_smi_rows

SCHEMA = "vision-serve-gpu/1"
#: ``python -m bench`` output folders that gpu.sh writes, one per model.
MODELS: tuple[str, ...] = ("vgg16", "ssd300")


def gpu_identity(timeout_s: float = 20.0) -> dict[str, Any]:
    """name, memory and driver of the first GPU (nvidia-smi), torch / CUDA / cuDNN versions; fields
    that cannot be read are None."""
    info: dict[str, Any] = {"name": None, "memory": None, "driver": None}
    rows = nvidia_smi_rows("gpu=name,memory.total,driver_version", 3, timeout_s)
    if rows:
        name, mib, driver = rows[0]
        info.update(name=name, memory=f"{mib} MiB", driver=driver)
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda)
        cudnn = torch.backends.cudnn
        info["cudnn"] = cudnn.version() if cudnn.is_available() else None  # type: ignore[no-untyped-call]  # torch leaves them unannotated
        if info["name"] is None and torch.cuda.is_available():
            info["name"] = torch.cuda.get_device_name()
    except ImportError:
        info.update(torch=None, cuda=None, cudnn=None)
    return info


def device_slug(name: str | None) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100-80gb-hbm3``; ``cpu`` without a GPU name."""
    if not name:
        return "cpu"
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").split("-")
    return "-".join(w for w in words if w != "nvidia") or "gpu"


def junit_summary(path: Path) -> dict[str, Any] | None:
    """Counts of a pytest JUnit XML file and the ids of the tests that failed or were skipped;
    None where it does not exist or cannot be read."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = list(root.iter("testcase"))
    failed: list[str] = []
    skipped: list[str] = []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(name)
    return {
        "tests": len(cases),
        "passed": len(cases) - len(failed) - len(skipped),
        "failed": failed,
        "skipped": skipped,
    }


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.0f}"


def _memory(run: Mapping[str, Any]) -> str:
    """Per worker: the allocator's peak reserved MiB, and nvidia-smi's MiB for the same process."""
    allocator = run.get("gpu_memory_mib") or {}
    smi = run.get("nvidia_smi_mib") or {}
    if not allocator:
        return "-"
    parts = []
    for pid, kinds in allocator.items():
        seen = smi.get(pid)
        parts.append(
            f"{kinds.get('peak_reserved', kinds.get('reserved', 0)):.0f}" + (f"/{seen:.0f}" if seen else "")
        )
    return ", ".join(parts)


def _levels_table(model: str, results: Mapping[str, Any]) -> list[str]:
    doc = results.get("models", {}).get(model, {})
    summary = doc.get("summary") or {}
    out = [
        "| configuration | clients x images | images/s | p50 ms | p99 ms | 503 | 504 + errors "
        "| GPU MiB per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, server in summary.get("servers", {}).items():
        runs = doc.get("servers", {}).get(label, [])
        memory = _memory(runs[-1]) if runs else "-"
        levels = sorted(
            server.get("closed", []),
            key=lambda lvl: (lvl.get("images_per_request", 1), lvl["concurrency"]),
        )
        if not levels and not server.get("open"):
            out.append(f"| {label} | failed: {'; '.join(server.get('errors', []))[:100]} | | | | | | |")
        for lvl in levels:
            lat = lvl["latency_ms"]
            out.append(
                f"| {label} | {lvl['concurrency']} x {lvl.get('images_per_request', 1):.0f} "
                f"| {lvl['images_per_s']:.0f} | {_ms(lat.get('p50'))} | {_ms(lat.get('p99'))} "
                f"| {lvl['n_503']} | {lvl['n_504'] + lvl['errors']} | {memory} |"
            )
        for lvl in server.get("open", []):
            lat = lvl.get("latency_from_send_ms") or lvl["latency_ms"]
            out.append(
                f"| {label} | open {lvl.get('rate_factor'):g}x ({lvl.get('rate_offered_rps')} req/s) "
                f"| {lvl['images_per_s']:.0f} | {_ms(lat.get('p50'))} | {_ms(lat.get('p99'))} "
                f"| {lvl['n_503']} ({lvl['n_503_without_retry_after']} without Retry-After) "
                f"| {lvl['n_504'] + lvl['errors']} | {memory} |"
            )
    return out


def _ceiling_table(model: str, results: Mapping[str, Any]) -> list[str]:
    rows: dict[str, dict[int, float]] = {}
    for doc in results.get("models", {}).get(model, {}).get("ceiling", []):
        for res in doc.get("results", []):
            for row in res.get("by_batch", []):
                rows.setdefault(res["precision"], {})[row["batch"]] = row["images_per_s"]
    if not rows:
        return ["(no model-only ceiling was measured)"]
    batches = sorted({b for per in rows.values() for b in per})
    out = ["| eager loop, images/s | " + " | ".join(f"batch {b}" for b in batches) + " |"]
    out.append("|---|" + "---|" * len(batches))
    for precision, per in rows.items():
        out.append(
            f"| {precision} | " + " | ".join(f"{per[b]:.0f}" if b in per else "-" for b in batches) + " |"
        )
    return out


def compose(folder: Path, commit: str | None, identity: Mapping[str, Any], date: str) -> dict[str, Any]:
    """The whole document (the JSON) from what ``folder`` holds."""
    runs = {m: read_json(folder / m / "results.json") for m in MODELS}
    return {
        "schema": SCHEMA,
        "date": date,
        "commit": commit,
        "device": dict(identity),
        "pytest": junit_summary(folder / "pytest-gpu.xml"),
        "device_check": read_json(folder / "device-check.json"),
        "models": {
            m: {
                "targets": r.get("models", {}).get(m, {}).get("summary", {}).get("targets", []),
                "machine": r.get("machine"),
                "config": r.get("config"),
                "errors": r.get("errors", []),
                "results": r,
            }
            for m, r in runs.items()
            if r is not None
        },
        "missing": [m for m, r in runs.items() if r is None],
    }


def markdown(document: Mapping[str, Any]) -> str:
    d = {k: ("-" if v is None else v) for k, v in document["device"].items()}
    title = document["device"].get("name") or "no GPU (a CPU smoke test)"
    out = [
        f"# GPU run: {title}, {document['date']}",
        "",
        f"Device: {d.get('name')} ({d.get('memory')}), driver {d.get('driver')}; torch {d.get('torch')}, "
        f"CUDA {d.get('cuda')}, cuDNN {d.get('cudnn')}; commit {document.get('commit') or '?'}. "
        "Written by `bash bench/gpu.sh` (`python -m bench.gpu_report`).",
        "",
        '## CUDA tests (`pytest -m "gpu or cuda"`)',
        "",
    ]
    tests = document.get("pytest")
    if tests is None:
        out.append("Not run, or no JUnit file (see pytest-gpu.log).")
    else:
        out.append(
            f"{tests['passed']} passed, {len(tests['failed'])} failed, {len(tests['skipped'])} skipped."
        )
        out += [f"- FAILED {name}" for name in tests["failed"]]
        out += [f"- skipped {name}" for name in tests["skipped"]]
    out += ["", "## Correctness on the device (`python -m bench.device_check`)", ""]
    check = document.get("device_check")
    if check is None:
        out.append("Not run (see device-check.log).")
    else:
        from bench.device_check import markdown_table  # torch: only where there is a check to show

        out.append(markdown_table(check))
    for model, entry in document.get("models", {}).items():
        results = entry["results"]
        precisions = ", ".join((entry.get("config") or {}).get("ours") or ["?"])
        size = (entry.get("config") or {}).get("image_size", "500x375")
        out += ["", f"## {model}: through HTTP ({size} JPEGs), {precisions}", ""]
        out += _levels_table(model, results)
        out += [
            "",
            "GPU MiB per worker: the allocator's peak reserved / nvidia-smi's figure for that process "
            "(the CUDA context included), one entry per worker.",
            "",
            f"### {model}: model only (random preprocessed tensors, channels_last)",
            "",
        ]
        out += _ceiling_table(model, results)
        out += [
            "",
            f"### {model}: targets",
            "",
            "| target | value | goal | met | note |",
            "|---|---|---|---|---|",
        ]
        for t in entry["targets"]:
            met = {True: "yes", False: "NO", None: "-"}[t["met"]]
            value = f"{t['value']:.2f}" if isinstance(t["value"], float) else t["value"]
            out.append(f"| {t['name']} | {value} | {t['target']} | {met} | {t.get('note', '')} |")
        if entry["errors"]:
            out += ["", "Stage errors:"] + [f"- {e}" for e in entry["errors"]]
    for model in document.get("missing", []):
        out += ["", f"## {model}: not measured (no {model}/results.json; see bench-{model}.log)"]
    return "\n".join(out) + "\n"


def best_levels(document: Mapping[str, Any]) -> dict[str, Any]:
    """Per model, ours' best one-image level: the figure a README line quotes."""
    found: dict[str, Any] = {}
    for model, entry in document.get("models", {}).items():
        summary = entry["results"].get("models", {}).get(model, {}).get("summary", {})
        levels = [
            (label, lvl)
            for label, server in summary.get("servers", {}).items()
            for lvl in primary_levels(server, "500x375")
        ]
        if levels:
            label, lvl = max(levels, key=lambda item: item[1]["images_per_s"])
            found[model] = {
                "label": label,
                "images_per_s": lvl["images_per_s"],
                "p99_ms": lvl["latency_ms"]["p99"],
            }
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="gpu.sh's output folder")
    parser.add_argument("--commit", default=None, help="the commit measured")
    parser.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    args = parser.parse_args(argv)
    date = args.date or dt.datetime.now(dt.UTC).date().isoformat()
    document = compose(args.folder, args.commit, gpu_identity(), date)
    document["best_one_image_levels"] = best_levels(document)
    stem = f"gpu-{device_slug(document['device'].get('name'))}-{date}"
    (args.folder / f"{stem}.json").write_text(json.dumps(document, indent=2, default=str))
    text = markdown(document)
    (args.folder / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {args.folder / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

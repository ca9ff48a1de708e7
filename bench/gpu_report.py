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
import itertools
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
    rows = _loop_rates(model, results)
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


def _loop_rates(model: str, results: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """The model-only ceiling's images/s by precision and batch size."""
    rows: dict[str, dict[int, float]] = {}
    for doc in results.get("models", {}).get(model, {}).get("ceiling", []):
        for res in doc.get("results", []):
            for row in res.get("by_batch", []):
                rows.setdefault(res["precision"], {})[row["batch"]] = row["images_per_s"]
    return rows


def loop_ms(by_batch: Mapping[int, float], batch: float) -> float | None:
    """The model-only loop's ms for one batch of ``batch`` images (a mean, so fractional): the
    measured batch sizes' times, interpolated linearly between the two around it (the nearest
    one's outside them); None without a measurement."""
    points = sorted((b, 1000.0 * b / ips) for b, ips in by_batch.items() if ips > 0)
    if not points:
        return None
    if batch <= points[0][0]:
        return points[0][1] * batch / points[0][0]
    for (b0, t0), (b1, t1) in itertools.pairwise(points):
        if batch <= b1:
            return t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
    return points[-1][1] * batch / points[-1][0]


def limit_of(breakdown: Mapping[str, Any], client_ms: float | None) -> str:
    """What limits a level, from its breakdown: ``model`` when the inference threads were busy
    (>= 0.85 of the time), else the largest of the feed's parts per request."""
    if breakdown["busy"] >= 0.85:
        return "model"
    parts = {
        "outside the app": (client_ms - breakdown["request_ms"])
        if client_ms is not None and breakdown["request_ms"] is not None
        else None,
        "HTTP/multipart/JSON in the app": breakdown["app_other_ms"],
        "decode": breakdown["decode_ms"],
        "batching wait": breakdown["queue_wait_ms"],
    }
    known = {name: value for name, value in parts.items() if value is not None}
    return f"feed: {max(known, key=lambda name: known[name])}" if known else "feed"


def _breakdown_table(model: str, results: Mapping[str, Any]) -> list[str]:
    """Where the time goes, per level of each of our configurations (``bench.breakdown``)."""
    doc = results.get("models", {}).get(model, {})
    rates = _loop_rates(model, results)
    out = [
        "| configuration | clients x images | images/s | mean batch | busy | client ms | outside app "
        "| in app: HTTP, multipart, JSON | decode | batching wait | stack | run | model only | limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = 0
    for label, runs in doc.get("servers", {}).items():
        if not runs or runs[-1].get("kind") != "ours":
            continue
        run = runs[-1]
        for lvl in run.get("closed", []):
            b = lvl.get("breakdown")
            if not b:
                continue
            client = lvl["latency_ms"].get("mean")
            outside = client - b["request_ms"] if client is not None and b["request_ms"] is not None else None
            only = loop_ms(rates.get(run.get("precision", ""), {}), b["mean_batch"])
            out.append(
                f"| {label} | {lvl['concurrency']} x {lvl.get('images_per_request', 1):.0f} "
                f"| {lvl['images_per_s']:.0f} | {b['mean_batch']:.1f} | {b['busy']:.2f} | {_ms1(client)} "
                f"| {_ms1(outside)} | {_ms1(b['app_other_ms'])} | {_ms1(b['decode_ms'])} "
                f"| {_ms1(b['queue_wait_ms'])} | {_ms1(b['stack_ms'])} | {_ms1(b['run_ms'])} | {_ms1(only)} "
                f"| {limit_of(b, client)} |"
            )
            rows += 1
    if not rows:
        return ["(no breakdown: the service's /metrics was not read around the levels)"]
    return out


def _ms1(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


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
        out += ["", f"### {model}: where the time goes (the service's /metrics around each level)", ""]
        out += _breakdown_table(model, results)
        out += [
            "",
            "Mean ms: client (the load generator's latency), outside app (client minus the app's own "
            "request time: the socket, uvicorn's parsing), in app (reading the body, multipart, routing, "
            "the JSON answer, event-loop scheduling), decode (per request), batching wait (per image), "
            "stack (inputs onto the GPU) and run (forward and post-processing, outputs on the host) per "
            "batch, model only (the eager loop above, interpolated at the mean batch). busy: the share "
            "of the time each worker's inference thread ran a batch. limit: model when busy >= 0.85, "
            "else the feed's largest part per request. The app's figures cover the level's warm-up "
            "and drain too, which the client's leave out: with few requests, outside app can come "
            "out below zero.",
        ]
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

"""Turn measurements into the comparison: medians over repeats, ratios against the targets of
issues 4 and 15, a markdown table and a PNG plot of p99 latency against throughput.

The bar of a precision family (int8, bf16, fp32, fp16) is its best model-only runtime: the eager
PyTorch loop (:mod:`bench.ceiling`) or OpenVINO (:mod:`bench.openvino_ceiling`), whichever is faster.

Everything here works on the plain dicts that :mod:`bench.run` stores in ``results.json``, so a
saved file can be re-reported: ``python -m bench.report bench-results/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.stats import median_or_none, median_records

#: Issue 4's targets (CPU).
TARGET_VS_CEILING_CPU = 1.3
#: Issue 15's (CPU): ours at a precision against the best model-only runtime of that precision.
TARGET_VS_BEST_RUNTIME = 0.9
TARGET_VS_PEER_FP32 = 3.0
TARGET_VS_PEER_SAME_PRECISION = 1.3
TARGET_P99_OVER_P50 = 1.5
TARGET_P99_OVER_P50_CLIENTS = 16
#: Issue 16's targets on one H100/H200-class GPU: per model, images/s through HTTP at a level whose
#: p99 stays within the bound, and that level's images/s against the eager fp16 loop at the batch
#: size the service runs (VISION_MAX_BATCH_SIZE).
TARGET_GPU: dict[str, tuple[float, float]] = {"vgg16": (2000.0, 100.0), "ssd300": (1000.0, 150.0)}
TARGET_VS_CEILING_GPU = 0.5
#: VISION_MAX_BATCH_SIZE's default (app/settings.py), where the run did not set --max-batch-size.
SERVICE_MAX_BATCH = 8
OVERLOAD_FACTOR = 4.0
#: Our service's default request deadline (VISION_REQUEST_TIMEOUT_MS), where --deadline-ms is unset.
SERVICE_DEADLINE_MS = 30_000.0
#: An open-loop level whose client sent less than this fraction of its rate did not test the server.
MIN_OFFERED_FRACTION = 0.9
#: Precision families, in the order the tables list them.
PRECISIONS: tuple[str, ...] = ("int8", "bf16", "fp16", "fp32")


def level_key(level: Mapping[str, Any]) -> str:
    """Identifies a level across repeats: mode, clients or rate factor, images per request, size."""
    size = level.get("image_size", "")
    ipr = level.get("images_per_request", 1)
    if level["mode"] == "closed":
        return f"closed c={level['concurrency']} k={ipr} {size}"
    return f"open x{level.get('rate_factor')} k={ipr} {size}"


def merge_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One server configuration's repeated runs -> one record whose levels are field-wise medians."""
    ok_runs = [r for r in runs if r.get("closed") or r.get("open")]  # a failed run keeps its levels
    base = dict(ok_runs[0] if ok_runs else runs[0])
    for mode in ("closed", "open"):
        by_key: dict[str, list[Mapping[str, Any]]] = {}
        for run in ok_runs:
            for level in run.get(mode, []):
                by_key.setdefault(level_key(level), []).append(level)
        base[mode] = [median_records(levels) for levels in by_key.values()]
    base["repeats"] = len(ok_runs)
    base["errors"] = [r["error"] for r in runs if r.get("error")]
    return base


def ceiling_best(docs: Sequence[Mapping[str, Any]], precision: str) -> dict[str, Any] | None:
    """Median over repeats of the best images/s at ``precision``, with the batch of the first, and
    (where the stage measured them) the arithmetic per image, the matmul peak and the fraction of
    that peak the loop reached (medians too)."""
    found = [
        (doc, res)
        for doc in docs
        for res in doc.get("results", [])
        if res.get("precision") == precision and res.get("best")
    ]
    if not found:
        return None
    best: dict[str, Any] = {
        "images_per_s": median_or_none([res["best"]["images_per_s"] for _, res in found]),
        "batch": found[0][1]["best"]["batch"],
        "repeats": len(found),
    }
    gflop = median_or_none([doc["gflop_per_image"] for doc, _ in found if doc.get("gflop_per_image")])
    peak = median_or_none([res["matmul_peak_gflops"] for _, res in found if res.get("matmul_peak_gflops")])
    if gflop is not None and peak is not None:
        best["gflop_per_image"] = gflop
        best["matmul_peak_gflops"] = peak
        best["peak_fraction"] = round(best["images_per_s"] * gflop / peak, 3)
    return best


def model_only_bar(
    eager: Mapping[str, Any] | None, openvino: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The faster of the eager loop and OpenVINO at one precision: its images/s, batch and
    ``runtime`` ("eager PyTorch" or "OpenVINO"); None when neither was measured."""
    found = [(name, best) for name, best in (("eager PyTorch", eager), ("OpenVINO", openvino)) if best]
    if not found:
        return None
    name, best = max(found, key=lambda item: item[1]["images_per_s"])
    return {"images_per_s": best["images_per_s"], "batch": best["batch"], "runtime": name}


def primary_levels(server: Mapping[str, Any], base_size: str) -> list[Mapping[str, Any]]:
    """Closed-loop levels with one image per request at the base image size, by concurrency."""
    levels = [
        lvl
        for lvl in server.get("closed", [])
        if lvl.get("images_per_request", 1) == 1 and lvl.get("image_size", base_size) == base_size
    ]
    return sorted(levels, key=lambda lvl: lvl["concurrency"])


def best_level(levels: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return max(levels, key=lambda lvl: lvl["images_per_s"]) if levels else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _target(
    name: str, value: float | None, target: float, higher_is_better: bool = True, note: str = ""
) -> dict[str, Any]:
    met = None if value is None else (value >= target if higher_is_better else value <= target)
    return {
        "name": name,
        "value": value,
        "target": (">= " if higher_is_better else "<= ") + f"{target:g}",
        "met": met,
        "note": note,
    }


def peak_bound(ceiling: Mapping[str, Any] | None, peer_ips: float | None) -> str:
    """For a target against a peer at a float precision: the most any server could reach over that
    peer at the same arithmetic, running the network at the fastest rate measured on this device
    at that precision (a large matmul's, or the eager loop's own where its kernels beat it)."""
    if not ceiling or "matmul_peak_gflops" not in ceiling or not peer_ips:
        return ""
    loop = ceiling["images_per_s"] * ceiling["gflop_per_image"]
    fastest = max(ceiling["matmul_peak_gflops"], loop)
    most = fastest / ceiling["gflop_per_image"] / peer_ips
    return (
        f"at most {most:.2f} at this arithmetic: the eager loop already runs at "
        f"{ceiling['peak_fraction']:.2f}x a large matmul's GFLOP/s"
    )


def ceiling_at_batch(docs: Sequence[Mapping[str, Any]], precision: str, batch: int) -> dict[str, Any] | None:
    """Median over repeats of the eager loop's images/s at ``precision`` at the measured batch size
    nearest ``batch`` (the smaller one on a tie), with that batch."""
    rows = [
        row
        for doc in docs
        for res in doc.get("results", [])
        if res.get("precision") == precision
        for row in res.get("by_batch", [])
    ]
    if not rows:
        return None
    nearest = min({r["batch"] for r in rows}, key=lambda b: (abs(b - batch), b))
    return {
        "images_per_s": median_or_none([r["images_per_s"] for r in rows if r["batch"] == nearest]),
        "batch": nearest,
    }


def summarize_model(
    doc: Mapping[str, Any],
    device: str,
    base_size: str,
    deadline_ms: float,
    *,
    model: str = "vgg16",
    service_batch: int = SERVICE_MAX_BATCH,
) -> dict[str, Any]:
    """Ratios of one model's measurements against the targets of issues 4 and 15 (CPU) or 16 (GPU)."""
    servers = {label: merge_runs(runs) for label, runs in doc.get("servers", {}).items()}
    ceilings = {p: ceiling_best(doc.get("ceiling", []), p) for p in PRECISIONS}
    openvino = {p: ceiling_best(doc.get("openvino", []), p) for p in PRECISIONS}
    bars = {p: model_only_bar(ceilings[p], openvino[p]) for p in PRECISIONS}
    gpu = device.startswith("cuda")
    ours = {label: s for label, s in servers.items() if s.get("kind") == "ours"}
    ours_best_label, ours_best = None, None
    for label, server in ours.items():
        level = best_level(primary_levels(server, base_size))
        if level is not None and (ours_best is None or level["images_per_s"] > ours_best["images_per_s"]):
            ours_best_label, ours_best = label, level
    ours_ips = ours_best["images_per_s"] if ours_best else None
    ours_precision = servers[ours_best_label]["precision"] if ours_best_label else None
    # The bar is eager PyTorch at its fastest float type (issue 4): bf16 on the CPU, fp16 on a GPU.
    # Going beyond it (int8) is what the CPU target asks for, so int8 never becomes the baseline.
    baseline_precision = "fp16" if gpu else "bf16"
    if ceilings.get(baseline_precision) is None and ours_precision in ("fp32", "bf16", "fp16"):
        baseline_precision = ours_precision
    baseline = ceilings.get(baseline_precision)
    base_ips = baseline["images_per_s"] if baseline else None

    for server in servers.values():  # efficiency of every level against the bar of its precision
        ref = bars.get(str(server.get("precision"))) or baseline
        for level in server.get("closed", []) + server.get("open", []):
            level["efficiency"] = _ratio(level["images_per_s"], ref["images_per_s"] if ref else None)

    targets = (
        []
        if gpu  # issue 16 puts the GPU against the loop at the service's batch size (below)
        else [
            _target(
                f"ours ({ours_precision}) / eager {baseline_precision} ceiling",
                _ratio(ours_ips, base_ips),
                TARGET_VS_CEILING_CPU,
            )
        ]
    )
    ours_by_precision: dict[str, float] = {}
    for server in ours.values():
        level = best_level(primary_levels(server, base_size))
        if level is not None:  # the best configuration (e.g. of several worker counts) per precision
            key = str(server.get("precision"))
            ours_by_precision[key] = max(ours_by_precision.get(key, 0.0), level["images_per_s"])
    if not gpu:  # issue 15: at each precision, against the fastest model-only runtime of that precision
        for precision in PRECISIONS:
            bar = bars[precision]
            if precision in ours_by_precision and bar is not None:
                targets.append(
                    _target(
                        f"ours ({precision}) / best model-only {precision} ({bar['runtime']})",
                        _ratio(ours_by_precision[precision], bar["images_per_s"]),
                        TARGET_VS_BEST_RUNTIME,
                    )
                )
    peers: dict[str, Any] = {}
    for label, server in servers.items():
        if server.get("kind") == "ours":
            continue
        level = best_level(primary_levels(server, base_size))
        peers[label] = level["images_per_s"] if level else None
        precision = str(server.get("precision"))
        if precision == "fp32":
            targets.append(
                _target(
                    f"ours ({ours_precision}) / {label}", _ratio(ours_ips, peers[label]), TARGET_VS_PEER_FP32
                )
            )
            continue
        # "at the same precision": ours at the peer's precision, and ours at its best (e.g. int8)
        if precision in ours_by_precision and precision != ours_precision:
            targets.append(
                _target(
                    f"ours ({precision}) / {label}",
                    _ratio(ours_by_precision[precision], peers[label]),
                    TARGET_VS_PEER_SAME_PRECISION,
                    note=peak_bound(ceilings.get(precision), peers[label]),
                )
            )
        same = precision == ours_precision
        targets.append(
            _target(
                f"ours ({ours_precision}) / {label}",
                _ratio(ours_ips, peers[label]),
                TARGET_VS_PEER_SAME_PRECISION,
                note=peak_bound(ceilings.get(precision), peers[label]) if same else "",
            )
        )
    at16 = None
    if ours_best_label:
        at16 = next(
            (
                lvl
                for lvl in primary_levels(servers[ours_best_label], base_size)
                if lvl["concurrency"] == TARGET_P99_OVER_P50_CLIENTS
            ),
            None,
        )
        if at16 is not None:
            lat = at16["latency_ms"]
            targets.append(
                _target(
                    f"ours p99 / p50 at {TARGET_P99_OVER_P50_CLIENTS} clients",
                    _ratio(lat.get("p99"), lat.get("p50")),
                    TARGET_P99_OVER_P50,
                    higher_is_better=False,
                )
            )
        overload = [
            lvl
            for lvl in servers[ours_best_label].get("open", [])
            if lvl.get("rate_factor") == OVERLOAD_FACTOR
        ]
        if overload:
            lvl = overload[0]
            # the server's view (from the actual send): the deadline runs from arrival at the server
            accepted_p99 = (lvl.get("latency_from_send_ms") or lvl["latency_ms"]).get("p99")
            abandoned = lvl.get("abandoned", 0)
            ok = (
                lvl["errors"] == 0
                and lvl["n_504"] == 0
                and lvl["n_503_without_retry_after"] == 0
                and abandoned == 0  # held past the level's drain: neither answered nor refused in time
                and (accepted_p99 is None or accepted_p99 <= deadline_ms)
            )
            # against what the arrival process drew (a short Poisson level draws a few percent off)
            offered = lvl.get("rate_offered_rps")
            wanted = lvl.get("rate_scheduled_rps") or lvl.get("rate_target_rps")
            short = offered is not None and bool(wanted) and offered < MIN_OFFERED_FRACTION * wanted
            load = (
                f"offered {offered} of {wanted} requests/s, in flight max {lvl.get('in_flight_max')}; "
                if offered is not None
                else ""
            )
            targets.append(
                {
                    "name": f"ours at {OVERLOAD_FACTOR:g}x overload: only 503 + Retry-After, "
                    "accepted p99 <= deadline",
                    "value": f"{load}errors {lvl['errors']}, 504 {lvl['n_504']}, 503 {lvl['n_503']} "
                    f"({lvl['n_503_without_retry_after']} without Retry-After), abandoned {abandoned}, "
                    f"accepted p99 {accepted_p99} ms",
                    "target": f"deadline {deadline_ms:g} ms",
                    "met": None if short else ok,  # a load the client did not offer tests nothing
                    "note": f"the client offered under {MIN_OFFERED_FRACTION:g} of the rate" if short else "",
                }
            )
    gpu_best: dict[str, Any] | None = None
    if gpu and ours:
        # issue 16: the most images/s any of ours' configurations answered at a level (one or
        # several images per request) whose p99 stayed within the model's bound
        want_ips, p99_ms = TARGET_GPU.get(model, TARGET_GPU["vgg16"])
        fast = [
            (label, lvl)
            for label, server in ours.items()
            for lvl in server.get("closed", [])
            if lvl.get("image_size", base_size) == base_size
            and (lvl["latency_ms"].get("p99") or 1e9) <= p99_ms
        ]
        label, top = max(fast, key=lambda item: item[1]["images_per_s"]) if fast else (None, None)
        where = (
            f"{label}, {top['concurrency']} clients x {top.get('images_per_request', 1)} images, "
            f"p99 {top['latency_ms']['p99']:.0f} ms"
            if label and top
            else "no level within the bound"
        )
        targets.append(
            _target(
                f"ours images/s with p99 <= {p99_ms:g} ms",
                top["images_per_s"] if top else None,
                want_ips,
                note=where,
            )
        )
        at_batch = ceiling_at_batch(doc.get("ceiling", []), baseline_precision, service_batch)
        targets.append(
            _target(
                f"that level / eager {baseline_precision} loop at the service's batch "
                f"({at_batch['batch'] if at_batch else service_batch})",
                _ratio(top["images_per_s"] if top else None, at_batch["images_per_s"] if at_batch else None),
                TARGET_VS_CEILING_GPU,
            )
        )
        if top is not None and label is not None:
            gpu_best = {"label": label, **{k: top.get(k) for k in ("concurrency", "images_per_request")}}
            gpu_best.update(images_per_s=top["images_per_s"], p99_ms=top["latency_ms"]["p99"])
            gpu_best["ceiling_at_batch"] = at_batch
    return {
        "ceilings": ceilings,
        "openvino": openvino,
        "bars": bars,
        "baseline_precision": baseline_precision,
        "ours_best": {
            "label": ours_best_label,
            "concurrency": ours_best["concurrency"] if ours_best else None,
            "images_per_s": ours_ips,
        },
        "peers_best_images_per_s": peers,
        "gpu_best_within_p99": gpu_best,
        "targets": targets,
        "servers": servers,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(results: Mapping[str, Any]) -> str:
    """The comparison table and the targets table, per model."""
    out: list[str] = []
    machine = results.get("machine", {})
    out.append(
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
        + (f" ({', '.join(machine['isa'])})" if machine.get("isa") else "")
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {machine.get('torch', '?')}; device {results.get('config', {}).get('device', 'cpu')}"
    )
    base_size = results.get("config", {}).get("image_size", "500x375")
    for model, doc in results.get("models", {}).items():
        summary = doc.get("summary")
        if not summary:
            continue
        out.append(f"\n### {model} ({base_size} JPEGs, one image per request)\n")
        out.append(
            "| configuration | images/s (best, at clients) | p50 / p99 ms at 16 "
            "| 503s / errors (all levels) | vs bar | client CPU |"
        )
        out.append("|---|---|---|---|---|---|")
        bars = summary.get("bars", {})
        arithmetic = []
        for precision in PRECISIONS:
            bar = bars.get(precision)
            rows = [("eager PyTorch loop", summary["ceilings"].get(precision)),
                    ("OpenVINO, throughput hint,", summary.get("openvino", {}).get(precision))]  # fmt: skip
            for runtime, best in rows:
                if best:
                    eff = _ratio(best["images_per_s"], bar["images_per_s"] if bar else None)
                    out.append(
                        f"| {runtime} {precision} (model only) | {_fmt(best['images_per_s'])} "
                        f"(batch {best['batch']}) | - | - | {_fmt(eff, 2)} | - |"
                    )
            ceiling = summary["ceilings"].get(precision)
            if ceiling and "peak_fraction" in ceiling:
                arithmetic.append(
                    f"{precision} {ceiling['images_per_s'] * ceiling['gflop_per_image']:.0f} GFLOP/s = "
                    f"{ceiling['peak_fraction']:.2f} x {ceiling['matmul_peak_gflops']:.0f}"
                )
        for label, server in summary["servers"].items():
            levels = primary_levels(server, base_size)
            best = best_level(levels)
            if best is None:
                out.append(
                    f"| {label} | failed: {'; '.join(server.get('errors', []))[:80]} | - | - | - | - |"
                )
                continue
            at16 = next((lvl for lvl in levels if lvl["concurrency"] == 16), None)
            lat = (
                f"{_fmt(at16['latency_ms']['p50'], 0)} / {_fmt(at16['latency_ms']['p99'], 0)}"
                if at16
                else "-"
            )
            n503 = sum(lvl["n_503"] for lvl in levels)
            errors = sum(lvl["errors"] + lvl["n_504"] for lvl in levels)
            cpu = sum(lvl["client_cpu_s"] for lvl in levels) / max(
                1e-9, sum(lvl["duration_s"] for lvl in levels)
            )
            out.append(
                f"| {label} | {_fmt(best['images_per_s'])} (c={best['concurrency']}) | {lat} "
                f"| {n503} / {errors} "
                f"| {_fmt(best.get('efficiency'), 2)} | {100 * cpu:.1f}% of a core |"
            )
        named = [f"{p} {_fmt(b['images_per_s'])} images/s ({b['runtime']}, batch {b['batch']})"
                 for p, b in bars.items() if b]  # fmt: skip
        if named:
            out.append(
                '\nBar per precision ("vs bar"): the best model-only runtime at that precision: '
                + "; ".join(named)
                + "."
            )
        if arithmetic:
            counted = [c for c in summary["ceilings"].values() if c and "gflop_per_image" in c]
            gflop = counted[0]["gflop_per_image"]
            out.append(
                f"\nArithmetic: {gflop:.1f} GFLOP per image. The eager loops against a large square matmul "
                f"at the same precision on the same cores (GFLOP/s = fraction x matmul peak): "
                + "; ".join(arithmetic)
                + "."
            )
        out.append("\n| target | value | goal | met | note |")
        out.append("|---|---|---|---|---|")
        for t in summary["targets"]:
            met = {True: "yes", False: "NO", None: "-"}[t["met"]]
            note = t.get("note", "")
            out.append(f"| {t['name']} | {_fmt(t['value'], 2)} | {t['target']} | {met} | {note} |")
    errors = results.get("errors", [])
    if errors:
        out.append("\nStage errors:\n" + "\n".join(f"- {e}" for e in errors))
    return "\n".join(out) + "\n"


def plot(results: Mapping[str, Any], path: Path) -> Path | None:
    """p99 latency against images/s, one panel per model, one line per server configuration
    (closed-loop levels, labelled by clients), ceilings as vertical lines. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = [(m, d["summary"]) for m, d in results.get("models", {}).items() if d.get("summary")]
    if not models:
        return None
    base_size = results.get("config", {}).get("image_size", "500x375")
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, (model, summary) in zip(axes[0], models, strict=True):
        for label, server in summary["servers"].items():
            levels = primary_levels(server, base_size)
            pts = [
                (lvl["images_per_s"], lvl["latency_ms"]["p99"], lvl["concurrency"])
                for lvl in levels
                if lvl["latency_ms"]["p99"]
            ]
            if not pts:
                continue
            style = "-o" if server.get("kind") == "ours" else "--s"
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                label=label,
                linewidth=2 if server.get("kind") == "ours" else 1,
            )
            for x, y, c in pts:
                ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        for precision, ceiling in summary["ceilings"].items():
            if ceiling:
                ax.axvline(ceiling["images_per_s"], linestyle=":", color="grey")
                ax.text(
                    ceiling["images_per_s"],
                    ax.get_ylim()[1],
                    f" eager {precision}",
                    rotation=90,
                    va="top",
                    fontsize=7,
                    color="grey",
                )
        for precision, ov in (summary.get("openvino") or {}).items():
            if ov:
                x = ov["images_per_s"]
                ax.axvline(x, linestyle=":", color="purple")
                ax.text(
                    x, ax.get_ylim()[1], f" OpenVINO {precision}", rotation=90, va="top", fontsize=7,
                    color="purple",
                )  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlim(left=0)
        ax.set_xlabel("throughput, images/s")
        ax.set_ylabel("p99 latency, ms (log)")
        ax.set_title(f"{model}: p99 latency vs throughput (labels: clients)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    machine = results.get("machine", {})
    fig.suptitle(
        f"{machine.get('gpu') or machine.get('cpu', '')}, {machine.get('cores', '?')} cores", fontsize=9
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(results: dict[str, Any], out_dir: Path) -> str:
    """Add each model's summary, write results.json, table.md and the plot; the table's text."""
    config = results.get("config", {})
    for model, doc in results.get("models", {}).items():
        doc["summary"] = summarize_model(
            doc,
            config.get("device", "cpu"),
            config.get("image_size", "500x375"),
            float(config.get("deadline_ms") or SERVICE_DEADLINE_MS),
            model=model,
            service_batch=int(config.get("max_batch_size") or SERVICE_MAX_BATCH),
        )
    table = markdown(results)
    picture = plot(results, out_dir / "latency_throughput.png")
    results["outputs"] = {"table": "table.md", "plot": picture.name if picture else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "table.md").write_text(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="re-report a results.json")
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(finish(results, args.results.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())

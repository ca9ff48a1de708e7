"""``python -m bench.soak`` (or ``python -m bench soak``): a soak test of the service on loopback.

Thousands of requests in closed loop against one server process, in rounds; after each round the
server's resident memory (``VmRSS`` in ``/proc/PID/status``), open file descriptors
(``/proc/PID/fd``) and threads (``Threads:``) are sampled. The first ``--warmup`` requests are not
judged (allocator arenas, thread pools and caches fill up then); after them:

- resident memory grows by less than ``--max-rss-growth-pct`` (5 %) from the first sample after the
  warm-up to the last one (the largest sample is reported too, and the slope per 1000 requests);
- file descriptors and threads stay flat: every sample within ``--fd-tolerance`` /
  ``--thread-tolerance`` of the first one after the warm-up (the client's own connections come and
  go between rounds);
- every request is answered 200.

By default it starts ``python -m app`` itself, serving a tiny random-weight VGG16 (from
``tests/checkpoint_factory.py``), or the models of ``--models-file``; ``--port`` and ``--pid``
attach to a server already running instead. Bounded: ``--requests`` in all and ``--max-seconds``;
it stops by itself. Only loopback addresses are targeted (``bench.load.Target``).

Prints a summary and writes everything to ``--out`` (JSON); exits 0 when every check passed, 1
when one failed, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.load import ClosedConfig, Payload, Target, make_payload, run_in_new_loop
from bench.stats import latency_summary_ms

SCHEMA = "vision-serve-soak/1"
TINY_MODEL = "vgg16-tiny"


@dataclass(frozen=True)
class ProcSample:
    """One look at the server process, after ``requests`` requests."""

    requests: int
    seconds: float
    rss_kb: int
    fds: int
    threads: int


def sample_process(pid: int, requests: int = 0, seconds: float = 0.0) -> ProcSample:
    """RSS, open fds and threads of ``pid`` from /proc (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"].strip())
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcSample(requests, round(seconds, 3), rss_kb, fds, threads)


@dataclass(frozen=True)
class Limits:
    max_rss_growth_pct: float = 5.0
    fd_tolerance: int = 8
    thread_tolerance: int = 2


def judge(samples: Sequence[ProcSample], warmup: int, limits: Limits, failed_requests: int) -> dict[str, Any]:
    """The verdict on ``samples`` (in order): only those taken at or after ``warmup`` requests count."""
    judged = [s for s in samples if s.requests >= warmup]
    if len(judged) < 2:
        raise ValueError(
            f"need at least two samples after the warm-up of {warmup} requests, got {len(judged)}"
        )
    first, last = judged[0], judged[-1]
    peak = max(s.rss_kb for s in judged)
    growth = 100.0 * (last.rss_kb - first.rss_kb) / first.rss_kb
    growth_peak = 100.0 * (peak - first.rss_kb) / first.rss_kb
    span = last.requests - first.requests
    slope = 1000.0 * (last.rss_kb - first.rss_kb) / span if span else 0.0
    fd_drift = max(abs(s.fds - first.fds) for s in judged)
    thread_drift = max(abs(s.threads - first.threads) for s in judged)
    checks = {
        "rss_growth": growth < limits.max_rss_growth_pct,
        "fds_flat": fd_drift <= limits.fd_tolerance,
        "threads_flat": thread_drift <= limits.thread_tolerance,
        "all_answered_200": failed_requests == 0,
    }
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "limits": asdict(limits),
        "warmup_requests": warmup,
        "judged_requests": span,
        "rss_kb": {"after_warmup": first.rss_kb, "last": last.rss_kb, "peak": peak},
        "rss_growth_pct": round(growth, 3),
        "rss_peak_growth_pct": round(growth_peak, 3),
        "rss_kb_per_1000_requests": round(slope, 3),
        "fds": {"after_warmup": first.fds, "last": last.fds, "max_drift": fd_drift},
        "threads": {"after_warmup": first.threads, "last": last.threads, "max_drift": thread_drift},
        "failed_requests": failed_requests,
    }


def drive_round(
    target: Target, payload: Payload, requests: int, clients: int, max_seconds: float
) -> dict[str, Any]:
    """``requests`` requests in closed loop from ``clients`` clients (within ``max_seconds``):
    how many were sent, how many were not answered 200, and the round's rate, latency and statuses."""
    config = ClosedConfig(
        concurrency=clients, max_requests=requests, max_seconds=max_seconds, warmup_requests=0
    )
    run = run_in_new_loop("closed", target, [payload], config, 0)  # every request's sample
    statuses = Counter(sample.status for sample in run.samples)
    seconds = max(
        1e-9,
        max((x.end for x in run.samples), default=0) - min((x.start for x in run.samples), default=0),
    )
    return {
        "requests": len(run.samples),
        "failed": len(run.samples) - statuses.get(200, 0),
        "requests_per_s": round(len(run.samples) / seconds, 1),
        "latency_ms": latency_summary_ms([x.end - x.start for x in run.samples if x.status == 200]),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
    }


def soak(
    port: int,
    pid: int,
    path: str,
    body: bytes,
    *,
    requests: int,
    warmup: int,
    sample_every: int,
    clients: int,
    max_seconds: float,
    limits: Limits,
) -> dict[str, Any]:
    """Drive ``POST path`` on 127.0.0.1:``port`` in rounds of ``sample_every`` requests, sampling
    ``pid`` after each round (and once before the first)."""
    target = Target(port=port, path=path)
    payload = make_payload("soak", [body], "raw")
    start = time.monotonic()
    samples = [sample_process(pid)]
    sent = 0
    failed = 0
    rounds: list[dict[str, Any]] = []
    while sent < requests:
        left = max_seconds - (time.monotonic() - start)
        if left <= 1:
            break
        one = drive_round(target, payload, min(sample_every, requests - sent), clients, left)
        sent += one["requests"]
        failed += one.pop("failed")
        rounds.append(one)
        samples.append(sample_process(pid, sent, time.monotonic() - start))
        if not one["requests"]:
            break
    verdict = judge(samples, min(warmup, sent), limits, failed)
    return {
        "schema": SCHEMA,
        "path": path,
        "clients": clients,
        "requests": sent,
        "seconds": round(time.monotonic() - start, 3),
        "verdict": verdict,
        "samples": [asdict(s) for s in samples],
        "rounds": rounds,
    }


def tiny_models_file(folder: Path) -> Path:
    """A models file serving one tiny random-weight VGG16 (``tests/checkpoint_factory.py``)."""
    from tests.checkpoint_factory import write_torchvision_vgg16

    write_torchvision_vgg16(folder / "vgg16_tiny.pth", width=1 / 16)
    path = folder / "models.toml"
    path.write_text(
        f'[[models]]\nname = "{TINY_MODEL}"\ntask = "classify"\narch = "vgg16"\nformat = "torchvision"\n'
        'weights = "vgg16_tiny.pth"\n'
    )
    return path


def soak_image(width: int, height: int) -> bytes:
    """A JPEG of a real photo (``bench.inputs``) fitted to ``width`` x ``height``."""
    from bench.inputs import encode_jpeg, fit, source_photos

    photos, _ = source_photos()
    return encode_jpeg(fit(photos[0][1], width, height))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=5000, help="requests in all, warm-up included")
    p.add_argument("--warmup", type=int, default=1000, help="requests before the judged window")
    p.add_argument("--sample-every", type=int, default=250, help="requests per round (one sample each)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (keep-alive connections)")
    p.add_argument("--max-seconds", type=float, default=600, help="stop after this long whatever the count")
    p.add_argument("--image-size", default="320x240", help="WxH of the JPEG sent (one image per request)")
    p.add_argument("--models-file", type=Path, help="serve these models (default: a tiny VGG16)")
    p.add_argument("--model", help="the model to call (default: the tiny one, or the file's first)")
    p.add_argument("--port", type=int, help="attach to a server on 127.0.0.1:PORT (with --pid)")
    p.add_argument("--pid", type=int, help="the attached server's process id")
    p.add_argument("--path", help="request path (default: /v1/models/MODEL/predict)")
    p.add_argument("--torch-threads", type=int, default=1, help="VISION_TORCH_THREADS of a started server")
    p.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    p.add_argument("--fd-tolerance", type=int, default=8)
    p.add_argument("--thread-tolerance", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.port is None) != (args.pid is None):
        print("bench.soak: --port and --pid go together", file=sys.stderr)
        return 2
    if args.warmup >= args.requests or args.sample_every < 1:
        print("bench.soak: --warmup must be below --requests, --sample-every at least 1", file=sys.stderr)
        return 2
    width, _, height = args.image_size.partition("x")
    body = soak_image(int(width), int(height))
    limits = Limits(args.max_rss_growth_pct, args.fd_tolerance, args.thread_tolerance)
    options: dict[str, Any] = dict(
        requests=args.requests,
        warmup=args.warmup,
        sample_every=args.sample_every,
        clients=args.clients,
        max_seconds=args.max_seconds,
        limits=limits,
    )
    if args.port is not None:
        path = args.path or f"/v1/models/{args.model or TINY_MODEL}/predict"
        result = soak(args.port, args.pid, path, body, **options)
    else:
        result = _soak_own_server(args, body, options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"written: {args.out}")
    return 0 if result["verdict"]["passed"] else 1


def _soak_own_server(args: argparse.Namespace, body: bytes, options: dict[str, Any]) -> dict[str, Any]:
    from bench.servers import ServerConfig, ServerProcess

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        models_file = args.models_file or tiny_models_file(Path(tmp))
        model = args.model or (TINY_MODEL if args.models_file is None else None)
        if model is None:
            import tomllib

            model = tomllib.loads(models_file.read_text())["models"][0]["name"]
        env = {
            "VISION_MODELS_FILE": str(models_file.resolve()),
            "VISION_DEVICE": "cpu",
            "VISION_TORCH_THREADS": str(args.torch_threads),
            "VISION_LOG_LEVEL": "WARNING",  # no access log line per request
        }
        path = args.path or f"/v1/models/{model}/predict"
        config = ServerConfig(
            "soak", "ours", "fp32", "app", ("--host", "127.0.0.1"), "/health/ready", path, env
        )
        with ServerProcess(config, Path(tmp) / "server.log") as server:
            server.wait_ready(300)
            assert server.proc is not None
            result = soak(server.port, server.proc.pid, path, body, **options)
        result["server"] = {
            "models_file": str(models_file),
            "model": model,
            "torch_threads": args.torch_threads,
        }
        return result


def summary(result: dict[str, Any]) -> str:
    v = result["verdict"]
    mark = {True: "ok", False: "FAILED"}
    lines = [
        f"soak: {result['requests']} requests in {result['seconds']:.0f} s, {result['clients']} clients, "
        f"{v['failed_requests']} failed ({mark[v['checks']['all_answered_200']]})",
        f"  RSS after {v['warmup_requests']} warm-up requests {v['rss_kb']['after_warmup'] / 1024:.1f} MiB, "
        f"last {v['rss_kb']['last'] / 1024:.1f} MiB: {v['rss_growth_pct']:+.2f} % "
        f"(peak {v['rss_peak_growth_pct']:+.2f} %, {v['rss_kb_per_1000_requests']:+.1f} kB/1000 requests) "
        f"< {v['limits']['max_rss_growth_pct']} %: {mark[v['checks']['rss_growth']]}",
        f"  fds {v['fds']['after_warmup']} -> {v['fds']['last']} (drift {v['fds']['max_drift']}): "
        f"{mark[v['checks']['fds_flat']]}",
        f"  threads {v['threads']['after_warmup']} -> {v['threads']['last']} "
        f"(drift {v['threads']['max_drift']}): {mark[v['checks']['threads_flat']]}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

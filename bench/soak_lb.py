"""``python -m bench.soak_lb`` (or ``python -m bench soak-lb``): the soak through the load balancer.

Two replicas (``python -m app``, a tiny VGG16 unless ``--models-file``) behind the shipped
``deploy/nginx`` config under a real nginx (``bench.balancer``), all on 127.0.0.1. Closed-loop
clients send ``--requests`` through nginx in rounds of ``--sample-every``; after each round every
replica process's RSS, open file descriptors and threads are read from /proc. When
``--restart-at`` of the requests are sent, replica 2 is restarted as a deploy does it, while the
clients go on: SIGTERM (its drain: ``--drain-delay-s`` of 503 DRAINING, then the requests in
flight finish), then a new process on the same port.

The verdict (``bench.soak.judge``, for each process: replica 2 has one before and one after its
restart): every request answered 200, none lost to the restart; and after each process's own first
``--warmup`` requests, RSS grows less than ``--max-rss-growth-pct`` and fds and threads stay within
their tolerances. A process with fewer than two samples after its warm-up is reported, not judged.

Bounded by ``--requests`` and ``--max-seconds``; it stops by itself. Writes ``--out`` (JSON), prints
a summary; exits 0 when every check passed, 1 when one failed, 2 when the run could not be made.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.balancer import Nginx, restartable_port
from bench.load import Target, make_payload
from bench.servers import ServerConfig, ServerProcess
from bench.soak import (
    TINY_MODEL,
    Limits,
    ProcSample,
    drive_round,
    judge,
    sample_process,
    soak_image,
    tiny_models_file,
)

SCHEMA = "vision-serve-soak-lb/1"


@dataclass
class Life:
    """One replica process: its samples, and the request count when it started taking requests."""

    replica: str
    pid: int
    started_at_request: int
    samples: list[ProcSample] = field(default_factory=list)


class Replica:
    """``python -m app`` on a fixed port of 127.0.0.1 that can be restarted there."""

    def __init__(self, name: str, env: dict[str, str], path: str, folder: Path) -> None:
        self.name = name
        self.port = restartable_port()
        self.config = ServerConfig(
            name, "ours", "fp32", "app", ("--host", "127.0.0.1"), "/health/ready", path, env
        )
        self.folder = folder
        self.starts = 0
        self.process: ServerProcess | None = None

    def start(self, ready_timeout_s: float) -> int:
        """Start a process and wait until it is ready; its pid."""
        self.starts += 1
        self.process = ServerProcess(self.config, self.folder / f"{self.name}-{self.starts}.log", self.port)
        self.process.start()
        self.process.wait_ready(ready_timeout_s, in_a_row=1)
        assert self.process.proc is not None
        return self.process.proc.pid

    def stop(self, grace_s: float) -> None:
        if self.process is not None:
            self.process.stop(grace_s)
            self.process = None


def soak_lb(
    replicas: Sequence[Replica],
    nginx_port: int,
    path: str,
    body: bytes,
    *,
    requests: int,
    warmup: int,
    sample_every: int,
    clients: int,
    restart_at: float,
    stop_grace_s: float,
    ready_timeout_s: float,
    max_seconds: float,
    limits: Limits,
) -> dict[str, Any]:
    """Drive ``requests`` through nginx and restart the last replica once; the result and verdict."""
    target = Target(port=nginx_port, path=path)
    payload = make_payload("soak", [body], "raw")
    start = time.monotonic()
    lives: list[Life] = []
    current: dict[str, Life] = {}
    for r in replicas:
        assert r.process is not None and r.process.proc is not None
        current[r.name] = Life(r.name, r.process.proc.pid, 0)
        lives.append(current[r.name])
    lock = threading.Lock()
    restarted = replicas[-1]
    restart_error: list[BaseException] = []
    restart_thread: threading.Thread | None = None
    restart_window: dict[str, float] = {}

    def restart(sent: int) -> None:
        try:
            with lock:
                del current[restarted.name]  # not sampled while it drains and starts
            restart_window["requested_at_request"] = sent
            restart_window["signal_s"] = time.monotonic() - start
            restarted.stop(stop_grace_s)
            restart_window["stopped_s"] = time.monotonic() - start
            pid = restarted.start(ready_timeout_s)
            restart_window["ready_s"] = time.monotonic() - start
            with lock:
                life = Life(restarted.name, pid, sent_box[0])
                current[restarted.name] = life
                lives.append(life)
        except BaseException as exc:  # reported in the result; the run goes on without it
            restart_error.append(exc)

    sent_box = [0]  # read by the restart thread for the new process's first request count
    failed = 0
    rounds: list[dict[str, Any]] = []
    sample_all(current, lock, 0, 0.0)
    while sent_box[0] < requests:
        left = max_seconds - (time.monotonic() - start)
        if left <= 1:
            break
        if restart_thread is None and sent_box[0] >= restart_at * requests:
            restart_thread = threading.Thread(target=restart, args=(sent_box[0],), daemon=True)
            restart_thread.start()
        one = drive_round(target, payload, min(sample_every, requests - sent_box[0]), clients, left)
        sent_box[0] += one["requests"]
        failed += one.pop("failed")
        rounds.append(one)
        sample_all(current, lock, sent_box[0], time.monotonic() - start)
        if not one["requests"]:
            break
    if restart_thread is not None:
        restart_thread.join(timeout=stop_grace_s + ready_timeout_s + 30)

    verdicts = []
    for life in lives:
        entry: dict[str, Any] = {
            "replica": life.replica,
            "pid": life.pid,
            "from_request": life.started_at_request,
        }
        try:
            entry["verdict"] = judge(life.samples, life.started_at_request + warmup, limits, 0)
        except ValueError as exc:
            entry["not_judged"] = str(exc)
        entry["samples"] = [asdict(s) for s in life.samples]
        verdicts.append(entry)
    restarted_ok = not restart_error and restart_thread is not None and len(lives) == len(replicas) + 1
    checks = {
        "all_answered_200": failed == 0,
        "restarted_midway": restarted_ok,
        "processes_flat": all(v["verdict"]["passed"] for v in verdicts if "verdict" in v),
    }
    return {
        "schema": SCHEMA,
        "path": path,
        "clients": clients,
        "requests": sent_box[0],
        "failed_requests": failed,
        "seconds": round(time.monotonic() - start, 3),
        "restart": {**restart_window, "error": repr(restart_error[0]) if restart_error else None},
        "passed": all(checks.values()),
        "checks": checks,
        "processes": verdicts,
        "rounds": rounds,
    }


def sample_all(current: dict[str, Life], lock: threading.Lock, requests: int, seconds: float) -> None:
    """One sample of every replica process that is up (a process gone meanwhile is skipped)."""
    with lock:
        for life in current.values():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone meanwhile
                life.samples.append(sample_process(life.pid, requests, seconds))


def nginx_counts(log_lines: Sequence[str]) -> dict[str, int]:
    """From nginx's log: requests that tried more than one replica, those sent again after a 503
    (``$upstream_addr`` has " : " between the passes), and how often a replica left the rotation."""
    tried = [m.group(1) for m in (_UPSTREAMS.search(line) for line in log_lines) if m]
    return {
        "retried_requests": sum(1 for t in tried if "," in t or " : " in t),
        "second_pass_requests": sum(1 for t in tried if " : " in t),
        "replicas_taken_out": sum(1 for line in log_lines if "upstream server temporarily disabled" in line),
    }


_UPSTREAMS = re.compile(r" upstream=(.*) upstream_status=")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak_lb", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests through nginx in all")
    p.add_argument("--warmup", type=int, default=1000, help="requests before each process is judged")
    p.add_argument("--sample-every", type=int, default=250, help="requests per round (one sample each)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (keep-alive connections)")
    p.add_argument("--restart-at", type=float, default=0.5, help="restart replica 2 after this share")
    p.add_argument("--drain-delay-s", type=float, default=1.0, help="the replicas' VISION_DRAIN_DELAY_S")
    p.add_argument("--max-seconds", type=float, default=900, help="stop after this long whatever the count")
    p.add_argument("--image-size", default="320x240", help="WxH of the JPEG sent (one image per request)")
    p.add_argument("--models-file", type=Path, help="serve these models (default: a tiny VGG16)")
    p.add_argument("--model", help="the model to call (default: the tiny one, or the file's first)")
    p.add_argument("--torch-threads", type=int, default=1, help="VISION_TORCH_THREADS of each replica")
    p.add_argument("--max-rss-growth-pct", type=float, default=5.0)
    p.add_argument("--fd-tolerance", type=int, default=8)
    p.add_argument("--thread-tolerance", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-results/soak_lb.json"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup >= args.requests or args.sample_every < 1 or not 0 < args.restart_at < 1:
        print(
            "bench.soak_lb: --warmup must be below --requests, --sample-every at least 1, "
            "--restart-at between 0 and 1",
            file=sys.stderr,
        )
        return 2
    width, _, height = args.image_size.partition("x")
    body = soak_image(int(width), int(height))
    limits = Limits(args.max_rss_growth_pct, args.fd_tolerance, args.thread_tolerance)
    with tempfile.TemporaryDirectory(prefix="soak-lb-") as tmp:
        folder = Path(tmp)
        models_file = args.models_file or tiny_models_file(folder)
        model = args.model or (TINY_MODEL if args.models_file is None else None)
        if model is None:
            import tomllib

            model = tomllib.loads(models_file.read_text())["models"][0]["name"]
        path = f"/v1/models/{model}/predict"
        env = {
            "VISION_MODELS_FILE": str(models_file.resolve()),
            "VISION_DEVICE": "cpu",
            "VISION_TORCH_THREADS": str(args.torch_threads),
            "VISION_LOG_LEVEL": "WARNING",  # no access log line per request
            "VISION_DRAIN_DELAY_S": str(args.drain_delay_s),
            "VISION_DRAIN_GRACE_S": "10",
        }
        replicas = [Replica(f"replica-{i}", env, path, folder) for i in (1, 2)]
        nginx: Nginx | None = None
        try:
            for r in replicas:
                r.start(300)
            nginx = Nginx(folder, [r.port for r in replicas])
            nginx.wait_answering()
            result = soak_lb(
                replicas,
                nginx.port,
                path,
                body,
                requests=args.requests,
                warmup=args.warmup,
                sample_every=args.sample_every,
                clients=args.clients,
                restart_at=args.restart_at,
                stop_grace_s=args.drain_delay_s + 10 + 15,
                ready_timeout_s=300,
                max_seconds=args.max_seconds,
                limits=limits,
            )
            lines = nginx.log_lines()
        except (RuntimeError, OSError) as exc:
            print(f"bench.soak_lb: could not run: {exc}", file=sys.stderr)
            return 2
        finally:
            if nginx is not None:
                nginx.close()
            for r in replicas:
                r.stop(15)
        result["nginx"] = nginx_counts(lines)
        result["server"] = {
            "model": model,
            "torch_threads": args.torch_threads,
            "drain_delay_s": args.drain_delay_s,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"written: {args.out}")
    return 0 if result["passed"] else 1


def summary(result: dict[str, Any]) -> str:
    mark = {True: "ok", False: "FAILED"}
    restart = result["restart"]
    lines = [
        f"soak through nginx: {result['requests']} requests in {result['seconds']:.0f} s, "
        f"{result['clients']} clients, {result['failed_requests']} not answered 200 "
        f"({mark[result['checks']['all_answered_200']]})",
        f"  replica-2 restarted after {restart.get('requested_at_request', '-')} requests: SIGTERM at "
        f"{restart.get('signal_s', 0):.1f} s, gone at {restart.get('stopped_s', 0):.1f} s, ready again at "
        f"{restart.get('ready_s', 0):.1f} s ({mark[result['checks']['restarted_midway']]})",
    ]
    for p in result["processes"]:
        head = f"  {p['replica']} pid {p['pid']} (from request {p['from_request']}): "
        if "verdict" not in p:
            lines.append(head + f"not judged ({p['not_judged']})")
            continue
        v = p["verdict"]
        lines.append(
            head + f"RSS {v['rss_kb']['after_warmup'] / 1024:.1f} -> {v['rss_kb']['last'] / 1024:.1f} MiB "
            f"({v['rss_growth_pct']:+.2f} %, peak {v['rss_peak_growth_pct']:+.2f} %), "
            f"fds {v['fds']['after_warmup']} -> {v['fds']['last']} (drift {v['fds']['max_drift']}), "
            f"threads {v['threads']['after_warmup']} -> {v['threads']['last']} "
            f"(drift {v['threads']['max_drift']}): {mark[v['passed']]}"
        )
    if "nginx" in result:
        n = result["nginx"]
        lines.append(
            f"  nginx: {n['retried_requests']} requests tried a second replica, {n['second_pass_requests']} "
            f"after a 503; a replica taken out of rotation {n['replicas_taken_out']} times"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: the whole comparison in one command.

Stages, per model, each time-boxed, a failure recorded and the next stage run:

1. inputs (once): the JPEGs and random full-size checkpoints (:mod:`bench.inputs`);
2. the eager PyTorch ceiling at each precision (:mod:`bench.ceiling`, a process of its own with
   the allocator settings), every repeat;
3. OpenVINO's model-only throughput (:mod:`bench.openvino_ceiling`) at the ceiling's precisions
   (int8 quantized by NNCF on the same calibration images), first repeat only (CPU); the report's
   bar for each precision is the faster of the two model-only runtimes;
4. each server configuration, one process at a time: ours (``python -m app``) at each precision
   and runtime asked for (``--ours-runtimes torch,openvino``: OpenVINO at fp32 and int8, labelled
   e.g. "ours int8 openvino"), then the peers (plain FastAPI, LitServe) at fp32 and at ours'
   precision. Each is started, polled until ready, swept in closed loop over the clients levels,
   driven in open loop at multiples of the capacity it just showed, and stopped. Repeats rotate
   the order (interleaving).

Level tokens (``--concurrency``): ``C`` clients, ``CxK`` with K images per request, ``@WxH`` for
another image size: ``1,4,16,32x8,16@1920x1080``.

Outputs in ``--out``: ``results.json`` (everything, plus per-model summaries and targets),
``table.md`` (printed at the end), ``latency_throughput.png``, ``logs/`` (server logs), ``raw/``.
Checkpoints and images live in ``--work-dir`` (default ``<out>/work``) and are reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.breakdown import level_breakdown, timing_totals
from bench.ceiling import ALLOCATOR_ENV, CPU_BATCHES, GPU_BATCHES, machine_info
from bench.inputs import BenchImage, images_of_size, write_images
from bench.load import (
    ClosedConfig,
    OpenConfig,
    Payload,
    Target,
    format_level,
    loop_name,
    make_payload,
    run_closed,
    run_open,
)
from bench.report import SERVICE_DEADLINE_MS, finish
from bench.servers import (
    ServerConfig,
    ServerProcess,
    device_memory_by_worker,
    gpu_processes_mib,
    http_get_text,
    ours_config,
    peer_config,
)

SCHEMA = "vision-serve-bench/1"
#: Open-loop levels: requests unanswered at once before the client stops sending (it never queues).
#: Far above what an overloaded server holds: ours rejects past its queue (VISION_MAX_QUEUE images).
OPEN_MAX_IN_FLIGHT = 4096
#: The precisions measured with OpenVINO too (the CPU's: fp16 has no fast CPU kernels).
OPENVINO_PRECISIONS: tuple[str, ...] = ("int8", "bf16", "fp32")


@dataclass(frozen=True)
class Level:
    """A closed-loop level: ``clients`` clients, ``images`` per request, JPEGs of ``size``."""

    clients: int
    images: int
    size: str

    @classmethod
    def parse(cls, token: str, default_size: str) -> Level:
        """``C``, ``CxK``, ``C@WxH`` or ``CxK@WxH``."""
        head, _, size = token.strip().partition("@")
        clients, _, images = head.partition("x")
        level = cls(int(clients), int(images or 1), size or default_size)
        if level.clients < 1 or level.images < 1:
            raise ValueError(f"bad level {token!r}")
        return level


def _openvino_precisions() -> tuple[str, ...]:
    from models import OPENVINO_PRECISIONS  # torch: only when configurations are built

    return OPENVINO_PRECISIONS


def parse_levels(text: str, default_size: str) -> list[Level]:
    return [Level.parse(t, default_size) for t in text.split(",") if t.strip()]


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in _csv(text)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Throughput comparison (issue 4).")
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke test of every stage in minutes")
    p.add_argument("--models", type=_csv, default=None, help="vgg16,ssd300 (quick: vgg16)")
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints and JPEGs (default <out>/work)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument(
        "--ours", type=_csv, default=None, help="our service's precisions (cpu: int8,bf16,fp32; cuda: fp16)"
    )
    p.add_argument("--ours-env", action="append", default=[], help="KEY=VALUE for our service (repeatable)")
    p.add_argument(
        "--ours-baseline",
        type=Path,
        default=None,
        help="a checkout of another commit (git worktree): each ours configuration also runs from it, "
        "labelled '(baseline)', in the same rounds, to compare two versions of the service side by side",
    )
    p.add_argument(
        "--ours-runtimes",
        type=_csv,
        default=["torch"],
        help="VISION_RUNTIME values to run ours with, e.g. torch,openvino (one configuration each; "
        "default torch); a configuration's label names a runtime other than torch",
    )
    p.add_argument(
        "--ours-workers",
        type=lambda s: [int(x) for x in _csv(s)],
        default=[1],
        help="VISION_WORKERS values to run ours with, e.g. 1,4 (one configuration each; default 1)",
    )
    p.add_argument(
        "--ours-decodes",
        type=_csv,
        default=[],
        help="VISION_JPEG_DECODE values to run ours with, e.g. device,cpu (one configuration each, "
        "labelled 'decode X'; default: the setting's own default, unlabelled)",
    )
    p.add_argument("--max-batch-size", type=int, default=None, help="VISION_MAX_BATCH_SIZE and LitServe's")
    p.add_argument("--peers", type=_csv, default=None, help="fastapi,litserve or none (cuda: none)")
    p.add_argument("--peer-precisions", type=_csv, default=None, help="default: fp32 and ours' first")
    p.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=None, help="cpu: on")
    p.add_argument(
        "--ceiling-precisions", type=_csv, default=None, help="cpu: int8,bf16,fp32; cuda: fp16,bf16,fp32"
    )
    p.add_argument("--batches", type=lambda s: [int(x) for x in _csv(s)], default=None, help="ceiling sweep")
    p.add_argument("--ceiling-seconds", type=float, default=None, help="timed seconds per ceiling batch size")
    p.add_argument("--concurrency", default=None, help="our levels (see the module docstring)")
    p.add_argument("--peer-concurrency", default=None, help="peers' levels")
    p.add_argument("--image-size", default="500x375", help="the base JPEG size (500x375 or 1920x1080)")
    p.add_argument("--open-factors", type=_floats, default=None, help="open-loop rates, x our capacity")
    p.add_argument("--peer-open-factors", type=_floats, default=None, help="open-loop rates, x peer capacity")
    p.add_argument("--arrival", choices=["poisson", "uniform"], default="poisson")
    p.add_argument(
        "--level-seconds", type=float, default=None, help="measured seconds per level (after its warm-up)"
    )
    p.add_argument("--warmup-max-s", type=float, default=None, help="warm-up per level at most")
    p.add_argument("--max-requests", type=int, default=None, help="per level, warm-up included")
    p.add_argument("--timeout-s", type=float, default=None, help="per request")
    p.add_argument("--deadline-ms", type=float, default=None, help="send X-Request-Timeout-Ms to ours")
    p.add_argument("--client-processes", type=int, default=1, help="load generator processes")
    p.add_argument("--repeats", type=int, default=1, help="rounds (order rotated); medians reported")
    p.add_argument(
        "--allocator",
        choices=["careful", "none"],
        default="careful",
        help="careful: glibc settings for the ceiling and the peers' same-precision setup",
    )
    p.add_argument("--ready-timeout-s", type=float, default=None, help="per server start")
    p.add_argument("--budget-s", type=float, default=None, help="skip stages once this much time has passed")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from --quick and --device."""
    cuda = args.device.startswith("cuda")
    q = args.quick
    d: dict[str, Any] = {
        "models": ["vgg16"] if q else ["vgg16", "ssd300"],
        "ours": ["fp16"] if cuda else (["bf16"] if q else ["int8", "bf16", "fp32"]),
        "peers": [] if cuda else ["fastapi", "litserve"],
        "openvino": not cuda,
        "ceiling_precisions": (["fp16", "bf16", "fp32"] if cuda else ["int8", "bf16", "fp32"]),
        "batches": ([1, 64] if q else list(GPU_BATCHES)) if cuda else ([1, 8] if q else list(CPU_BATCHES)),
        "concurrency": ("1,4" if q else ("32,128,256,32x8" if cuda else "1,2,4,8,16,32,64,16@1920x1080")),
        "peer_concurrency": "4" if q else "1,4,16,64",
        "open_factors": [4.0] if q else [0.5, 4.0],
        "peer_open_factors": [],
        "ceiling_seconds": 1.0 if q or cuda else 3.0,
        "level_seconds": 3.0 if q else (10.0 if cuda else 15.0),
        "warmup_max_s": 3.0 if q else (5.0 if cuda else 15.0),
        "max_requests": 200 if q else 20_000,
        "timeout_s": 30.0 if q else 60.0,
        "ready_timeout_s": 180.0 if cuda else 240.0,
    }
    for key, value in d.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.peers == ["none"]:
        args.peers = []
    if args.peer_precisions is None:  # fp32 and ours' first float precision (the peers have no int8)
        floats = [p for p in args.ours if p in ("fp32", "bf16", "fp16")]
        args.peer_precisions = list(dict.fromkeys(["fp32", floats[0] if floats else "bf16"]))
    if args.work_dir is None:
        args.work_dir = args.out / "work"
    # absolute: the paths go into servers' environments, and --ours-baseline starts from another cwd
    args.work_dir = args.work_dir.resolve()
    return args


class Bench:
    """State of one run: the results document, the clock and budget, and the stage runner."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.out: Path = args.out
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "client": {"loop": loop_name(), "processes": args.client_processes},
            "models": {},
            "errors": [],
        }
        self.images: list[BenchImage] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return (self.args.budget_s - self.elapsed()) if self.args.budget_s else float("inf")

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {message}", flush=True)

    def stage(self, name: str, fn: Callable[[], Any], min_left_s: float = 0.0) -> Any:
        """Run one stage; a failure is logged and recorded, never raised. Skipped when less than
        ``min_left_s`` of the budget is left."""
        if self.left() < min_left_s:
            self.log(f"SKIP {name}: {self.left():.0f} s of the budget left")
            self.results["errors"].append(f"{name}: skipped (budget)")
            return None
        self.log(f"stage {name}")
        try:
            return fn()
        except Exception as e:  # one stage's failure must not stop the others
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.log(f"FAILED {name}: {e}")
            traceback.print_exc(limit=3)
            self.results["errors"].append(f"{name}: {first}")
            return None
        finally:
            self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))

    def subprocess_json(self, argv: list[str], json_path: Path, timeout_s: float, env: dict[str, str]) -> Any:
        """Run ``python -m ...`` with ``env`` added, time-boxed; its JSON output."""
        timeout_s = min(timeout_s, max(10.0, self.left()))
        proc = subprocess.run(
            [sys.executable, "-m", *argv, "--json", str(json_path)],
            env={**os.environ, **env},
            timeout=timeout_s,
            stdout=sys.stdout,
            stderr=subprocess.STDOUT,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}")
        return json.loads(json_path.read_text())

    # -- stages -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        a = self.args
        subprocess.run(
            [sys.executable, "-m", "bench.inputs", "--out", str(a.work_dir), "--models", ",".join(a.models)],
            check=True,
            timeout=600,
        )
        self.images = write_images(a.work_dir / "images")
        self.results["inputs"] = [
            {
                "name": i.name,
                "size": f"{i.width}x{i.height}",
                "bytes": i.path.stat().st_size,
                "source": i.source,
            }
            for i in self.images
        ]

    def ceiling(self, model: str, doc: dict[str, Any], round_: int) -> None:
        a = self.args
        env = dict(ALLOCATOR_ENV) if a.allocator == "careful" else {}
        raw = self.out / "raw" / f"ceiling-{model}-{round_}.json"
        argv = ["bench.ceiling", "--work-dir", str(a.work_dir), "--model", model, "--device", a.device]
        argv += ["--precisions", ",".join(a.ceiling_precisions), "--batches", ",".join(map(str, a.batches))]
        argv += ["--min-seconds", str(a.ceiling_seconds)]
        result = self.subprocess_json(argv, raw, 900, env)
        doc["ceiling"].append(result)
        self.results["machine"] = result.get("machine", self.results["machine"])

    def openvino(self, model: str, doc: dict[str, Any]) -> None:
        a = self.args
        raw = self.out / "raw" / f"openvino-{model}.json"
        precisions = [p for p in a.ceiling_precisions if p in OPENVINO_PRECISIONS]
        argv = ["bench.openvino_ceiling", "--work-dir", str(a.work_dir), "--model", model]
        argv += ["--precisions", ",".join(precisions)]
        argv += ["--batches", ",".join(map(str, a.batches)), "--min-seconds", "2" if a.quick else "4"]
        doc["openvino"].append(self.subprocess_json(argv, raw, 600, {}))

    def server_configs(self, model: str) -> list[ServerConfig]:
        a = self.args
        extra: dict[str, str] = {}
        if a.max_batch_size:
            extra["VISION_MAX_BATCH_SIZE"] = str(a.max_batch_size)
        for item in a.ours_env:
            key, _, value = item.partition("=")
            extra[key.strip()] = value
        headers = [("X-Request-Timeout-Ms", str(int(a.deadline_ms)))] if a.deadline_ms else []
        configs = []
        for p in a.ours:
            for runtime in a.ours_runtimes:
                if runtime == "openvino" and p not in _openvino_precisions():
                    continue  # the service refuses it at start (app/settings.py)
                for workers, decode in itertools.product(a.ours_workers, a.ours_decodes or [None]):
                    env = dict(extra)
                    label = f"ours {p}"
                    if runtime != "torch":  # app/settings.py: VISION_RUNTIME
                        env["VISION_RUNTIME"] = runtime
                        label += f" {runtime}"
                    if decode is not None:  # app/settings.py: VISION_JPEG_DECODE
                        env["VISION_JPEG_DECODE"] = decode
                        label += f" decode {decode}"
                    if p == "int8" or runtime != "torch":
                        # int8 is calibrated at start on bench.inputs' calibration images; another
                        # runtime at fp32 is checked against torch on them
                        env.setdefault("VISION_INT8_CALIBRATION_DIR", str(a.work_dir / "calibration"))
                    if workers > 1:  # app/workers.py: that many serving processes on the port
                        env["VISION_WORKERS"] = str(workers)
                        label += f" x{workers} workers"
                    configs.append(ours_config(label, a.work_dir, model, p, a.device, env, headers))
                    if a.ours_baseline is not None:
                        baseline = ours_config(
                            f"{label} (baseline)", a.work_dir, model, p, a.device, env, headers
                        )
                        configs.append(dataclasses.replace(baseline, cwd=a.ours_baseline.resolve()))
        for kind in a.peers:
            for precision in a.peer_precisions:
                careful = precision != "fp32" and a.allocator == "careful"
                configs.append(
                    peer_config(
                        kind,
                        a.work_dir,
                        model,
                        precision,
                        a.device,
                        ALLOCATOR_ENV if careful else {},
                        a.max_batch_size or 8,
                    )
                )
        return configs

    def payloads(self, level: Level) -> list[Payload]:
        return [
            make_payload(f"{i.name}x{level.images}", [i.path.read_bytes()] * level.images, "multipart")
            for i in images_of_size(self.images, level.size)
        ]

    def serve(self, config: ServerConfig, model: str, round_: int, run: dict[str, Any]) -> bool:
        """Start ``config``'s server, sweep it, stop it; levels go into ``run`` as they finish."""
        a = self.args
        levels = parse_levels(a.concurrency if config.kind == "ours" else a.peer_concurrency, a.image_size)
        factors = a.open_factors if config.kind == "ours" else a.peer_open_factors
        log_path = self.out / "logs" / f"{model}-{config.label.replace(' ', '-')}-{round_}.log"
        run["log"] = str(log_path)
        with ServerProcess(config, log_path) as server:
            run["ready_s"] = round(server.wait_ready(min(a.ready_timeout_s, max(30.0, self.left()))), 2)
            self.log(f"{config.label} ready in {run['ready_s']} s (port {server.port})")
            target = Target(server.port, config.predict_path, headers=config.headers)
            for level in levels:
                if self.left() < 20:
                    run.setdefault("skipped", []).append(f"c={level.clients}: budget")
                    continue
                cfg = ClosedConfig(
                    concurrency=level.clients,
                    max_requests=min(a.max_requests, 4 * level.clients + 8) if a.quick else a.max_requests,
                    max_seconds=min(a.level_seconds, max(1.0, self.left() - 15)),
                    warmup_max_s=a.warmup_max_s,
                    timeout_s=a.timeout_s,
                )
                cpu0 = server.cpu_seconds()
                timings = self.timings(server, model)
                result = run_closed(target, self.payloads(level), cfg, a.client_processes)
                result["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 3)  # warm-up and drain included
                result["breakdown"] = self.breakdown(server, model, timings)
                result["image_size"] = level.size
                run["closed"].append(result)
                self.log(f"{config.label} {level.size} k={level.images} " + format_level(result))
            capacity = max(
                (
                    lvl["images_per_s"]
                    for lvl in run["closed"]
                    if lvl["image_size"] == a.image_size and lvl["images_per_request"] == 1
                ),
                default=0.0,
            )
            base = Level(1, 1, a.image_size)
            for factor in factors:
                if capacity <= 0 or self.left() < 20:
                    break
                ocfg = OpenConfig(
                    rate_rps=factor * capacity,
                    duration_s=min(a.level_seconds, max(1.0, self.left() - 15)),
                    max_requests=max(10, int(factor * capacity * a.level_seconds * 1.5) + 1),
                    arrival=a.arrival,
                    seed=round_,
                    max_in_flight=OPEN_MAX_IN_FLIGHT,
                    timeout_s=a.timeout_s,
                    # long enough for any request the server accepted to meet its deadline: what
                    # is still unanswered after that is abandoned, and the overload target says so
                    drain_s=min(a.timeout_s, (a.deadline_ms or SERVICE_DEADLINE_MS) / 1000 + 5),
                )
                cpu0 = server.cpu_seconds()
                timings = self.timings(server, model)
                result = run_open(target, self.payloads(base), ocfg, a.client_processes)
                result.update(
                    rate_factor=factor,
                    capacity_images_per_s=capacity,
                    image_size=a.image_size,
                    server_cpu_s=round(server.cpu_seconds() - cpu0, 3),
                    breakdown=self.breakdown(server, model, timings),
                )
                run["open"].append(result)
                self.log(f"{config.label} x{factor:g} " + format_level(result))
            if config.kind == "ours" and a.device.startswith("cuda"):
                self.record_gpu_memory(server, run)
        return True

    def timings(self, server: ServerProcess, model: str) -> tuple[float, dict[str, float]] | None:
        """Our service's timing totals for ``model`` now (``bench.breakdown``), with the time they
        were read; None for a peer, or when ``/metrics`` does not answer."""
        if server.config.kind != "ours":
            return None
        text = http_get_text(server.port, "/metrics")
        return (time.monotonic(), timing_totals(text, model)) if text is not None else None

    def breakdown(
        self, server: ServerProcess, model: str, before: tuple[float, dict[str, float]] | None
    ) -> dict[str, Any] | None:
        """Where the time of the level since ``before`` (:meth:`timings`) went, in the service."""
        after = self.timings(server, model)
        if before is None or after is None:
            return None
        workers = int(server.config.env.get("VISION_WORKERS", "1"))
        return level_breakdown(before[1], after[1], after[0] - before[0], workers)

    def record_gpu_memory(self, server: ServerProcess, run: dict[str, Any]) -> None:
        """GPU memory per worker, at the end of the levels: the allocator's figures from
        ``/metrics`` (the peak included) and nvidia-smi's per process (the CUDA context too)."""
        text = http_get_text(server.port, "/metrics")
        run["gpu_memory_mib"] = device_memory_by_worker(text) if text is not None else None
        run["nvidia_smi_mib"] = gpu_processes_mib()
        label, allocator, smi = server.config.label, run["gpu_memory_mib"], run["nvidia_smi_mib"]
        self.log(f"{label} GPU memory (MiB): allocator {allocator}, nvidia-smi {smi}")

    def run(self) -> str:
        a = self.args
        self.log(f"bench: models {a.models}, device {a.device}, out {a.out}, client loop {loop_name()}")
        self.stage("inputs", self.prepare)
        if not self.images:
            return "inputs failed; nothing measured\n"
        try:
            for model in a.models:
                self.measure_model(model)
        finally:  # also when stopped (SIGTERM): report what was measured
            self.results["elapsed_s"] = round(self.elapsed(), 1)
            table = finish(self.results, self.out)
            self.log(f"wrote results.json, table.md and latency_throughput.png in {self.out}")
        return table

    def measure_model(self, model: str) -> None:
        a = self.args
        doc: dict[str, Any] = {"ceiling": [], "openvino": [], "servers": {}}
        self.results["models"][model] = doc
        configs = self.server_configs(model)
        for round_ in range(a.repeats):
            self.stage(f"{model} ceiling #{round_}", partial(self.ceiling, model, doc, round_), 30)
            if round_ == 0 and a.openvino:
                self.stage(f"{model} openvino", partial(self.openvino, model, doc), 60)
            shift = round_ % max(1, len(configs))
            for config in configs[shift:] + configs[:shift]:
                run: dict[str, Any] = {"label": config.label, "kind": config.kind}
                run.update(precision=config.precision, env=dict(config.env), closed=[], open=[])
                doc["servers"].setdefault(config.label, []).append(run)  # partial levels survive a failure
                if (
                    self.stage(
                        f"{model} {config.label} #{round_}",
                        partial(self.serve, config, model, round_, run),
                        45,
                    )
                    is None
                ):
                    run["error"] = self.results["errors"][-1]


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds the stages, so the running server is stopped too


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = resolve_defaults(build_parser().parse_args(argv))
    bench = Bench(args)
    table = bench.run()
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

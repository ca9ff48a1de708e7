"""Start, ready, measure and stop one server process at a time, on 127.0.0.1.

Each server runs in a session of its own (``start_new_session``), so that stopping it (SIGTERM to
its process group, SIGKILL after a grace period) also ends the worker processes it forked, and so
that its CPU time can be read from ``/proc`` for every process of that session.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: clock ticks per second, the unit of utime/stime in /proc/<pid>/stat
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration of the comparison.

    ``module`` is run as ``python -m module *args --port N`` (``app`` takes ``--host``/``--port``,
    the peers ``--port`` and bind 127.0.0.1 themselves); ``env`` is added to the environment.
    """

    label: str  # e.g. "ours bf16", "fastapi fp32"
    kind: str  # "ours" | "fastapi" | "litserve"
    precision: str
    module: str
    args: tuple[str, ...]
    ready_path: str
    predict_path: str
    env: Mapping[str, str] = field(default_factory=dict)
    body_format: str = "multipart"
    headers: tuple[tuple[str, str], ...] = ()
    cwd: Path | None = None  # ours from another checkout (``python -m app`` imports the cwd's app)

    def argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args, "--port", str(port)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get_status(port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """Status of ``GET http://127.0.0.1:port/path``; None when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def http_get_text(port: int, path: str, timeout_s: float = 5.0) -> str | None:
    """Body of ``GET http://127.0.0.1:port/path`` when it answers 200; else None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return body.decode("utf-8", "replace") if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


_MEMORY_SERIES = re.compile(r"^vision_device_memory_bytes\{([^}]*)\} (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def device_memory_by_worker(metrics_text: str) -> dict[str, dict[str, float]]:
    """``vision_device_memory_bytes`` of a ``/metrics`` text, per worker: {pid (``"0"`` for a
    single process, which has no pid label): {kind: MiB}}."""
    workers: dict[str, dict[str, float]] = {}
    for labels, value in _MEMORY_SERIES.findall(metrics_text):
        named = dict(_LABEL.findall(labels))
        kind = named.get("kind")
        if kind:
            workers.setdefault(named.get("pid", "0"), {})[kind] = round(float(value) / 2**20, 1)
    return dict(sorted(workers.items()))


def nvidia_smi_rows(query: str, fields: int, timeout_s: float = 10.0) -> list[list[str]] | None:
    """``nvidia-smi --query-<query> --format=csv,noheader,nounits``: its rows of ``fields`` stripped
    values (other lines dropped); None where nvidia-smi is missing or fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[part.strip() for part in line.split(",")] for line in out.splitlines()]
    return [row for row in rows if len(row) == fields]


def gpu_processes_mib(timeout_s: float = 10.0) -> dict[str, float] | None:
    """{pid: MiB} of the processes on the GPUs as ``nvidia-smi`` sees them (the CUDA context
    included, unlike the allocator's figures); None where nvidia-smi is missing or fails (a
    sandboxed machine may list no processes at all: then {})."""
    rows = nvidia_smi_rows("compute-apps=pid,used_memory", 2, timeout_s)
    if rows is None:
        return None
    return {pid: float(mib) for pid, mib in rows if mib.replace(".", "", 1).isdigit()}


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields after "pid (comm) ") of every process in /proc: ``[0]`` is field 3 (state),
    ``[1]`` the parent pid, ``[3]`` the session, ``[11]``/``[12]`` utime/stime (proc(5))."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        yield int(entry), stat[stat.rfind(")") + 2 :].split()


def session_cpu_seconds(session_id: int) -> float:
    """User + system CPU seconds of the live processes in session ``session_id`` (from /proc)."""
    total = 0
    for _, fields in proc_stats():
        if int(fields[3]) == session_id:  # field 6: session
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
    return total / _CLK_TCK


class ServerProcess:
    """A running server: ``start()``, ``wait_ready()``, ``cpu_seconds()``, ``stop()``; a context
    manager that always stops it."""

    def __init__(self, config: ServerConfig, log_path: Path, port: int | None = None) -> None:
        self.config = config
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        env = {**os.environ, **self.config.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.config.argv(self.port),
                cwd=self.config.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float, in_a_row: int = 8) -> float:
        """Poll the ready path until it answers 200 ``in_a_row`` times running (each a new
        connection: with several workers on the port, each may answer); seconds since start.
        RuntimeError if the process exits or ``timeout_s`` passes first (with the end of its log)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.config.label} exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            if all(http_get_status(self.port, self.config.ready_path) == 200 for _ in range(in_a_row)):
                return time.monotonic() - self.started_at
            time.sleep(0.25)
        raise RuntimeError(f"{self.config.label} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return session_cpu_seconds(self.proc.pid) if self.proc is not None else 0.0

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # its own session and group: start_new_session=True
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers left in the group
            os.killpg(pgid, signal.SIGKILL)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ours_config(
    label: str,
    work_dir: Path,
    model: str,
    precision: str,
    device: str,
    extra_env: Mapping[str, str],
    headers: Sequence[tuple[str, str]] = (),
) -> ServerConfig:
    """The service (``python -m app``) serving benchmark model ``model`` alone."""
    env = {
        "VISION_MODELS_FILE": str(work_dir / f"models-{model}.toml"),
        "VISION_DEVICE": device,
        "VISION_PRECISION": precision,
        **extra_env,
    }
    return ServerConfig(
        label,
        "ours",
        precision,
        "app",
        ("--host", "127.0.0.1"),
        "/health/ready",
        f"/v1/models/{model}/predict",
        env,
        headers=tuple(headers),
    )


def peer_config(
    kind: str,
    work_dir: Path,
    model: str,
    precision: str,
    device: str,
    extra_env: Mapping[str, str],
    max_batch_size: int = 8,
) -> ServerConfig:
    """A peer server (``fastapi`` or ``litserve``) over benchmark model ``model``."""
    module = {"fastapi": "bench.peers.fastapi_plain", "litserve": "bench.peers.litserve_batched"}[kind]
    args = (
        "--work-dir",
        str(work_dir),
        "--model",
        model,
        "--precision",
        precision,
        "--device",
        device,
        "--max-batch-size",
        str(max_batch_size),
    )
    return ServerConfig(
        f"{kind} {precision}",
        kind,
        precision,
        module,
        args,
        "/health",
        f"/v1/models/{model}/predict",
        dict(extra_env),
    )

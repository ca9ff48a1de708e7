"""``VISION_WORKERS=N``: N serving processes on one port, and their supervisor.

One Python process handles HTTP (parsing, multipart, JSON) on two or three cores, far less than one
GPU can infer. With ``N > 1``, ``python -m app`` reserves the address and runs ``N`` copies of
itself (``VISION_WORKER_SLOT`` set in each), each an ordinary single-process service with its own
copy of the models, listening on its own ``SO_REUSEPORT`` socket: the kernel spreads new
connections over the sockets by a hash of their addresses.

The supervisor imports no torch and serves nothing. It passes SIGTERM and SIGINT on to every worker
and waits for them to drain, then exits as a single process would; it restarts a worker that dies
of a signal, unless more than :data:`MAX_RESTARTS` died within :data:`RESTART_WINDOW_S` (then it
stops them all and exits 1); and it stops everything when a worker exits with status 1 or 2 (a
start failure every worker would repeat). A restarted worker warms up before it listens
(``VISION_WARM_BEFORE_LISTENING``), so it never answers 503 NOT_READY while the others are ready.

The price of a socket per worker: the connections waiting in a dead worker's accept queue are reset
(``net.ipv4.tcp_migrate_req=1``, Linux 5.14+, migrates them instead). Each worker queues its share
of ``VISION_MAX_QUEUE_IMAGES`` (``Settings.queue_share``), and ``/metrics`` reports the pool
(``app/metrics.py``). On the CPU, workers split the cores: each gets ``VISION_TORCH_THREADS`` =
cores / N unless it is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

log = logging.getLogger("app.workers")

#: More worker deaths than this within RESTART_WINDOW_S stop the supervisor (exit 1).
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: Listen backlog of each worker's socket (uvicorn's default is 2048 as well).
BACKLOG = 2048
#: Exit statuses of ``python -m app`` that mean "cannot start" (2: settings, 1: models or warm-up).
START_FAILURES = (1, 2)
#: How often the supervisor looks at its workers.
POLL_S = 0.2


def bind_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, listening unless ``listen`` is
    false.

    Every worker binds its own listening socket this way, and the kernel spreads new connections
    over them by a hash of the addresses and ports. One socket shared by all the workers (what
    this module did first) let whichever worker woke first take a whole burst of connections: its
    event loop accepts until the backlog is empty, and behind a load balancer's pool of keep-alive
    connections that first share is the share for good. The supervisor binds without listening:
    the start fails at once if another program holds the port, and the port stays reserved
    between worker restarts; a socket that does not listen is given no connections.

    Raises OSError (address in use, bad host) for the caller to report.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def worker_environ(
    environ: dict[str, str], workers: int, slot: int, folder: Path, *, restart: bool = False
) -> dict[str, str]:
    """A worker's environment: the pool's size, its slot (which makes it serve, not supervise), the
    workers' shared ``folder``, a share of the CPU threads unless ``VISION_TORCH_THREADS`` is set,
    and for a restarted worker a warm-up before it listens."""
    env = dict(environ)
    env["VISION_WORKERS"] = str(workers)
    env["VISION_WORKER_SLOT"] = str(slot)
    env["VISION_WORKER_DIR"] = str(folder)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_folder(folder))  # read by prometheus-client itself
    if restart:
        env["VISION_WARM_BEFORE_LISTENING"] = "true"
    if not env.get("VISION_TORCH_THREADS"):
        env["VISION_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def metrics_folder(folder: Path) -> Path:
    """Where the workers write their Prometheus values (``Settings.metrics_dir``)."""
    return folder / "metrics"


@dataclass
class Supervisor:
    """Runs ``count`` workers on ``host:port`` until a signal or a fatal worker exit (module
    docstring); ``sock`` is the supervisor's bound, not listening, socket that reserves the port."""

    sock: socket.socket
    count: int
    host: str
    port: int
    folder: Path  # shared by the workers (reload requests and reports: app.reload)
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    stop_signal: int | None = None
    deaths: deque[float] = field(default_factory=deque)

    def spawn(self, slot: int, *, restart: bool = False) -> None:
        """Start worker ``slot``. A restarted one warms up before it takes connections (the others
        serve meanwhile); at the first start all warm up while serving, answering readiness 503."""
        argv = [sys.executable, "-m", "app", "--host", self.host, "--port", str(self.port)]
        env = worker_environ(dict(os.environ), self.count, slot, self.folder, restart=restart)
        # the worker starts with SIGHUP blocked (a reload passed on while it imports stays pending
        # until it can take it: app.drain); SIGHUPs to this process meanwhile wait likewise
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process = subprocess.Popen(argv, env=env)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[slot] = process
        log.info("worker %d started (pid %d)", slot, process.pid)

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        first = self.stop_signal is None
        self.stop_signal = sig
        for process in self.workers.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
        if first:
            log.info("%s: passed on to %d worker(s); waiting for them to drain",
                     signal.Signals(sig).name, len(self.workers))  # fmt: skip

    def on_hangup(self, sig: int, frame: FrameType | None) -> None:
        """SIGHUP (from outside, or from a worker asked to reload): every worker reloads."""
        for process in self.workers.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)
        log.info("SIGHUP: passed on to %d worker(s): each reloads the models file", len(self.workers))

    def run(self) -> int:
        """Start the workers and supervise them; the exit status for ``python -m app``."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGHUP, self.on_hangup)
        for slot in range(self.count):
            self.spawn(slot)
        log.info("%d workers serving on %s:%d", self.count, self.host, self.port)
        status = 0
        while self.workers:
            time.sleep(POLL_S)
            for slot, process in list(self.workers.items()):
                code = process.poll()
                if code is None:
                    continue
                del self.workers[slot]
                # its live gauges go; prometheus-client leaves this function unannotated
                mark_process_dead(process.pid, str(metrics_folder(self.folder)))  # type: ignore[no-untyped-call]
                if self.stop_signal is not None:
                    continue  # stopping: each worker leaves in its own time
                if code in START_FAILURES:  # bad settings / models / warm-up: every worker would repeat it
                    log.error("worker %d exited with status %d; stopping the other workers", slot, code)
                    status = code
                    self.on_signal(signal.SIGTERM, None)
                    continue
                self.deaths.append(time.monotonic())
                while self.deaths and time.monotonic() - self.deaths[0] > RESTART_WINDOW_S:
                    self.deaths.popleft()
                reason = f"signal {-code}" if code < 0 else f"status {code}"
                if len(self.deaths) > MAX_RESTARTS:
                    log.error("worker %d ended (%s): %d worker deaths in %.0f s; stopping",
                              slot, reason, len(self.deaths), RESTART_WINDOW_S)  # fmt: skip
                    status = 1
                    self.on_signal(signal.SIGTERM, None)
                    continue
                log.warning("worker %d ended (%s); starting it again", slot, reason)
                self.spawn(slot, restart=True)
        self.sock.close()
        if status == 0 and self.stop_signal is not None:
            signal.signal(self.stop_signal, signal.SIG_DFL)  # leave as a single process would
            os.kill(os.getpid(), self.stop_signal)
        return status


def serve_workers(host: str, port: int, count: int) -> int:
    """Reserve ``host:port`` and supervise ``count`` workers; the exit status (1: cannot bind)."""
    try:
        sock = bind_socket(host, port, listen=False)
    except OSError as exc:
        print(f"vision-serve: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vision-workers-") as folder:
        metrics_folder(Path(folder)).mkdir()
        return Supervisor(sock, count, host, port, Path(folder)).run()

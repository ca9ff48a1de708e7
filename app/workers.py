"""``VISION_WORKERS=N``: N serving processes on one port, and their supervisor.

One Python process tops out at two or three cores of request handling (HTTP parsing, multipart,
JSON, the event loop), far below what one GPU can infer. With ``N > 1`` the process that
``python -m app`` started reserves the address, then runs ``N`` copies of itself (``--reuse-port``),
each listening on the same port with ``SO_REUSEPORT`` (:func:`bind_socket`). Every worker is the
ordinary single-process service: it loads its own models (on a GPU: N copies, each a few hundred
MB for VGG16/SSD300 in fp16), warms up, batches its own requests and drains on SIGTERM. The kernel
hands each new connection to one of the workers' sockets, by a hash of the connection's addresses.

The supervisor (this module) imports no torch and serves nothing. It:

- forwards SIGTERM and SIGINT to every worker and waits for them (each drains: ``VISION_DRAIN_*``),
  then exits the way a single process would (by the same signal);
- restarts a worker that dies of a signal (killed, out of memory, crashed), unless workers died
  more than :data:`MAX_RESTARTS` times within :data:`RESTART_WINDOW_S` (then it stops them all and
  exits 1: a crash loop needs a person, or the orchestrator's restart policy);
- stops everything and exits with the worker's status when a worker exits with status 1 or 2 (a
  models file or checkpoint it cannot load, a failed warm-up, bad settings: every worker would fail
  the same way; its message is on stderr, which the workers share).

At the first start every worker serves while it warms up (readiness 503 meanwhile, as a single
process). A restarted worker warms up before it listens (``--warm-first``), so it never answers
``503 NOT_READY`` while the others are ready. The price of a socket per worker: when a worker
dies, the connections waiting in its accept queue, and new ones that reach its socket before the
kernel has closed the dead process's files (a fraction of a second), are reset, where a shared
socket handed them to the other workers. The kernel migrates them instead where the host sets
``net.ipv4.tcp_migrate_req=1`` (Linux 5.14+). Requests the dead worker was running are lost either
way.

Not shared between workers: the batch queue (``VISION_MAX_QUEUE_IMAGES`` is per worker) and the
metrics (``/metrics`` shows the worker that answered; scrape each replica's workers with their
``worker`` label in the logs, or run one worker per replica where per-process series matter).
On the CPU, workers split the cores: each gets ``VISION_TORCH_THREADS`` = cores / N unless set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

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


def worker_environ(environ: dict[str, str], workers: int, slot: int) -> dict[str, str]:
    """A worker's environment: one worker each (no recursion), its slot, and a share of the CPU
    threads unless ``VISION_TORCH_THREADS`` is set."""
    env = dict(environ)
    env["VISION_WORKERS"] = "1"
    env["VISION_WORKER_SLOT"] = str(slot)
    if not env.get("VISION_TORCH_THREADS"):
        env["VISION_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


@dataclass
class Supervisor:
    """Runs ``count`` workers on ``host:port`` until a signal or a fatal worker exit (module
    docstring); ``sock`` is the supervisor's bound, not listening, socket that reserves the port."""

    sock: socket.socket
    count: int
    host: str
    port: int
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    stop_signal: int | None = None
    deaths: deque[float] = field(default_factory=deque)

    def spawn(self, slot: int, *, restart: bool = False) -> None:
        """Start worker ``slot``. A restarted one warms up before it takes connections (the others
        serve meanwhile); at the first start all warm up while serving, answering readiness 503."""
        argv = [sys.executable, "-m", "app", "--host", self.host, "--port", str(self.port), "--reuse-port"]
        if restart:
            argv.append("--warm-first")
        env = worker_environ(dict(os.environ), self.count, slot)
        process = subprocess.Popen(argv, env=env)
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

    def run(self) -> int:
        """Start the workers and supervise them; the exit status for ``python -m app``."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
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
    return Supervisor(sock, count, host, port).run()

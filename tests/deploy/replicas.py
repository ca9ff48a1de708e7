"""Real ``python -m app`` processes on 127.0.0.1 and a bounded client load, for the drain, load
balancer and soak tests."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.balancer import restartable_port
from tests import checkpoint_factory as cf
from tests.app.test_server_process import REPO, clean_env

MODEL = "vgg16-tiny"


def tiny_classifier_file(folder: Path) -> Path:
    """A models file serving one tiny VGG16 (starts fastest: one model to load and warm up)."""
    cf.write_torchvision_vgg16(folder / "vgg16.pth", width=1 / 16)
    path = folder / "models.toml"
    path.write_text(
        f'[[models]]\nname = "{MODEL}"\ntask = "classify"\narch = "vgg16"\nformat = "torchvision"\n'
        'weights = "vgg16.pth"\n'
    )
    return path


def service_env(models_file: Path, **settings: str) -> dict[str, str]:
    env = clean_env(
        VISION_MODELS_FILE=str(models_file),
        VISION_DEVICE="cpu",
        VISION_TORCH_THREADS="1",
        VISION_DECODE_THREADS="1",
        VISION_MAX_BATCH_SIZE="2",
    )
    env.update({f"VISION_{k.upper()}": v for k, v in settings.items()})
    return env


class Replica:
    """One ``python -m app`` on 127.0.0.1:``port``; start it again on the same port after a stop."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, port: int | None = None) -> None:
        self.name = name
        self.env = env
        self.port = port or restartable_port()
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def wait_ready(self, timeout: float = 240) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"{self.name} exited early:\n{self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{self.name} not ready in time:\n{self.log.read_text()}"
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def served(self, endpoint: str = "/v1/classify") -> float:
        """Requests this process answered 200 on ``endpoint`` (its /metrics)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        pattern = re.compile(
            rf'^vision_requests_total\{{endpoint="{re.escape(endpoint)}",.*status="200"\}} (\S+)$', re.M
        )
        return sum(float(m.group(1)) for m in pattern.finditer(text))

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` in this process's /metrics (all label sets)."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
        return sum(float(m.group(1)) for m in pattern.finditer(text))

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@dataclass(frozen=True)
class Outcome:
    """One request of a :class:`Load`: HTTP status (0: transport error), error code, Retry-After."""

    sent: float
    done: float
    status: int
    code: str
    retry_after: str | None
    request_id: str


class Load:
    """``clients`` threads POSTing ``body`` to ``url`` back to back until :meth:`stop` (or
    ``max_seconds``, or ``max_requests`` in all: it always stops by itself)."""

    def __init__(
        self,
        url: str,
        body: bytes,
        *,
        clients: int = 3,
        max_seconds: float = 300,
        max_requests: int = 20_000,
        keep_alive: bool = True,
    ) -> None:
        self.url = url
        self.body = body
        self.clients = clients
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.keep_alive = keep_alive
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return list(self.outcomes)

    def count(self, status: int = 200) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.status == status)

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=1 if self.keep_alive else 0)
        end = time.monotonic() + self.max_seconds
        with httpx.Client(timeout=60, limits=limits) as client:
            while (
                not self._stop.is_set() and time.monotonic() < end and len(self.outcomes) < self.max_requests
            ):
                request_id = uuid.uuid4().hex
                sent = time.monotonic()
                try:
                    response = client.post(
                        self.url,
                        content=self.body,
                        headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id},
                    )
                    code = response.json().get("code", "") if response.status_code != 200 else ""
                    outcome = Outcome(
                        sent,
                        time.monotonic(),
                        response.status_code,
                        code,
                        response.headers.get("Retry-After"),
                        request_id,
                    )
                except httpx.TransportError as exc:
                    outcome = Outcome(sent, time.monotonic(), 0, type(exc).__name__, None, request_id)
                with self._lock:
                    self.outcomes.append(outcome)


def wait_for(condition: object, what: str, timeout: float = 120, every: float = 0.1) -> None:
    """Poll ``condition()`` until true; fail naming ``what`` after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)

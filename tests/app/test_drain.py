"""Graceful drain on SIGTERM (app/drain.py).

Unit: the signal handling of ``DrainingServer`` (delay, second signal, SIGINT, no delay).
Real process under load: readiness turns 503, new work gets 503 DRAINING with Retry-After, a request
accepted before the signal completes after it, the process exits within delay + grace (a request
that never finishes is cut at the grace period), and no client sees anything else.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn

from app.drain import DrainingServer
from tests.app.helpers import jpeg
from tests.deploy.replicas import MODEL, Load, Replica, service_env, tiny_classifier_file, wait_for

pytestmark = pytest.mark.slow

# -- the signal handling --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr("app.drain.time.monotonic", c)
    return c


class FakeService:
    """What DrainingServer reads of the app's InferenceService."""

    def __init__(self, serving: bool) -> None:
        self.draining = False
        self.failure: str | None = None
        self.registry = SimpleNamespace(models={"m": SimpleNamespace(ready=serving)})


def draining_server(delay: float, serving: bool = True) -> tuple[DrainingServer, FakeService]:
    async def app(scope: object, receive: object, send: object) -> None:  # never called
        raise AssertionError

    service = FakeService(serving)
    holder = SimpleNamespace(state=SimpleNamespace(service=service))
    config = uvicorn.Config(app, timeout_graceful_shutdown=7)
    return DrainingServer(config, app=holder, drain_delay_s=delay), service  # type: ignore[arg-type]


async def test_sigterm_waits_the_delay_then_shuts_down(clock: Clock) -> None:
    server, service = draining_server(5)
    server.handle_exit(signal.SIGTERM, None)
    assert service.draining and server.draining and not server.should_exit
    clock.now += 4.9
    assert await server.on_tick(1) is False and not server.should_exit
    clock.now += 0.2
    assert await server.on_tick(2) is True and server.should_exit


async def test_a_second_sigterm_skips_the_rest_of_the_delay(clock: Clock) -> None:
    server, service = draining_server(30)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and service.draining


def test_sigint_and_a_zero_delay_shut_down_at_once() -> None:
    for sig, delay in ((signal.SIGINT, 5.0), (signal.SIGTERM, 0.0)):
        server, service = draining_server(delay)
        server.handle_exit(sig, None)
        assert server.should_exit and service.draining  # readiness flips first all the same


def test_sigterm_before_any_model_is_warm_skips_the_delay() -> None:
    server, service = draining_server(30, serving=False)
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and service.draining  # nothing was routed here: nothing to drain


async def test_a_failed_start_stops_the_server() -> None:
    server, service = draining_server(5)
    await server.on_tick(1)
    assert not server.should_exit
    service.failure = "models.toml: checkpoint file(s) not found"
    await server.on_tick(2)
    assert server.should_exit and server.failure == service.failure


# -- a real process under load --------------------------------------------------------------------

DELAY_S = 5.0
GRACE_S = 5.0


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    folder = tmp_path_factory.mktemp("drain")
    env = service_env(tiny_classifier_file(folder), drain_delay_s=str(DELAY_S), drain_grace_s=str(GRACE_S))
    r = Replica("drain", env, folder)
    r.start()
    try:
        r.wait_ready()
        yield r
    finally:
        r.close()


class SlowUpload:
    """A POST whose body waits: headers with ``Expect: 100-continue`` first; the server's
    ``100 Continue`` proves the handler is running (uvicorn sends it when the app reads the body)."""

    def __init__(self, port: int, body: bytes) -> None:
        self.body = body
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            b"Expect: 100-continue\r\nX-Request-ID: slow-upload\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert self._read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 100 Continue")

    def _read_until(self, marker: bytes) -> bytes:
        data = b""
        while marker not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def finish(self) -> str:
        self.sock.sendall(self.body)
        head = self._read_until(b"\r\n\r\n")
        self.sock.close()
        return head.decode("latin-1")

    def read_rest(self) -> bytes:
        try:
            return self._read_until(b"\r\n\r\n")
        except OSError:
            return b""
        finally:
            self.sock.close()


def test_sigterm_under_load_loses_no_accepted_request(replica: Replica) -> None:
    image = jpeg(96, 72, seed=3)
    with Load(f"{replica.url}/v1/classify", image, clients=3) as load:
        wait_for(lambda: load.count(200) >= 20, "the load to get going")
        accepted = SlowUpload(replica.port, image)  # in flight: its handler is waiting for the body
        stuck = SlowUpload(replica.port, image)  # in flight, and its body never comes
        signalled = time.monotonic()
        replica.signal(signal.SIGTERM)

        def readiness() -> int:
            return httpx.get(f"{replica.url}/health/ready", timeout=5).status_code

        wait_for(lambda: readiness() == 503, "/health/ready to turn 503", timeout=DELAY_S)
        ready = httpx.get(f"{replica.url}/health/ready", timeout=5)
        assert "draining" in ready.json()["reason"] and ready.headers["Retry-After"]
        refused = httpx.post(
            f"{replica.url}/v1/classify", content=image, headers={"Content-Type": "image/jpeg"}, timeout=10
        )
        assert refused.status_code == 503 and refused.json()["code"] == "DRAINING"
        assert refused.headers["Retry-After"]
        wait_for(lambda: load.count(503) >= 3, "the load to meet DRAINING", timeout=DELAY_S)
        outcomes = load.stop()  # a load balancer stops sending once readiness is 503

    head = accepted.finish()
    assert head.startswith("HTTP/1.1 200"), head

    code = replica.wait(timeout=DELAY_S + GRACE_S + 30)
    elapsed = time.monotonic() - signalled
    assert code in (0, -signal.SIGTERM)
    assert elapsed >= DELAY_S + GRACE_S - 1  # the stuck request held it until the grace period ended
    assert b"200" not in stuck.read_rest()
    log = replica.log.read_text()
    assert "timeout graceful shutdown exceeded" in log
    # the one traceback: uvicorn logging the stuck request's cancellation at the end of the grace
    assert log.count("Traceback") == log.count("CancelledError: Task cancelled, timeout graceful") == 1
    assert "id=slow-upload" in log

    statuses = {(o.status, o.code) for o in outcomes}
    assert statuses <= {(200, ""), (503, "DRAINING")}, [o for o in outcomes if o.status != 200][:5]
    assert all(o.retry_after for o in outcomes if o.status == 503)


async def test_drain_state_reaches_queued_requests_in_process(tmp_path: Path) -> None:
    # queued images keep their place during the drain: the batcher runs until the lifespan stops
    from app.main import create_app
    from tests.app.harness import running, settings_for

    settings = settings_for(max_batch_size=2, max_delay_ms=300, models_file=tiny_classifier_file(tmp_path))
    app = create_app(settings)
    async with running(app) as client:
        first = asyncio.create_task(
            client.post("/v1/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        )
        batcher = app.state.service.registry.models[MODEL].batcher
        while batcher.queued == 0:  # queued: the batch waits 300 ms for a second image
            await asyncio.sleep(0.005)
        app.state.service.draining = True
        assert (await first).status_code == 200
        late = await client.post("/v1/classify", content=jpeg(), headers={"Content-Type": "image/jpeg"})
        assert late.status_code == 503 and late.json()["code"] == "DRAINING"

"""deploy/nginx/nginx.conf under a real nginx on 127.0.0.1 (``bench.balancer``), in front of:

- stand-in replicas (:class:`StubReplica`) that answer what a test sets, for nginx's rules one at a
  time: a pool-wide overload keeps every replica in rotation, a draining or starting replica leaves
  it, a request a replica received is never sent to a second one, a refused connection is;
- two real ``python -m app`` replicas under a client load: a drain (SIGTERM) loses no request; a
  crash (SIGKILL) fails at most the requests that were in flight on that replica; a burst over the
  whole pool gets the replicas' own 503 OVERLOADED, the pool answers 200 right after it, and the
  images the replicas ran equal the 200 answers (nothing ran twice);
- the page, its files and /docs behind the /vision/ path prefix, in a real browser too.

nginx is a Debian package (``apt-get install -y nginx``; ``.ci/run`` installs it): without it this
test fails, it does not skip.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.balancer import NGINX_DIR, Nginx, free_port
from tests.app.helpers import jpeg
from tests.browser.test_browser_page import browser
from tests.deploy.replicas import Load, Outcome, Replica, service_env, tiny_classifier_file, wait_for

pytestmark = pytest.mark.slow

__all__ = ["browser"]  # the headless Chromium fixture of tests/browser, reused

DRAIN_DELAY_S = 1.0
DRAIN_GRACE_S = 10.0
PREFIX = "/vision"


# -- nginx's access log ---------------------------------------------------------------------------

_LINE = re.compile(
    r'"(?P<request>[^"]*)" (?P<status>\d+) .* upstream=(?P<upstreams>.*) '
    r"upstream_status=(?P<statuses>.*) code=(?P<code>\S+) id=(?P<id>\S+)$"
)


@dataclass(frozen=True)
class Passage:
    """One request as nginx logged it: the replicas it tried, in order, and what each answered."""

    status: int
    upstreams: list[str]
    statuses: list[str]

    @property
    def retried(self) -> bool:
        return len(self.upstreams) > 1


def passages(nginx: Nginx, ids: Iterable[str]) -> dict[str, Passage]:
    """Request id -> its access-log line (``$upstream_addr``: ``,`` between tries, `` : `` between
    the first and the second pass), once every id of ``ids`` is there (nginx logs a request
    after its answer went out)."""
    wanted = set(ids)
    deadline = time.monotonic() + 15
    while True:
        found = {}
        for line in nginx.log_lines():
            match = _LINE.search(line)
            if match:
                found[match["id"]] = Passage(
                    int(match["status"]),
                    re.split(r" *[,:] +", match["upstreams"]),
                    re.split(r" *[,:] +", match["statuses"]),
                )
        missing = wanted - set(found)
        if not missing:
            return found
        assert time.monotonic() < deadline, f"nginx never logged {sorted(missing)[:5]}"
        time.sleep(0.05)


def post(url: str, body: bytes, request_id: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        url, content=body, headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id}, timeout=timeout
    )


# -- stand-in replicas ----------------------------------------------------------------------------


class StubReplica:
    """An HTTP/1.1 server on 127.0.0.1 that answers every request as the test says: ``status``
    with the service's error body, ``X-Error-Code`` and (503) ``Retry-After``, after ``delay_s``;
    or, with ``hang_up``, reads the whole request and closes the connection unanswered (a replica
    dying after it received the request). Counts the requests it received."""

    def __init__(self) -> None:
        self.status = 200
        self.code = ""
        self.delay_s = 0.0
        self.hang_up = False
        self.received = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stub._lock:
                    stub.received += 1
                if stub.hang_up:
                    self.close_connection = True
                    return
                time.sleep(stub.delay_s)
                if stub.status == 200:
                    body = b'{"results":[]}'
                else:
                    body = json.dumps(
                        {"error": f"stub {stub.port} says {stub.code}", "code": stub.code, "request_id": "x"}
                    ).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if stub.code:
                    self.send_header("X-Error-Code", stub.code)
                if stub.status == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answers(self, status: int, code: str = "", delay_s: float = 0.0) -> None:
        self.status, self.code, self.delay_s = status, code, delay_s

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[tuple[Nginx, StubReplica, StubReplica]]:
    """Two stand-in replicas behind a fresh nginx (fresh failure counts for every test)."""
    first, second = StubReplica(), StubReplica()
    nginx = Nginx(tmp_path, [first.port, second.port])
    try:
        nginx.wait_answering("/health/live")
        first.received = second.received = 0
        yield nginx, first, second
    finally:
        nginx.close()
        first.close()
        second.close()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def test_a_pool_wide_overload_keeps_every_replica_in_rotation(
    stubs: tuple[Nginx, StubReplica, StubReplica],
) -> None:
    nginx, first, second = stubs
    first.answers(503, "OVERLOADED")
    second.answers(503, "OVERLOADED")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: post(f"{nginx.url}/v1/classify", b"x", f"o{i}"), range(12)))
    for answer in answers:  # the replicas' own answer, Retry-After included
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", answer.text
        assert answer.json()["code"] == "OVERLOADED" and answer.json()["error"].startswith("stub ")
    # each request: its first attempt, then each replica once more, and no more
    assert first.received + second.received == 12 * 3
    log = "\n".join(nginx.log_lines())
    assert "temporarily disabled" not in log and "no live upstreams" not in log

    first.answers(200)
    second.answers(200)
    answer = post(f"{nginx.url}/v1/classify", b"x", "after")
    assert answer.status_code == 200
    assert not passages(nginx, ["after"])["after"].retried


@pytest.mark.parametrize("code", ["DRAINING", "NOT_READY", "OVERLOADED"])
def test_a_draining_or_starting_replica_leaves_the_rotation_a_full_one_does_not(
    stubs: tuple[Nginx, StubReplica, StubReplica], code: str
) -> None:
    nginx, refusing, serving = stubs
    refusing.answers(503, code)
    serving.answers(200, delay_s=0.2)  # busy: nginx's least_conn then prefers the other one
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post(f"{nginx.url}/v1/classify", b"x", f"r{i}"), range(16)))
    assert [a.status_code for a in answers] == [200] * 16  # every 503 went to the other replica
    assert refusing.received > 0, "the refusing replica was never tried: the test proves nothing"
    disabled = [
        line
        for line in nginx.log_lines()
        if "upstream server temporarily disabled" in line and refusing.address in line
    ]
    if code == "OVERLOADED":
        assert disabled == []
    else:
        assert disabled, f"nginx never counted the {code} replica as failed"


@pytest.mark.parametrize(("method", "sent_to"), [("POST", 1), ("GET", 2)])
def test_a_request_a_replica_received_goes_to_no_other_unless_idempotent(
    stubs: tuple[Nginx, StubReplica, StubReplica], method: str, sent_to: int
) -> None:
    nginx, first, second = stubs
    first.hang_up = second.hang_up = True  # both read the request, then drop the connection
    answer = httpx.request(method, f"{nginx.url}/v1/classify", content=b"x", headers={"X-Request-ID": "h"})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
    assert answer.json() == {
        "error": "no replica took or finished the request; retry later",
        "code": "UNAVAILABLE",
        "request_id": "h",
    }
    assert first.received + second.received == sent_to


def test_a_refused_connection_goes_to_another_replica(tmp_path: Path) -> None:
    serving = StubReplica()
    nginx = Nginx(tmp_path, [free_port(), serving.port])  # nothing listens on the first
    try:
        wait_for(lambda: _listening(nginx.port), "nginx to listen", timeout=30)  # no request yet
        answers = [post(f"{nginx.url}/v1/classify", b"x", f"c{i}") for i in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        logged = passages(nginx, [f"c{i}" for i in range(4)])
        assert any(logged[f"c{i}"].statuses == ["502", "200"] for i in range(4))
    finally:
        nginx.close()
        serving.close()


def test_nginx_answers_503_json_when_no_replica_is_up(tmp_path: Path) -> None:
    nginx = Nginx(tmp_path, [free_port(), free_port()])  # nothing listens there
    try:
        wait_for(lambda: _status(f"{nginx.url}/health/live") != 0, "nginx to start", timeout=30)
        response = post(f"{nginx.url}/v1/classify", jpeg(), "r-1")
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["code"] == "UNAVAILABLE" and response.json()["request_id"] == "r-1"
    finally:
        nginx.close()


# -- real replicas ----------------------------------------------------------------------------


def start_cluster(folder: Path, **settings: str) -> tuple[Nginx, list[Replica]]:
    env = service_env(tiny_classifier_file(folder), **settings)
    replicas = [Replica(f"replica-{i}", env, folder) for i in (1, 2)]
    for r in replicas:
        r.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda r: r.wait_ready(), replicas))
        nginx = Nginx(folder, [r.port for r in replicas])
        nginx.wait_answering()
    except BaseException:
        for r in replicas:
            r.close()
        raise
    return nginx, replicas


def stop_cluster(nginx: Nginx, replicas: list[Replica]) -> None:
    nginx.close()
    for r in replicas:
        r.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, list[Replica]]]:
    nginx, replicas = start_cluster(
        tmp_path_factory.mktemp("lb"), drain_delay_s=str(DRAIN_DELAY_S), drain_grace_s=str(DRAIN_GRACE_S)
    )
    yield nginx, replicas
    stop_cluster(nginx, replicas)


def test_nginx_limits_agree_with_the_service(cluster: tuple[Nginx, list[Replica]]) -> None:
    nginx, _ = cluster
    conf = (NGINX_DIR / "nginx.conf").read_text()
    limit = re.search(r"client_max_body_size (\d+)m;", conf)
    assert limit is not None
    from app.settings import Settings

    assert int(limit.group(1)) * 1024 * 1024 == Settings.model_fields["max_body_bytes"].default
    for path in ("/v1/classify", f"{PREFIX}/v1/classify"):  # nginx refuses it, with the service's body
        too_big = post(f"{nginx.url}{path}", b"\0" * (int(limit.group(1)) * 1024 * 1024 + 1), "big-1")
        assert too_big.status_code == 413
        assert too_big.json() == {
            "error": "request body is larger than the limit of 20 MiB",
            "code": "PAYLOAD_TOO_LARGE",
            "request_id": "big-1",
        }
    # a replica's own 413 (here: not an image of allowed size) passes untouched
    huge = Image.new("L", (8000, 6000))
    buffer = io.BytesIO()
    huge.save(buffer, "JPEG", quality=10)
    refused = post(f"{nginx.url}/v1/classify", buffer.getvalue(), "px-1")
    assert refused.status_code == 413 and refused.json()["code"] == "IMAGE_TOO_LARGE"
    # the request id goes through to the replica and back
    answer = post(f"{nginx.url}/v1/classify", jpeg(), "via-lb")
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "via-lb"
    assert answer.json()["request_id"] == "via-lb"


def test_a_drain_under_load_loses_no_request(cluster: tuple[Nginx, list[Replica]]) -> None:
    nginx, (drained, other) = cluster
    with Load(f"{nginx.url}/v1/classify", jpeg(96, 72, seed=7), clients=3) as load:
        wait_for(lambda: drained.served() > 0 and other.served() > 0, "both replicas to take requests")
        before = load.count(200)
        drained.signal(signal.SIGTERM)  # a deploy: drained, then started again on the same port
        code = drained.wait(timeout=DRAIN_DELAY_S + DRAIN_GRACE_S + 30)
        assert code in (0, -signal.SIGTERM), drained.log.read_text()[-2000:]
        assert load.count(200) > before, "the load stalled while a replica drained"
        drained.start()
        drained.wait_ready()
        wait_for(lambda: drained.served() > 0, "the restarted replica to take traffic again", timeout=90)
        outcomes = load.stop()

    logged = passages(nginx, [o.request_id for o in outcomes])
    failures = [o for o in outcomes if o.status != 200]
    assert not failures, (
        f"{len(failures)} of {len(outcomes)} failed: {[(o, logged.get(o.request_id)) for o in failures[:5]]}"
    )
    assert len(outcomes) > 100
    second_pass = sum(1 for o in outcomes if "503" in logged[o.request_id].statuses)
    print(
        f"\ndrain: {len(outcomes)} requests through nginx, all 200; "
        f"{second_pass} met a 503 and were sent again"
    )


def test_a_crash_fails_at_most_the_requests_in_flight_on_that_replica(
    cluster: tuple[Nginx, list[Replica]],
) -> None:
    nginx, (_, crashed) = cluster
    with Load(f"{nginx.url}/v1/classify", jpeg(96, 72, seed=8), clients=3) as load:
        wait_for(lambda: crashed.served() > 0, "the replica to take requests")
        killed_at = time.monotonic()
        crashed.signal(signal.SIGKILL)
        assert crashed.wait(timeout=30) == -signal.SIGKILL
        # the kernel closes a killed process's sockets only as it tears the process down (after
        # freeing its memory): until then connections to it are accepted, and the requests sent on
        # them are reset. Both ends of that span bound "in flight at the kill".
        gone_at = time.monotonic()
        during = load.count(200)
        wait_for(lambda: load.count(200) > during + 50, "requests to flow past the dead replica", timeout=60)
        crashed.start()  # the restart policy's new process
        crashed.wait_ready()
        served = crashed.served()
        wait_for(lambda: crashed.served() > served, "the restarted replica to take traffic", timeout=90)
        outcomes = load.stop()

    logged = passages(nginx, [o.request_id for o in outcomes])
    address = f"127.0.0.1:{crashed.port}"

    def in_flight_on_crashed(o: Outcome) -> bool:
        return o.sent <= gone_at and o.done >= killed_at and logged[o.request_id].upstreams[0] == address

    in_flight = [o for o in outcomes if in_flight_on_crashed(o)]
    failures = [o for o in outcomes if o.status != 200]
    for failure in failures:  # not run elsewhere: nginx's 503 UNAVAILABLE, the client may retry
        assert in_flight_on_crashed(failure), (failure, killed_at, gone_at, logged.get(failure.request_id))
        assert failure.status == 503 and failure.code == "UNAVAILABLE" and failure.retry_after == "1"
        assert logged[failure.request_id].upstreams == [address]  # sent to no other replica
    after = [o for o in outcomes if o.sent > gone_at]
    assert after and all(o.status == 200 for o in after)
    refused = sum(1 for o in after if logged[o.request_id].retried)
    print(
        f"\ncrash: {len(outcomes)} requests; the killed process was gone "
        f"{1000 * (gone_at - killed_at):.0f} ms after SIGKILL; {len(in_flight)} requests in flight "
        f"on it meanwhile, {len(failures)} of them failed (503 UNAVAILABLE); all {len(after)} "
        f"requests after it was gone 200, {refused} of them refused by the dead replica and sent to "
        "the other"
    )


def big_jpeg(width: int, height: int, seed: int) -> bytes:
    """A large photo-sized JPEG that takes the replica real time to decode."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR).save(
        buffer, "JPEG", quality=90
    )
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_queues(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, list[Replica]]]:
    """Two replicas that each hold one image waiting, at most (the issue's setting)."""
    nginx, replicas = start_cluster(tmp_path_factory.mktemp("lb-small"), max_queue_images="1", max_files="1")
    yield nginx, replicas
    stop_cluster(nginx, replicas)


def test_a_burst_over_the_pool_then_every_request_answered_and_run_once(
    small_queues: tuple[Nginx, list[Replica]],
) -> None:
    nginx, replicas = small_queues
    image = big_jpeg(2400, 1800, seed=3)
    ran_before = sum(r.metric("vision_batch_size_sum") for r in replicas)
    served_before = sum(r.served() for r in replicas)

    # 36 large JPEGs from 12 clients at once
    with ThreadPoolExecutor(12) as pool:
        burst = list(pool.map(lambda i: post(f"{nginx.url}/v1/classify", image, f"burst-{i}"), range(36)))
    statuses = [(a.status_code, a.json().get("code", "")) for a in burst]
    for answer in burst:  # 200, or a replica's own 503 OVERLOADED with Retry-After
        assert answer.status_code in (200, 503), answer.text
        if answer.status_code == 503:
            assert answer.json()["code"] == "OVERLOADED" and answer.headers["Retry-After"] == "1"
            assert "too many images waiting" in answer.json()["error"]
    assert (200, "") in statuses and (503, "OVERLOADED") in statuses, "the burst did not overload the pool"
    log = "\n".join(nginx.log_lines())
    assert "no live upstreams" not in log and "temporarily disabled" not in log

    # then single requests every 0.25 s for 3 s, as soon as the burst is answered: all 200
    after = []
    for i in range(12):
        after.append(post(f"{nginx.url}/v1/classify", image, f"after-{i}").status_code)
        time.sleep(0.25)
    assert after == [200] * 12

    # every 200 ran once: the images the replicas ran, and their 200 answers, equal the 200s here
    answered = statuses.count((200, "")) + len(after)
    assert sum(r.metric("vision_batch_size_sum") for r in replicas) - ran_before == answered
    assert sum(r.served() for r in replicas) - served_before == answered
    logged = passages(nginx, [f"burst-{i}" for i in range(36)])
    retried = sum(1 for i in range(36) if logged[f"burst-{i}"].retried)
    print(
        f"\nburst: 36 requests from 12 clients -> {statuses.count((200, ''))} x 200, "
        f"{statuses.count((503, 'OVERLOADED'))} x 503 OVERLOADED (each replica's own), {retried} sent to "
        f"the other replica after a 503; then 12 of 12 single requests 200; the replicas ran {answered} "
        "images for 200 answers"
    )


# -- behind a path prefix ---------------------------------------------------------------------------


def test_the_page_its_files_and_docs_behind_a_path_prefix(cluster: tuple[Nginx, list[Replica]]) -> None:
    nginx, _ = cluster
    base = f"{nginx.url}{PREFIX}/"
    bare = httpx.get(f"{nginx.url}{PREFIX}")
    assert bare.status_code == 301 and bare.headers["Location"] == f"{PREFIX}/"

    page = httpx.get(base)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    files = [urljoin(base, ref) for ref in refs if not ref.startswith("data:")]
    assert len(files) == 2  # the stylesheet and the script
    for url in files:
        assert urlsplit(url).path.startswith(f"{PREFIX}/ui/"), url
        assert httpx.get(url).status_code == 200, url
    # the API paths the script calls, resolved against the page as a browser does
    script = httpx.get(urljoin(base, "ui/app.js")).text
    calls = re.findall(r'callApi\([`"]([^`"$?]+)', script)
    assert calls and all(not c.startswith("/") for c in calls), calls
    assert httpx.get(urljoin(base, "v1/models")).json()["models"][0]["name"] == "vgg16-tiny"

    docs = httpx.get(f"{base}docs")
    assert docs.status_code == 200
    (openapi_url,) = re.findall(r"url: '([^']+)'", docs.text)
    assert openapi_url == f"{PREFIX}/openapi.json"
    schema = httpx.get(f"{nginx.url}{openapi_url}").json()
    assert schema["servers"][0]["url"] == PREFIX and "/v1/classify" in schema["paths"]
    answer = post(f"{base}v1/classify", jpeg(), "prefixed")
    assert answer.status_code == 200 and answer.json()["request_id"] == "prefixed"

    # at /, a prefix a client claims is replaced by nginx's (none)
    plain = httpx.get(f"{nginx.url}/docs", headers={"X-Forwarded-Prefix": "/elsewhere"})
    assert re.findall(r"url: '([^']+)'", plain.text) == ["/openapi.json"]


def test_the_page_works_in_a_browser_behind_the_prefix(
    cluster: tuple[Nginx, list[Replica]], browser: Any, tmp_path: Path
) -> None:
    nginx, _ = cluster
    (tmp_path / "photo.jpg").write_bytes(jpeg(320, 240, seed=5))
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
    try:
        page.goto(f"{nginx.url}{PREFIX}/")
        page.wait_for_selector("body[data-state='idle']")  # the model list came through v1/models
        assert page.input_value("#model") == "vgg16-tiny"
        page.set_input_files("#file", str(tmp_path / "photo.jpg"))
        page.wait_for_selector("#predictions li")
    finally:
        page.close()
    # every request went under the prefix (blob: is the chosen photo, shown from the browser's memory)
    urls = [urlsplit(r.split(" ", 1)[1]) for r in requests if " blob:" not in r]
    assert all(u.netloc == f"127.0.0.1:{nginx.port}" and u.path.startswith(f"{PREFIX}/") for u in urls), (
        requests
    )
    assert {u.path for u in urls} >= {f"{PREFIX}/ui/app.js", f"{PREFIX}/ui/app.css", f"{PREFIX}/v1/models"}
    assert any(r.startswith(f"POST {nginx.url}{PREFIX}/v1/classify?") for r in requests), requests

"""The load generator against the tiny local server: bounds, status accounting, response framing,
open-loop scheduling and request bodies. No assertion on how fast anything is."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import itertools
import json
import socket
from typing import TYPE_CHECKING

import pytest

from bench.load import (
    STATUS_TIMEOUT,
    ClosedConfig,
    OpenConfig,
    Payload,
    Target,
    arrival_offsets,
    make_payload,
    run_closed,
    run_open,
)

if TYPE_CHECKING:
    from tests.bench.conftest import TinyServer

JPEG_A = b"\xff\xd8\xff\xe0fake-jpeg-A\xff\xd9"
JPEG_B = b"\xff\xd8\xff\xe0fake-jpeg-B-longer\xff\xd9"


def _payloads(k: int = 1) -> list[Payload]:
    return [make_payload("a", [JPEG_A] * k), make_payload("b", [JPEG_B] * k)]


def test_target_refuses_non_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        Target(8000, "/x", host)
    for host in ("10.0.0.1", "192.168.1.1", "8.8.8.8", "example.com", "0.0.0.0"):
        with pytest.raises(ValueError, match="loopback"):
            Target(8000, "/x", host)


def test_multipart_payload_carries_each_image_as_a_file_part() -> None:
    payload = make_payload("two", [JPEG_A, JPEG_B])
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {payload.content_type}\r\n\r\n".encode() + payload.body
    )
    parts = list(message.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["file", "file"]
    assert [p.get_content() for p in parts] == [JPEG_A, JPEG_B]
    assert payload.images == 2


def test_json_and_raw_payloads() -> None:
    one = json.loads(make_payload("j", [JPEG_A], "json").body)
    assert base64.b64decode(one["image"]) == JPEG_A
    many = json.loads(make_payload("j", [JPEG_A, JPEG_B], "json").body)
    assert [base64.b64decode(x) for x in many["images"]] == [JPEG_A, JPEG_B]
    raw = make_payload("r", [JPEG_A], "raw")
    assert raw.body == JPEG_A and raw.content_type == "image/jpeg"
    with pytest.raises(ValueError):
        make_payload("r", [JPEG_A, JPEG_B], "raw")


def test_closed_loop_stops_at_the_request_count(fresh_server: TinyServer) -> None:
    cfg = ClosedConfig(concurrency=4, max_requests=40, max_seconds=60, warmup_requests=0)
    payloads = _payloads()
    level = run_closed(Target(fresh_server.port, "/ok"), payloads, cfg)
    assert fresh_server.count("/ok") == 40  # exactly the bound: no request more, none lost
    # answers after the window closed (the bound was reached) are drained, not measured
    assert level["ok"] == level["requests"] and level["ok"] + level["drained"] == 40
    assert level["images"] == level["ok"] and level["errors"] == 0 and level["n_503"] == 0
    assert level["status_counts"] == {"200": level["ok"]}
    assert level["latency_ms"]["p50"] is not None and level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
    bodies = {body for _, body in fresh_server.requests}
    assert bodies == {p.body for p in payloads}  # both payloads are used, unaltered


def test_closed_loop_stops_at_its_time_bound(fresh_server: TinyServer) -> None:
    cfg = ClosedConfig(concurrency=2, max_requests=10**9, max_seconds=0.5, warmup_requests=0)
    level = run_closed(Target(fresh_server.port, "/delay50"), _payloads(), cfg)
    assert 0 < fresh_server.count("/delay50") < 10**9
    assert level["ok"] > 0 and level["errors"] == 0 and level["duration_s"] >= 0.5


def test_window_runs_its_full_length_after_a_slow_warmup(fresh_server: TinyServer) -> None:
    # answers come one per 50 ms; the warm-up bound (0 s) passes before the first one: the window
    # opens at that answer and still lasts max_seconds, so the level measures something
    cfg = ClosedConfig(
        concurrency=4, max_requests=10**6, max_seconds=0.4, warmup_requests=10**6, warmup_max_s=0
    )
    level = run_closed(Target(fresh_server.port, "/delay50"), _payloads(), cfg)
    assert level["duration_s"] >= 0.4 and level["ok"] >= 1 and not level["warmup_included"]


def test_warmup_answers_are_not_measured(fresh_server: TinyServer) -> None:
    cfg = ClosedConfig(concurrency=2, max_requests=30, max_seconds=60, warmup_requests=10)
    level = run_closed(Target(fresh_server.port, "/ok"), _payloads(), cfg)
    assert fresh_server.count("/ok") == 30
    assert level["ok"] <= 20  # the first 10 answers (and those before the window opened) are left out
    assert not level["warmup_included"]


def test_images_per_request_are_counted(fresh_server: TinyServer) -> None:
    cfg = ClosedConfig(concurrency=2, max_requests=10, max_seconds=60, warmup_requests=0)
    level = run_closed(Target(fresh_server.port, "/ok"), _payloads(k=3), cfg)
    assert level["images"] == 3 * level["ok"] and level["ok"] + level["drained"] == 10
    assert level["images_per_request"] == 3


@pytest.mark.parametrize(("path", "with_retry_after"), [("/busy", True), ("/busy-bare", False)])
def test_503s_are_counted_apart_from_errors(
    fresh_server: TinyServer, path: str, with_retry_after: bool
) -> None:
    cfg = ClosedConfig(concurrency=2, max_requests=12, max_seconds=60, warmup_requests=0, backoff_503_s=0)
    level = run_closed(Target(fresh_server.port, path), _payloads(), cfg)
    assert level["n_503"] + level["drained"] == 12 and level["n_503"] > 0
    assert level["ok"] == 0 and level["errors"] == 0
    assert level["n_503_without_retry_after"] == (0 if with_retry_after else level["n_503"])
    assert level["images_per_s"] == 0


@pytest.mark.parametrize("path", ["/chunked", "/close"])
def test_chunked_and_closing_responses_are_read_whole(fresh_server: TinyServer, path: str) -> None:
    cfg = ClosedConfig(concurrency=3, max_requests=15, max_seconds=60, warmup_requests=0)
    level = run_closed(Target(fresh_server.port, path), _payloads(), cfg)
    assert level["ok"] + level["drained"] == 15 and level["ok"] > 0 and level["errors"] == 0
    assert fresh_server.count(path) == 15


def test_timeouts_and_refused_connections_are_errors(fresh_server: TinyServer) -> None:
    cfg = ClosedConfig(concurrency=2, max_requests=2, max_seconds=60, warmup_requests=0, timeout_s=0.2)
    level = run_closed(Target(fresh_server.port, "/slow"), _payloads(), cfg)
    assert level["timeouts"] + level["drained"] == 2 and level["timeouts"] > 0
    assert level["errors"] == level["timeouts"] and level["ok"] == 0
    assert level["status_counts"] == {str(STATUS_TIMEOUT): level["timeouts"]}

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    level = run_closed(Target(dead, "/ok"), _payloads(), ClosedConfig(1, 3, 5, warmup_requests=0))
    assert level["transport_errors"] + level["drained"] == 3 and level["transport_errors"] > 0
    assert level["ok"] == 0


def test_client_processes_share_the_load(fresh_server: TinyServer) -> None:
    cfg = ClosedConfig(concurrency=4, max_requests=40, max_seconds=60, warmup_requests=0)
    level = run_closed(Target(fresh_server.port, "/ok"), _payloads(), cfg, processes=2)
    assert level["client_processes"] == 2
    assert fresh_server.count("/ok") == 40 and level["errors"] == 0
    assert level["client_cpu_s"] > 0


def test_arrival_offsets() -> None:
    uniform = arrival_offsets(10.0, 1.0, 1000, "uniform", seed=0)
    assert uniform == pytest.approx([i / 10 for i in range(10)])
    assert len(arrival_offsets(10.0, 1.0, 4, "uniform", seed=0)) == 4  # the count bound
    poisson = arrival_offsets(200.0, 10.0, 10**6, "poisson", seed=1)
    assert poisson == arrival_offsets(200.0, 10.0, 10**6, "poisson", seed=1)  # seeded
    assert all(0 <= a < b < 10.0 for a, b in itertools.pairwise(poisson))
    assert len(poisson) == pytest.approx(2000, rel=0.1)  # ~ rate x duration


def test_open_loop_latency_runs_from_the_scheduled_time(fresh_server: TinyServer) -> None:
    # 30 requests scheduled over 0.3 s, each answer 50 ms, one at a time: the server cannot keep up,
    # so requests wait there; their latency must include that wait (no coordinated omission)
    cfg = OpenConfig(rate_rps=100.0, duration_s=0.3, arrival="uniform", timeout_s=10)
    level = run_open(Target(fresh_server.port, "/delay50"), _payloads(), cfg)
    assert level["ok"] == level["requests"] == level["sent"] == 30 == fresh_server.count("/delay50")
    assert level["rate_target_rps"] == 100.0 and level["rate_scheduled_rps"] == pytest.approx(100.0)
    assert 0 < level["rate_offered_rps"] <= level["rate_scheduled_rps"] + 1e-6
    assert level["rate_achieved_rps"] < level["rate_offered_rps"]
    # the last request was scheduled at 0.29 s and served 30th: >= 30 x 50 ms after the start
    assert level["latency_ms"]["max"] >= 1000 * (30 * 0.05 - 0.3)
    assert (
        level["send_lag_ms_p99"] >= 0 and level["latency_from_send_ms"]["max"] <= level["latency_ms"]["max"]
    )


def test_open_loop_sends_each_request_at_its_time_without_queueing(fresh_server: TinyServer) -> None:
    # 10 requests scheduled within 0.1 s, none answered for 2 s: every one must be on the wire at
    # once (a connection each), not waiting in the client for an earlier answer
    cfg = OpenConfig(rate_rps=100.0, duration_s=0.1, arrival="uniform", timeout_s=10)
    level = run_open(Target(fresh_server.port, "/slow"), _payloads(), cfg)
    assert level["scheduled"] == level["sent"] == level["ok"] == 10 and level["not_sent"] == 0
    assert level["in_flight_max"] == 10 == fresh_server.count("/slow")
    assert 0 < level["in_flight_mean"] <= 10
    assert level["errors"] == level["abandoned"] == 0


def test_open_loop_drops_what_exceeds_its_in_flight_bound_instead_of_queueing_it(
    fresh_server: TinyServer,
) -> None:
    cfg = OpenConfig(rate_rps=100.0, duration_s=0.1, arrival="uniform", max_in_flight=3, timeout_s=10)
    level = run_open(Target(fresh_server.port, "/slow"), _payloads(), cfg)
    # the first 3 are in flight for 2 s, long after the other 7 were due: those are not sent, ever
    assert fresh_server.count("/slow") == 3 == level["sent"] == level["ok"] == level["in_flight_max"]
    assert level["not_sent"] == 7 and level["scheduled"] == 10 and level["errors"] == 0


def test_open_loop_reports_abandoned_requests_apart_from_errors(fresh_server: TinyServer) -> None:
    # the drain bound (0.3 s after the last send) cuts requests the server answers after 2 s
    cfg = OpenConfig(rate_rps=20.0, duration_s=0.2, arrival="uniform", timeout_s=5, drain_s=0.3)
    level = run_open(Target(fresh_server.port, "/slow"), _payloads(), cfg)
    assert level["abandoned"] == level["sent"] == 4 and level["ok"] == 0
    assert level["timeouts"] == level["errors"] == level["requests"] == 0  # not the server's failures
    assert level["latency_ms"]["p50"] is None


def test_open_loop_client_processes_share_the_rate(fresh_server: TinyServer) -> None:
    cfg = OpenConfig(rate_rps=40.0, duration_s=0.25, arrival="uniform", timeout_s=10)
    level = run_open(Target(fresh_server.port, "/ok"), _payloads(), cfg, processes=2)
    assert level["client_processes"] == 2 and level["rate_scheduled_rps"] == pytest.approx(40.0)
    # (the level's window is where both processes measured: an early answer may fall before it)
    assert level["sent"] == 10 == fresh_server.count("/ok") and level["ok"] > 0 and level["errors"] == 0

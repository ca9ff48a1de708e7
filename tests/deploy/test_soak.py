"""bench/soak.py: the verdict's arithmetic, the /proc sampler, and a short run end to end against
a stub server in this process (the real soak, against ``python -m app``, is run by hand: README)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.soak import Limits, ProcSample, judge, main, sample_process


def samples(
    rss: list[int], fds: list[int] | None = None, threads: list[int] | None = None
) -> list[ProcSample]:
    n = len(rss)
    fds = fds or [20] * n
    threads = threads or [10] * n
    return [ProcSample(i * 100, float(i), rss[i], fds[i], threads[i]) for i in range(n)]


def test_warmup_growth_is_not_judged_and_flat_passes() -> None:
    # 100 -> 200 MB during the warm-up (first 200 requests), then flat within 1 %
    verdict = judge(samples([100_000, 150_000, 200_000, 201_000, 199_500, 202_000]), 200, Limits(), 0)
    assert verdict["passed"], verdict
    assert verdict["rss_kb"]["after_warmup"] == 200_000 and verdict["rss_growth_pct"] == pytest.approx(1.0)
    assert verdict["judged_requests"] == 300


def test_growth_past_the_limit_fails() -> None:
    verdict = judge(samples([200_000, 204_000, 208_000, 211_000]), 0, Limits(max_rss_growth_pct=5), 0)
    assert not verdict["passed"] and verdict["checks"] == {
        "rss_growth": False,
        "fds_flat": True,
        "threads_flat": True,
        "all_answered_200": True,
    }
    assert verdict["rss_growth_pct"] == pytest.approx(5.5)
    assert verdict["rss_kb_per_1000_requests"] == pytest.approx(11_000 / 300 * 1000)


def test_a_peak_that_comes_back_passes_but_is_reported() -> None:
    verdict = judge(samples([100_000, 130_000, 101_000]), 0, Limits(), 0)
    assert verdict["checks"]["rss_growth"] and verdict["rss_peak_growth_pct"] == pytest.approx(30.0)


@pytest.mark.parametrize(
    ("fds", "threads", "failed", "broken"),
    [
        ([20, 20, 40], None, 0, "fds_flat"),  # a descriptor leak
        ([20, 26, 20], None, 0, None),  # client connections between rounds: within the tolerance
        (None, [10, 10, 13], 0, "threads_flat"),
        (None, None, 1, "all_answered_200"),
    ],
)
def test_fds_threads_and_failures(
    fds: list[int] | None, threads: list[int] | None, failed: int, broken: str | None
) -> None:
    verdict = judge(
        samples([100_000] * 3, fds, threads), 0, Limits(fd_tolerance=8, thread_tolerance=2), failed
    )
    assert [k for k, ok in verdict["checks"].items() if not ok] == ([broken] if broken else [])


def test_needs_two_samples_after_the_warmup() -> None:
    with pytest.raises(ValueError, match="two samples"):
        judge(samples([1, 2, 3]), 250, Limits(), 0)


def test_sampler_reads_this_process() -> None:
    threads_before = threading.active_count()
    sample = sample_process(os.getpid(), 7, 1.5)
    assert sample.requests == 7 and sample.rss_kb > 10_000
    assert abs(sample.fds - len(os.listdir(f"/proc/{os.getpid()}/fd"))) <= 1
    assert sample.threads >= threads_before
    r, w = os.pipe()  # two more descriptors
    try:
        assert sample_process(os.getpid()).fds >= sample.fds + 2
    finally:
        os.close(r)
        os.close(w)


# -- end to end, against a stub server in a thread of this process --------------------------------


async def _predict(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"results": []})


@pytest.fixture(scope="module")
def stub_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    app = Starlette(routes=[Route("/v1/models/{name}/predict", _predict, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(timeout=30)


def test_a_short_soak_end_to_end(stub_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    argv = ["--port", str(stub_port), "--pid", str(os.getpid()), "--requests", "300", "--warmup", "100"]
    argv += ["--sample-every", "50", "--clients", "2", "--image-size", "64x48", "--out", str(out)]
    argv += ["--thread-tolerance", "50", "--max-rss-growth-pct", "50"]  # this process hosts pytest too
    code = main(argv)
    result = json.loads(out.read_text())
    assert result["requests"] == 300 and result["schema"] == "vision-serve-soak/1"
    assert len(result["samples"]) == 7  # one before, one per round of 50
    assert [s["requests"] for s in result["samples"]] == [0, 50, 100, 150, 200, 250, 300]
    assert result["verdict"]["failed_requests"] == 0 and result["verdict"]["judged_requests"] == 200
    assert code == (0 if result["verdict"]["passed"] else 1)
    printed = capsys.readouterr().out
    assert "soak: 300 requests" in printed and "RSS after 100 warm-up requests" in printed


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    assert main(["--port", "1", "--out", str(tmp_path / "x.json")]) == 2  # --port without --pid
    assert main(["--requests", "10", "--warmup", "10", "--out", str(tmp_path / "x.json")]) == 2


# -- through the load balancer: a short run of the real thing (README: the 10,000-request one) ----


@pytest.mark.slow
def test_a_short_soak_through_nginx_with_a_restart(tmp_path: Path) -> None:
    from bench.soak_lb import main as soak_lb_main

    out = tmp_path / "soak_lb.json"
    # the restart comes at request 200; a restarted replica is ready again only after torch's import,
    # the model's load and warm-up (about 20 s on a slow 2-core machine, 2,000 requests here), so
    # 5,000 leave it enough traffic to be sampled past its own warm-up of 400
    argv = ["--requests", "5000", "--warmup", "400", "--sample-every", "100", "--restart-at", "0.04"]
    argv += ["--clients", "4", "--image-size", "160x120", "--max-rss-growth-pct", "10", "--out", str(out)]
    code = soak_lb_main(argv)
    result = json.loads(out.read_text())
    assert result["schema"] == "vision-serve-soak-lb/1" and result["requests"] == 5000
    # nothing lost while replica 2 drained, was down and came back
    assert result["failed_requests"] == 0 and result["checks"]["all_answered_200"]
    assert result["checks"]["restarted_midway"] and result["restart"]["error"] is None
    processes = result["processes"]
    assert [p["replica"] for p in processes] == ["replica-1", "replica-2", "replica-2"]
    assert processes[1]["pid"] != processes[2]["pid"]
    # the new process took traffic: it was sampled while requests kept coming, and judged
    judged = [p for p in processes if "verdict" in p]
    assert processes[0] in judged and processes[2] in judged, [p.get("not_judged") for p in processes]
    for p in judged:
        verdict = p["verdict"]
        assert verdict["checks"]["fds_flat"] and verdict["checks"]["threads_flat"], (p["replica"], verdict)
        assert verdict["checks"]["rss_growth"], (p["replica"], verdict["rss_kb"])
    assert code == 0 and result["passed"]

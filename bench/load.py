"""HTTP/1.1 load generator for servers on this machine's loopback: closed and open loop.

A lean asyncio client over raw sockets with keep-alive. Each request's bytes are built once; a
response is read by its status line, ``Content-Length`` (or chunks) and ``Retry-After`` header
and never parsed further, so the client costs the server's cores little. It measures its own
CPU time (``time.process_time`` in every client process) and reports it with each level.

Two ways to load a server:

- **closed loop** (:func:`run_closed`): ``concurrency`` clients, each sends its next request as
  soon as the last one answered. Answers before the window opens are not measured: it opens at
  the ``warmup_requests``-th answer, or the first after ``warmup_max_s``. It then runs for
  ``max_seconds`` or until ``max_requests`` were sent (warm-up included); requests in flight at
  its end are waited for (``drain_s``) but not counted.
- **open loop** (:func:`run_open`): requests are scheduled at a fixed rate (Poisson or uniform
  arrivals) whatever the server does, and each is sent at its time on a connection of its own (an
  idle keep-alive one, else a new one): the client never queues a request behind another. The only
  bound is ``max_in_flight``; a request due while that many are unanswered is not sent at all and
  counted as ``not_sent``, never delayed. The level reports the load it really offered
  (``rate_offered_rps``: requests sent over the span in which they left, against
  ``rate_target_rps``), the requests in flight it reached (``in_flight_max``, and
  ``in_flight_mean`` over the sending)
  and ``send_lag_ms_p99``, how late requests left their schedule (the client's CPU). Latency runs
  from the *scheduled* send time (no coordinated omission); ``latency_from_send_ms`` is the
  server's part alone. Requests still unanswered when the level ends (``drain_s`` after the last
  send) are ``abandoned``: counted apart, neither errors nor timeouts.

Both are bounded in request count and time and stop by themselves. Only loopback hosts are
allowed (127.0.0.0/8, ``localhost``, ``::1``): :class:`Target` refuses anything else.

Status codes in samples: the HTTP status, or :data:`STATUS_TRANSPORT` (connection refused, reset,
malformed answer) or :data:`STATUS_TIMEOUT` (no answer within ``timeout_s``).

Run standalone: ``python -m bench.load --port 8000 --path /v1/classify --image a.jpg
--concurrency 1,4,16`` (``--help`` for the rest). No torch import: it starts in well under a second.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import ipaddress
import json
import multiprocessing
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from bench.stats import latency_summary_ms, percentile

STATUS_TRANSPORT = 0
STATUS_TIMEOUT = -1

BodyFormat = Literal["multipart", "raw", "json"]
Arrival = Literal["poisson", "uniform"]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and literal loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Payload:
    """One request body: ``images`` images encoded as ``content_type``."""

    name: str
    content_type: str
    body: bytes
    images: int


def make_payload(
    name: str,
    images: Sequence[bytes],
    body_format: BodyFormat = "multipart",
    media_type: str = "image/jpeg",
    field_name: str = "file",
) -> Payload:
    """A request body carrying ``images`` (encoded image files, in order).

    - ``multipart``: one ``file`` part per image (api.md's batch form);
    - ``raw``: the bytes themselves with ``Content-Type: media_type`` (one image only);
    - ``json``: ``{"image": base64}`` for one image, ``{"images": [...]}`` for several.
    """
    if not images:
        raise ValueError("a payload needs at least one image")
    if body_format == "raw":
        if len(images) != 1:
            raise ValueError("a raw body carries exactly one image")
        return Payload(name, media_type, bytes(images[0]), 1)
    if body_format == "json":
        encoded = [base64.b64encode(b).decode("ascii") for b in images]
        doc: dict[str, object] = {"image": encoded[0]} if len(encoded) == 1 else {"images": encoded}
        return Payload(name, "application/json", json.dumps(doc).encode(), len(images))
    if body_format != "multipart":
        raise ValueError(f"unknown body format {body_format!r}")
    boundary = uuid.uuid4().hex
    extension = media_type.rpartition("/")[2]
    parts: list[bytes] = []
    for i, data in enumerate(images):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; '
            f'filename="image{i}.{extension}"\r\nContent-Type: {media_type}\r\n\r\n'.encode()
        )
        parts.append(bytes(data))
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return Payload(name, f"multipart/form-data; boundary={boundary}", b"".join(parts), len(images))


@dataclass(frozen=True)
class Target:
    """Where requests go: ``POST http://host:port/path`` with extra ``headers``."""

    port: int
    path: str
    host: str = "127.0.0.1"
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not is_loopback(self.host):
            raise ValueError(f"the load generator only targets loopback addresses, not {self.host!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")

    def request_bytes(self, payload: Payload) -> bytes:
        """The full HTTP/1.1 request for ``payload`` (keep-alive)."""
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "User-Agent: bench.load",
            "Accept: */*",
            f"Content-Type: {payload.content_type}",
            f"Content-Length: {len(payload.body)}",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload.body


@dataclass(slots=True)
class Sample:
    """One request: ``start`` (its scheduled time in open loop, else its send time) and ``end``
    on ``time.monotonic()``, the answer's status, the images it carried, whether a 503 carried
    ``Retry-After``, and ``lag`` = actual send time - ``start`` (open loop only)."""

    start: float
    end: float
    status: int
    images: int
    retry_after: bool = False
    lag: float = 0.0


class _Connection:
    """One keep-alive HTTP/1.1 connection; reopened after errors or ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def roundtrip(self, request: bytes, timeout_s: float) -> tuple[int, bool]:
        """Send ``request`` and read the whole answer: (status, has Retry-After)."""
        try:
            async with asyncio.timeout(timeout_s):
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                assert self.reader is not None
                self.writer.write(request)
                await self.writer.drain()
                status, retry_after, keep_alive = await read_response(self.reader)
        except TimeoutError:
            self.close()
            return STATUS_TIMEOUT, False
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return STATUS_TRANSPORT, False
        if not keep_alive:
            self.close()
        return status, retry_after


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bool]:
    """Read one HTTP/1.x response: (status, has Retry-After, connection stays open).

    The body is read (``Content-Length``, chunked, or up to EOF) and thrown away.
    Raises ValueError on a malformed status line or header.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if not version.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(rest[:3])
    length: int | None = None
    chunked = retry_after = False
    keep_alive = version != b"HTTP/1.0"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            keep_alive = b"close" not in value.lower()
        elif name == b"retry-after":
            retry_after = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
                    pass
                break
            await reader.readexactly(size + 2)  # chunk + CRLF
    elif length is not None:
        await reader.readexactly(length)
    elif status >= 200 and status not in (204, 304):
        await reader.read()  # no length: the body runs to EOF
        keep_alive = False
    return status, retry_after, keep_alive


@dataclass
class RawRun:
    """What one client process measured: samples, the measurement window, its CPU seconds; in open
    loop also the requests scheduled, those not sent (``max_in_flight`` reached), the seconds over
    which the sent ones left, and the in-flight maximum and time average."""

    samples: list[Sample]
    window_start: float
    window_end: float
    cpu_s: float
    warmup_included: bool = False
    abandoned: int = 0
    scheduled: int = 0
    not_sent: int = 0
    send_span_s: float = 0.0
    in_flight_max: int = 0
    in_flight_mean: float = 0.0


@dataclass(frozen=True)
class ClosedConfig:
    """A closed-loop level. Bounds: ``max_requests`` sent in all (warm-up included); sending stops
    ``max_seconds`` after the window opens, and by ``warmup_max_s + timeout_s + max_seconds`` in
    any case; answers are then awaited ``drain_s`` more at most."""

    concurrency: int
    max_requests: int = 10_000
    max_seconds: float = 30.0
    warmup_requests: int | None = None  # None: one per client
    warmup_max_s: float = 10.0
    timeout_s: float = 60.0
    drain_s: float | None = None  # None: timeout_s + 1
    backoff_503_s: float = 0.05

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_requests < 1 or self.max_seconds <= 0 or self.timeout_s <= 0:
            raise ValueError(f"bad closed-loop bounds: {self}")


@dataclass(frozen=True)
class OpenConfig:
    """An open-loop level: ``rate_rps`` requests per second for ``duration_s`` (at most
    ``max_requests``), at most ``max_in_flight`` unanswered at once (one connection each); answers
    are awaited ``drain_s`` after the last send."""

    rate_rps: float
    duration_s: float = 10.0
    max_requests: int = 10_000
    arrival: Arrival = "poisson"
    seed: int = 0
    max_in_flight: int = 4096
    timeout_s: float = 60.0
    drain_s: float | None = None  # None: timeout_s + 1

    def __post_init__(self) -> None:
        if self.rate_rps <= 0 or self.duration_s <= 0 or self.max_requests < 1 or self.max_in_flight < 1:
            raise ValueError(f"bad open-loop bounds: {self}")
        if self.arrival not in ("poisson", "uniform"):
            raise ValueError(f"arrival must be poisson or uniform, got {self.arrival!r}")


def arrival_offsets(
    rate_rps: float, duration_s: float, max_requests: int, arrival: Arrival, seed: int
) -> list[float]:
    """Send times in seconds from the start: exponential gaps of mean 1/rate (Poisson) or
    equal gaps (uniform), all < ``duration_s``, at most ``max_requests``."""
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    while len(offsets) < max_requests:
        if arrival == "poisson":
            t += rng.expovariate(rate_rps)
        else:
            t = len(offsets) / rate_rps  # no accumulated rounding
        if t >= duration_s:
            break
        offsets.append(t)
    return offsets


async def _closed_loop(
    target: Target, payloads: Sequence[Payload], cfg: ClosedConfig, first_payload: int = 0
) -> RawRun:
    requests = [target.request_bytes(p) for p in payloads]
    drain_s = cfg.drain_s if cfg.drain_s is not None else cfg.timeout_s + 1.0
    warmup = cfg.warmup_requests if cfg.warmup_requests is not None else cfg.concurrency
    cpu0 = time.process_time()
    t_start = time.monotonic()
    # sending stops max_seconds after the window opened; a window that never opens (no answers)
    # closes with the warm-up bound. Some answer (or timeout) comes within timeout_s of any time,
    # so the window opens by t_start + warmup_max_s + timeout_s: all of it is bounded.
    hard_deadline = t_start + cfg.warmup_max_s + cfg.timeout_s + cfg.max_seconds
    samples: list[Sample] = []
    state = {"sent": 0, "completed": 0}
    window: dict[str, float] = {}
    if warmup <= 0:
        window["start"] = t_start

    async def client(i: int) -> None:
        conn = _Connection(target.host, target.port)
        k = first_payload + i
        try:
            while True:
                now = time.monotonic()
                if "end" in window:
                    return
                deadline = window["start"] + cfg.max_seconds if "start" in window else hard_deadline
                if state["sent"] >= cfg.max_requests or now >= min(deadline, hard_deadline):
                    window.setdefault("end", now)
                    return
                state["sent"] += 1
                index = k % len(requests)
                k += 1
                t0 = time.monotonic()
                status, retry_after = await conn.roundtrip(requests[index], cfg.timeout_s)
                t1 = time.monotonic()
                state["completed"] += 1
                samples.append(Sample(t0, t1, status, payloads[index].images, retry_after))
                if "start" not in window and (
                    state["completed"] >= warmup or t1 >= t_start + cfg.warmup_max_s
                ):
                    window["start"] = t1
                if status == 503 and cfg.backoff_503_s > 0:
                    await asyncio.sleep(cfg.backoff_503_s)
                elif status <= 0:
                    await asyncio.sleep(0.05)  # refused or reset: don't spin
        finally:
            conn.close()

    tasks = [asyncio.create_task(client(i)) for i in range(cfg.concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, hard_deadline + drain_s - time.monotonic()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    end = window.get("end", time.monotonic())
    start = window.get("start", t_start)
    warmup_included = False
    if not any(start < s.end <= end for s in samples):  # nothing answered inside: measure it all
        start, warmup_included = t_start, True
    return RawRun(samples, start, end, time.process_time() - cpu0, warmup_included, len(pending))


def _socket_budget(wanted: int) -> int:
    """How many sockets this process may open for requests, up to ``wanted``: the soft open-files
    limit is raised towards the hard one where it is lower, and 64 descriptors are kept back."""
    try:
        import resource
    except ImportError:  # not on POSIX: no limit to raise
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted + 64:
        target = wanted + 64 if hard == resource.RLIM_INFINITY else min(hard, wanted + 64)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - 64))


async def _open_loop(
    target: Target, payloads: Sequence[Payload], cfg: OpenConfig, seed_offset: int = 0
) -> RawRun:
    requests = [target.request_bytes(p) for p in payloads]
    drain_s = cfg.drain_s if cfg.drain_s is not None else cfg.timeout_s + 1.0
    offsets = arrival_offsets(
        cfg.rate_rps, cfg.duration_s, cfg.max_requests, cfg.arrival, cfg.seed + seed_offset
    )
    max_in_flight = _socket_budget(cfg.max_in_flight)
    samples: list[Sample] = []
    idle: list[_Connection] = []
    cpu0 = time.process_time()
    # in flight: sent (or being connected) and not answered; its integral over time gives the mean
    flight = {"now": 0, "max": 0, "area": 0.0, "since": time.monotonic()}

    def in_flight(change: int) -> None:
        now = time.monotonic()
        flight["area"] += flight["now"] * (now - flight["since"])
        flight["since"] = now
        flight["now"] += change
        flight["max"] = max(flight["max"], flight["now"])

    async def one(index: int, scheduled: float) -> None:
        conn = idle.pop() if idle else _Connection(target.host, target.port)
        sent = time.monotonic()
        try:
            status, retry_after = await conn.roundtrip(requests[index], cfg.timeout_s)
        except asyncio.CancelledError:  # abandoned at the end of the level
            conn.close()
            raise
        finally:
            in_flight(-1)
        end = time.monotonic()
        if conn.writer is not None:
            idle.append(conn)
        lag = max(0.0, sent - scheduled)  # the loop's timer may wake a fraction of a millisecond early
        samples.append(Sample(scheduled, end, status, payloads[index].images, retry_after, lag))

    t0 = time.monotonic() + 0.01
    tasks: list[asyncio.Task[None]] = []
    not_sent = 0
    last_send = t0
    for i, offset in enumerate(offsets):
        delay = t0 + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if flight["now"] >= max_in_flight:  # never queued in the client: not sent at all
            not_sent += 1
            continue
        in_flight(+1)
        last_send = time.monotonic()
        tasks.append(asyncio.create_task(one((i + seed_offset) % len(requests), t0 + offset)))
    in_flight(0)  # the mean is over the sending: the load the level offered, not its drain
    in_flight_mean = flight["area"] / max(1e-9, flight["since"] - t0)
    pending: set[asyncio.Task[None]] = set()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    for conn in idle:
        conn.close()
    end = max((s.end for s in samples), default=t0)
    window_end = max(end, t0 + cfg.duration_s)
    return RawRun(
        samples,
        t0,
        window_end,
        time.process_time() - cpu0,
        abandoned=len(pending),
        scheduled=len(offsets),
        not_sent=not_sent,
        # Poisson gaps: the schedule spans duration_s; sends that fell behind stretch it
        send_span_s=max(cfg.duration_s, last_send - t0) if tasks else cfg.duration_s,
        in_flight_max=int(flight["max"]),
        in_flight_mean=in_flight_mean,
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # optional: a cheaper event loop when installed

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    except ImportError:
        return asyncio.new_event_loop()


def loop_name() -> str:
    """``uvloop`` when the client uses it, else ``asyncio``."""
    try:
        import uvloop  # noqa: F401

        return "uvloop"
    except ImportError:
        return "asyncio"


def run_in_new_loop(
    coro_factory: str, target: Target, payloads: Sequence[Payload], cfg: ClosedConfig | OpenConfig, shard: int
) -> RawRun:
    """One load generator in a fresh event loop: each client process, the single-process path and
    ``bench.soak`` run it."""
    loop = _new_loop()
    try:
        if coro_factory == "closed":
            assert isinstance(cfg, ClosedConfig)
            return loop.run_until_complete(_closed_loop(target, payloads, cfg, shard))
        assert isinstance(cfg, OpenConfig)
        return loop.run_until_complete(_open_loop(target, payloads, cfg, shard))
    finally:
        loop.close()


def _split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal positive shares (fewer parts if total < parts)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _fan_out(
    kind: str, target: Target, payloads: Sequence[Payload], configs: Sequence[ClosedConfig | OpenConfig]
) -> list[RawRun]:
    if len(configs) == 1:
        return [run_in_new_loop(kind, target, payloads, configs[0], 0)]
    ctx = multiprocessing.get_context("spawn")  # children import bench.load only, not the caller's torch
    with concurrent.futures.ProcessPoolExecutor(len(configs), mp_context=ctx) as pool:
        futures = [pool.submit(run_in_new_loop, kind, target, payloads, c, i) for i, c in enumerate(configs)]
        return [f.result() for f in futures]


def run_closed(
    target: Target, payloads: Sequence[Payload], cfg: ClosedConfig, processes: int = 1
) -> dict[str, Any]:
    """One closed-loop level; ``processes`` > 1 splits the clients over that many client processes."""
    shares = _split(cfg.concurrency, processes)
    warmup = cfg.warmup_requests if cfg.warmup_requests is not None else cfg.concurrency
    configs = [
        ClosedConfig(
            concurrency=c,
            max_requests=max(1, cfg.max_requests * c // cfg.concurrency),
            max_seconds=cfg.max_seconds,
            warmup_requests=max(0, warmup * c // cfg.concurrency),
            warmup_max_s=cfg.warmup_max_s,
            timeout_s=cfg.timeout_s,
            drain_s=cfg.drain_s,
            backoff_503_s=cfg.backoff_503_s,
        )
        for c in shares
    ]
    runs = _fan_out("closed", target, payloads, configs)
    level = summarize(runs, payloads)
    return {"mode": "closed", "concurrency": cfg.concurrency, "client_processes": len(runs), **level}


def run_open(
    target: Target, payloads: Sequence[Payload], cfg: OpenConfig, processes: int = 1
) -> dict[str, Any]:
    """One open-loop level at ``cfg.rate_rps``; ``processes`` > 1 shares the rate between processes."""
    n = max(1, min(processes, cfg.max_in_flight))
    configs = [
        OpenConfig(
            rate_rps=cfg.rate_rps / n,
            duration_s=cfg.duration_s,
            max_requests=max(1, cfg.max_requests // n),
            arrival=cfg.arrival,
            seed=cfg.seed + 1000 * i,
            max_in_flight=max(1, cfg.max_in_flight // n),
            timeout_s=cfg.timeout_s,
            drain_s=cfg.drain_s,
        )
        for i in range(n)
    ]
    runs = _fan_out("open", target, payloads, configs)
    level = summarize(runs, payloads)
    scheduled = sum(r.scheduled for r in runs)
    not_sent = sum(r.not_sent for r in runs)
    lags = [s.lag for r in runs for s in r.samples if s.status != STATUS_TIMEOUT]
    rejected = [s.end - s.start for r in runs for s in r.samples if s.status == 503]
    served = [s.end - s.start - s.lag for r in runs for s in r.samples if 200 <= s.status < 300]
    return {
        "mode": "open",
        "arrival": cfg.arrival,
        "rate_target_rps": cfg.rate_rps,
        "rate_scheduled_rps": round(scheduled / cfg.duration_s, 3),
        # what the server was really offered: requests sent, over the span in which they left
        "rate_offered_rps": round(sum((r.scheduled - r.not_sent) / r.send_span_s for r in runs), 3),
        "rate_achieved_rps": level["requests_per_s"],
        "scheduled": scheduled,
        "sent": scheduled - not_sent,
        "not_sent": not_sent,
        "max_in_flight": cfg.max_in_flight,
        # processes run side by side: their means add up; the sum of their maxima bounds the maximum
        "in_flight_max": sum(r.in_flight_max for r in runs),
        "in_flight_mean": round(sum(r.in_flight_mean for r in runs), 2),
        "client_processes": len(runs),
        "send_lag_ms_p99": round(percentile(lags, 99) * 1000, 3) if lags else None,
        # what the server took: from the actual send, without the client's wait for a connection
        "latency_from_send_ms": latency_summary_ms(served),
        "rejected_latency_ms_p99": round(percentile(rejected, 99) * 1000, 3) if rejected else None,
        **level,
    }


def summarize(runs: Sequence[RawRun], payloads: Sequence[Payload]) -> dict[str, Any]:
    """Merge client processes' runs into one level record (see the module docstring).

    Throughput counts the successful (2xx) answers that ended inside the measurement window (the
    intersection of the processes' windows); latency percentiles are over the same answers.
    """
    start = max(r.window_start for r in runs)
    end = min(r.window_end for r in runs)
    if end <= start:  # windows did not overlap (tiny runs): use their union
        start, end = min(r.window_start for r in runs), max(r.window_end for r in runs)
    span = max(end - start, 1e-9)
    inside = [s for r in runs for s in r.samples if start < s.end <= end]
    drained = sum(1 for r in runs for s in r.samples if s.end > end)
    ok = [s for s in inside if 200 <= s.status < 300]
    status_counts = Counter(s.status for s in inside)
    n_503 = status_counts.get(503, 0)
    n_504 = status_counts.get(504, 0)
    timeouts = status_counts.get(STATUS_TIMEOUT, 0)
    transport = status_counts.get(STATUS_TRANSPORT, 0)
    other_http = sum(
        n
        for code, n in status_counts.items()
        if code > 0 and not 200 <= code < 300 and code not in (503, 504)
    )
    cpu = sum(r.cpu_s for r in runs)
    images = sum(s.images for s in ok)
    return {
        "payloads": sorted({p.name for p in payloads}),
        "images_per_request": round(sum(p.images for p in payloads) / len(payloads), 3),
        "duration_s": round(span, 3),
        "requests": len(inside),
        "ok": len(ok),
        "images": images,
        "images_per_s": round(images / span, 3),
        "requests_per_s": round(len(ok) / span, 3),
        "latency_ms": latency_summary_ms([s.end - s.start for s in ok]),
        "status_counts": {str(k): v for k, v in sorted(status_counts.items())},
        "n_503": n_503,
        "n_503_without_retry_after": sum(1 for s in inside if s.status == 503 and not s.retry_after),
        "n_504": n_504,
        "timeouts": timeouts,
        "transport_errors": transport,
        "errors": other_http + timeouts + transport,
        "client_cpu_s": round(cpu, 3),
        "client_cpu_ms_per_request": round(1000 * cpu / max(1, sum(len(r.samples) for r in runs)), 3),
        "warmup_included": any(r.warmup_included for r in runs),
        "drained": drained,
        "abandoned": sum(r.abandoned for r in runs),
        "client_loop": loop_name(),
    }


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def payloads_from_files(
    files: Sequence[Path], body_format: BodyFormat, images_per_request: int
) -> list[Payload]:
    """One payload per file (each repeating that file ``images_per_request`` times)."""
    out = []
    for path in files:
        data = path.read_bytes()
        media = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        out.append(make_payload(path.stem, [data] * images_per_request, body_format, media))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True, help="e.g. /v1/models/vgg16/predict")
    parser.add_argument("--image", type=Path, action="append", required=True, help="image file (repeatable)")
    parser.add_argument(
        "--format", dest="body_format", choices=["multipart", "raw", "json"], default="multipart"
    )
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--header", action="append", default=[], help="'Name: value' (repeatable)")
    parser.add_argument("--concurrency", type=_ints, default=[], help="closed-loop levels, e.g. 1,4,16")
    parser.add_argument("--rate", type=_floats, default=[], help="open-loop rates in requests/s, e.g. 5,20")
    parser.add_argument("--arrival", choices=["poisson", "uniform"], default="poisson")
    parser.add_argument("--max-requests", type=int, default=2000, help="per level, warm-up included")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="per level: measured seconds after the warm-up"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--json", type=Path, help="write the levels here")
    args = parser.parse_args(argv)
    headers = tuple((h.split(":", 1)[0].strip(), h.split(":", 1)[1].strip()) for h in args.header)
    target = Target(args.port, args.path, args.host, headers)
    payloads = payloads_from_files(args.image, args.body_format, args.images_per_request)
    levels: list[dict[str, Any]] = []
    for c in args.concurrency:
        cfg = ClosedConfig(c, args.max_requests, args.max_seconds, timeout_s=args.timeout)
        levels.append(run_closed(target, payloads, cfg, args.processes))
        print(format_level(levels[-1]), flush=True)
    for rate in args.rate:
        ocfg = OpenConfig(rate, args.max_seconds, args.max_requests, args.arrival, timeout_s=args.timeout)
        levels.append(run_open(target, payloads, ocfg, args.processes))
        print(format_level(levels[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"target": asdict(target), "levels": levels}, indent=2))
    return 0


def format_level(level: dict[str, Any]) -> str:
    """One line about a level, for logs."""
    lat = level["latency_ms"]
    assert isinstance(lat, dict)
    what = f"c={level['concurrency']}" if level["mode"] == "closed" else f"rate={level['rate_target_rps']}/s"
    line = (
        f"{level['mode']:6} {what:>12}  {level['images_per_s']:9.2f} img/s  "
        f"p50 {lat['p50']} ms  p99 {lat['p99']} ms  ok {level['ok']}  503 {level['n_503']}  "
        f"504 {level['n_504']}  errors {level['errors']}  client cpu {level['client_cpu_s']} s"
    )
    if level["mode"] == "open":
        line += (
            f"  offered {level['rate_offered_rps']}/s  in flight max {level['in_flight_max']} "
            f"mean {level['in_flight_mean']}  not sent {level['not_sent']}  abandoned {level['abandoned']}"
        )
    return line


if __name__ == "__main__":
    sys.exit(main())

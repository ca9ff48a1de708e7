"""A tiny HTTP/1.1 server on 127.0.0.1 for the load generator's tests, run in a thread.

Paths choose the answer:

- ``/ok``: 200 with Content-Length, keep-alive;
- ``/busy``: 503 with ``Retry-After: 1``; ``/busy-bare``: 503 without it;
- ``/chunked``: 200 with a chunked body (two chunks and a trailer-less end);
- ``/close``: 200 then ``Connection: close``;
- ``/slow``: answers after 2 s (tests use a shorter client timeout);
- ``/delay50``: answers after 50 ms, one request at a time for the whole server (a lock), so
  requests queue like at a busy model.

It records every request it read (path, body) in ``server.requests``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class TinyServer:
    port: int = 0
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    def reset(self) -> None:
        self.requests.clear()

    def count(self, path: str) -> int:
        return sum(1 for p, _ in list(self.requests) if p == path)


async def _handle(
    server: TinyServer, lock: asyncio.Lock, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            server.requests.append((path, body))
            keep = True
            if path == "/busy":
                out = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nbusy"
            elif path == "/busy-bare":
                out = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
            elif path == "/chunked":
                out = (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                )
            elif path == "/close":
                out = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
                keep = False
            elif path == "/slow":
                await asyncio.sleep(2.0)
                out = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            elif path == "/delay50":
                async with lock:
                    await asyncio.sleep(0.05)
                out = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            else:
                out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                out += b'Content-Length: 11\r\n\r\n{"ok":true}'
            writer.write(out)
            await writer.drain()
            if not keep:
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[TinyServer]:
    """The tiny server, started once per session in a daemon thread."""
    server = TinyServer()
    started = threading.Event()

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server.loop = loop
        lock = asyncio.Lock()

        async def start() -> asyncio.base_events.Server:
            return await asyncio.start_server(lambda r, w: _handle(server, lock, r, w), "127.0.0.1", 0)

        srv = loop.run_until_complete(start())
        server.port = srv.sockets[0].getsockname()[1]
        started.set()
        loop.run_forever()
        srv.close()
        pending = asyncio.all_tasks(loop)  # handlers still waiting (e.g. /slow): end them cleanly
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending))
        loop.run_until_complete(srv.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, name="tiny-http", daemon=True)
    thread.start()
    assert started.wait(10), "tiny server did not start"
    yield server
    assert server.loop is not None
    server.loop.call_soon_threadsafe(server.loop.stop)
    thread.join(10)


@pytest.fixture
def fresh_server(tiny_server: TinyServer) -> TinyServer:
    """The tiny server with its request log emptied."""
    tiny_server.reset()
    return tiny_server

"""
The built-in load generator: N persistent HTTP/1.1 connections over TCP or a
unix socket, each sending its next request as soon as the previous answer
has been read, for a warm-up and then a measured window (or until a given
number of requests is done), recording the latency of every request.

It is meant to run in its own process, so that it does not share the
server's GIL, and prints its figures as one JSON object::

    python -m bench.loadgen --tcp 127.0.0.1:17951 --connections 64 \\
        --warmup 1 --duration 5 --path /api/v1/discover/echo

Requests are built from templates: C{--path} and C{--body} may contain
C{{ID}}, replaced by C{--id-prefix} and a counter (from C{--start-index})
that is unique per request; without C{{ID}} every request is the same bytes.
With C{--count N} it sends exactly N requests (as fast as it can, no
warm-up) and reports how long they took.  Answers must carry a
C{Content-Length} (the daemon's and the reference's do).  Only the standard
library is used.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.stats import percentiles_ms

__all__ = ["LoadSpec", "main", "run_load"]

PLACEHOLDER = b"{ID}"
_CONTENT_LENGTH = b"\r\ncontent-length:"


@dataclass
class LoadSpec:
    """What to send, how hard and for how long."""

    method: str = "GET"
    path: str = "/api/v1/health"
    body: str | None = None
    id_prefix: str = "m"
    start_index: int = 0
    connections: int = 1
    warmup: float = 1.0
    duration: float = 5.0
    count: int | None = None
    tcp: tuple[str, int] | None = None
    unix: str | None = None
    timeout: float = 30.0


class _Load:
    """The shared state of one run: request factory, clock windows and results."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.path = spec.path.encode("utf-8")
        self.body = spec.body.encode("utf-8") if spec.body is not None else None
        self.unique = PLACEHOLDER in self.path or (
            self.body is not None and PLACEHOLDER in self.body
        )
        self.next_index = spec.start_index
        self.fixed = b"" if self.unique else self._build(b"")
        self.issued = 0
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.window_statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self.measure_start = 0.0
        self.measure_end = float("inf")
        self.last_completion = 0.0
        self.idle = 0
        self.finished: asyncio.Future[None] | None = None

    def _build(self, module_id: bytes) -> bytes:
        path = self.path.replace(PLACEHOLDER, module_id)
        method = self.spec.method.encode("ascii")
        if self.body is None:
            return b"%s %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (method, path)
        body = self.body.replace(PLACEHOLDER, module_id)
        return (
            b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (method, path, len(body), body)
        )

    def next_request(self) -> bytes | None:
        """The next request to send, or None when the run sends no more."""
        if self.spec.count is not None:
            if self.issued >= self.spec.count:
                return None
        elif time.perf_counter() >= self.measure_end:
            return None
        self.issued += 1
        if not self.unique:
            return self.fixed
        index = self.next_index
        self.next_index += 1
        return self._build(b"%s%d" % (self.spec.id_prefix.encode("utf-8"), index))

    def completed(self, status: int, sent: float, now: float) -> None:
        self.statuses[status] += 1
        self.last_completion = now
        if self.measure_start <= now <= self.measure_end:
            self.latencies.append(now - sent)
            self.window_statuses[status] += 1

    def went_idle(self) -> None:
        self.idle += 1
        if self.idle >= self.spec.connections and self.finished and not self.finished.done():
            self.finished.set_result(None)

    def failed(self, reason: str) -> None:
        self.errors.append(reason)
        self.went_idle()


class _Connection(asyncio.Protocol):
    """One persistent connection sending requests back to back."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: Any = None
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.sent = 0.0
        self.busy = False
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send_next(self) -> None:
        request = self.load.next_request()
        if request is None:
            self.busy = False
            self.done = True
            self.load.went_idle()
            return
        self.busy = True
        self.sent = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            start = head.find(_CONTENT_LENGTH)
            if start < 0:
                self._fail("an answer without Content-Length")
                return
            start += len(_CONTENT_LENGTH)
            stop = head.find(b"\r\n", start)
            length = int(head[start : stop if stop >= 0 else len(head)])
            self.status = int(head[9:12])
            self.need = end + 4 + length
        if len(buffer) < self.need:
            return
        now = time.perf_counter()
        if len(buffer) > self.need:
            self._fail("unexpected bytes after an answer")
            return
        buffer.clear()
        self.need = -1
        self.load.completed(self.status, self.sent, now)
        self.send_next()

    def _fail(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.load.failed(reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._fail(f"connection lost: {exc or 'closed by the server'}")


async def _run(spec: LoadSpec) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    load = _Load(spec)
    load.finished = loop.create_future()

    deadline = time.monotonic() + spec.timeout

    async def connect_unix(path: str) -> socket.socket:
        # A connect to a unix socket whose listen backlog is full fails at
        # once with EAGAIN (asyncio takes that for "in progress" and later
        # reports EINVAL): retry, one connection at a time, until the
        # server has accepted enough of the earlier ones.
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                sock.close()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the backlog of {path} stayed full") from None
                await asyncio.sleep(0.001)
            except BaseException:
                sock.close()
                raise

    async def connect() -> _Connection:
        if spec.unix is not None:
            sock = await connect_unix(spec.unix)
            _, protocol = await loop.create_unix_connection(lambda: _Connection(load), sock=sock)
        else:
            assert spec.tcp is not None
            sock = socket.create_connection(spec.tcp, timeout=spec.timeout)
            _, protocol = await loop.create_connection(lambda: _Connection(load), sock=sock)
        return protocol

    connections = [await connect() for _ in range(spec.connections)]
    started = time.perf_counter()
    if spec.count is None:
        load.measure_start = started + spec.warmup
        load.measure_end = load.measure_start + spec.duration
        limit = spec.warmup + spec.duration + spec.timeout
    else:
        load.measure_start = started
        limit = spec.timeout
    for connection in connections:
        connection.send_next()
    try:
        await asyncio.wait_for(asyncio.shield(load.finished), limit)
    except asyncio.TimeoutError:
        busy = sum(1 for c in connections if c.busy)
        load.errors.append(f"timed out with {busy} requests unanswered")
    for connection in connections:
        connection.done = True
        if connection.transport is not None:
            connection.transport.close()
    await asyncio.sleep(0)

    if spec.count is None:
        window = spec.duration
        measured = len(load.latencies)
    else:
        window = max(load.last_completion - started, 1e-9)
        measured = len(load.latencies)
    result: dict[str, Any] = {
        "generator": "python",
        "connections": spec.connections,
        "requests": measured,
        "window_s": window,
        "rps": measured / window,
        "statuses": {str(k): v for k, v in sorted(load.statuses.items())},
        "non_2xx": sum(v for k, v in load.statuses.items() if not 200 <= k < 300),
        "errors": load.errors[:10],
        "error_count": len(load.errors),
    }
    if load.latencies:
        result.update(percentiles_ms(load.latencies))
    return result


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run one load in this process (a new event loop) and return its figures."""
    gc.disable()
    try:
        return asyncio.run(_run(spec))
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> None:
    """The command line: print the figures of one run as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", metavar="HOST:PORT")
    where.add_argument("--unix", metavar="PATH")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/api/v1/health")
    parser.add_argument("--body", default=None, help="request body (JSON); {ID} is replaced")
    parser.add_argument("--id-prefix", default="m")
    parser.add_argument("--start-index", type=int, default=0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--count", type=int, default=None, help="send exactly this many")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds of grace")
    args = parser.parse_args(argv)
    tcp = None
    if args.tcp is not None:
        host, _, port = args.tcp.rpartition(":")
        tcp = (host, int(port))
    spec = LoadSpec(
        method=args.method,
        path=args.path,
        body=args.body,
        id_prefix=args.id_prefix,
        start_index=args.start_index,
        connections=args.connections,
        warmup=args.warmup,
        duration=args.duration,
        count=args.count,
        tcp=tcp,
        unix=args.unix,
        timeout=args.timeout,
    )
    result = run_load(spec)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

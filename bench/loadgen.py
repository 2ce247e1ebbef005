"""
The built-in load generator: N persistent HTTP/1.1 connections over TCP or a
unix socket, for a warm-up and then a measured window (or until a given
number of requests is done), recording the latency of every request.

Closed loop (the default): each connection sends its next request as soon as
the previous answer has been read.  Latency is then bounded below by
connections / throughput (Little's law): it says how the server copes with
being hammered, not how long a request waits at a given load.  The answers
read within the window are measured; a window in which no answer at all
came (a stall longer than it) is stretched to the first answer, and
C{window_s} says so.

Open loop (C{--rate R}, requests per second per connection): each connection
sends on a fixed schedule, one request every 1/R seconds, the connections'
phases spread evenly over that period (so all of them together send one
request every 1/(N R) seconds).  A connection holds one request at a time
(HTTP/1.1, no pipelining): when an answer comes after the next request was
due, that request goes at once, late.  Latency is measured from the
I{scheduled} send time, not the actual one, so that lateness counts (no
coordinated omission).  The measured requests are those scheduled within the
measured window; every one of them is sent and awaited, even after the
window has ended.  A connection that falls more than
C{BEHIND_LIMIT_S} behind its schedule is reported (C{"rate_kept": false}).

It is meant to run in its own process, so that it does not share the
server's GIL, and prints its figures as one JSON object::

    python -m bench.loadgen --tcp 127.0.0.1:17951 --connections 64 \\
        --warmup 1 --duration 5 --path /api/v1/discover/echo

Requests are built from templates: C{--path} and C{--body} may contain
C{{ID}}, replaced by C{--id-prefix} and a counter (from C{--start-index})
that is unique per request, and C{{CONN}}, replaced by the number of the
connection sending it (0 to N-1); without either every request is the same
bytes.
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
import math
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.stats import percentiles_ms

__all__ = ["BEHIND_LIMIT_S", "LoadSpec", "main", "run_load"]

PLACEHOLDER = b"{ID}"
CONNECTION_PLACEHOLDER = b"{CONN}"
#: Open loop: a connection further behind its schedule than this did not keep the rate.
BEHIND_LIMIT_S = 1.0
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
    #: Requests per second per connection (open loop); None: closed loop.
    rate: float | None = None


class _Load:
    """The shared state of one run: request factory, clock windows and results."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.path = spec.path.encode("utf-8")
        self.body = spec.body.encode("utf-8") if spec.body is not None else None
        templates = (self.path, self.body or b"")
        self.unique = any(PLACEHOLDER in t for t in templates)
        self.per_connection = any(CONNECTION_PLACEHOLDER in t for t in templates)
        self.next_index = spec.start_index
        self.fixed: dict[int, bytes] = {}
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
        # Open loop only.
        self.interval = 1.0 / spec.rate if spec.rate else 0.0
        self.from_send: list[float] = []  # measured: answer - actual send
        self.send_lags: list[float] = []  # measured: actual send - scheduled send
        self.timer_lags: list[float] = []  # the same, when the connection was idle
        self.max_lag = 0.0  # any request, warm-up included
        self.behind: set[int] = set()  # connections once more than BEHIND_LIMIT_S late
        self.last_measured_completion = 0.0
        self.started = 0.0

    def _build(self, module_id: bytes, connection: int) -> bytes:
        path = self.path.replace(PLACEHOLDER, module_id)
        number = b"%d" % connection
        path = path.replace(CONNECTION_PLACEHOLDER, number)
        method = self.spec.method.encode("ascii")
        if self.body is None:
            return b"%s %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (method, path)
        body = self.body.replace(PLACEHOLDER, module_id).replace(CONNECTION_PLACEHOLDER, number)
        return (
            b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (method, path, len(body), body)
        )

    def payload(self, connection: int) -> bytes:
        """The bytes of the next request that connection number C{connection} sends."""
        self.issued += 1
        if not self.unique:
            key = connection if self.per_connection else 0
            fixed = self.fixed.get(key)
            if fixed is None:
                fixed = self.fixed[key] = self._build(b"", connection)
            return fixed
        index = self.next_index
        self.next_index += 1
        return self._build(b"%s%d" % (self.spec.id_prefix.encode("utf-8"), index), connection)

    def next_request(self, connection: int) -> bytes | None:
        """Closed loop: the next request to send, or None when the run sends no more."""
        if self.spec.count is not None:
            if self.issued >= self.spec.count:
                return None
        elif time.perf_counter() >= self.measure_end:
            return None
        return self.payload(connection)

    def completed(self, status: int, sent: float, now: float) -> None:
        self.statuses[status] += 1
        self.last_completion = now
        if now > self.measure_end and not self.latencies:
            # Not one answer in the window (a stall longer than it, on a
            # starved machine): stretch it to the first answer, so the run
            # reports a low rate over a longer window rather than no figure.
            self.measure_end = now
        if self.measure_start <= now <= self.measure_end:
            self.latencies.append(now - sent)
            self.window_statuses[status] += 1

    def due(self, connection: int, step: int) -> float:
        """
        Open loop: when request number C{step} of connection C{connection}
        falls due: the connections' schedules are staggered evenly over one
        interval.  Computed from the step, never by adding intervals up, so
        float rounding (which grows with the clock's value) cannot move a
        request across the window's edge.
        """
        return self.started + self.interval * (step + connection / self.spec.connections)

    def steps(self, connection: int) -> tuple[int, int]:
        """Open loop: the steps of C{connection} due in the measured window, as C{range} bounds."""
        phase = connection / self.spec.connections

        def steps_before(offset: float) -> int:
            return max(0, math.ceil(offset / self.interval - phase - 1e-9))

        warmup, duration = self.spec.warmup, self.spec.duration
        return steps_before(warmup), steps_before(warmup + duration)

    def scheduled_in_window(self) -> int:
        """Open loop: how many requests are due in the measured window."""
        total = 0
        for connection in range(self.spec.connections):
            first, end = self.steps(connection)
            total += end - first
        return total

    def sent_late(self, connection: int, lag: float) -> None:
        """Open loop: a request went C{lag} seconds after it was due."""
        if lag > self.max_lag:
            self.max_lag = lag
        if lag > BEHIND_LIMIT_S:
            self.behind.add(connection)

    def completed_open(
        self, status: int, due: float, measured: bool, sent: float, now: float, timer: bool
    ) -> None:
        """Open loop: an answer to the request due at C{due}, sent at C{sent}."""
        self.statuses[status] += 1
        self.last_completion = now
        if measured:
            self.latencies.append(now - due)
            self.from_send.append(now - sent)
            self.send_lags.append(sent - due)
            if timer:
                self.timer_lags.append(sent - due)
            self.window_statuses[status] += 1
            self.last_measured_completion = max(self.last_measured_completion, now)

    def went_idle(self) -> None:
        self.idle += 1
        if self.idle >= self.spec.connections and self.finished and not self.finished.done():
            self.finished.set_result(None)

    def failed(self, reason: str) -> None:
        self.errors.append(reason)
        self.went_idle()


class _Connection(asyncio.Protocol):
    """One persistent connection: requests back to back, or on a schedule (open loop)."""

    def __init__(self, load: _Load, number: int) -> None:
        self.load = load
        self.number = number
        self.transport: Any = None
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.sent = 0.0
        self.busy = False
        self.done = False
        # Open loop: the next request's step and when it is due, the steps
        # measured, the one in flight and when it was due, whether it waited
        # for its time (the connection was idle) and the timer.
        self.step = 0
        self.due = 0.0
        self.measured = (0, 0)
        self.in_flight_step = 0
        self.in_flight_due = 0.0
        self.timed = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def send_next(self) -> None:
        request = self.load.next_request(self.number)
        if request is None:
            self.busy = False
            self.done = True
            self.load.went_idle()
            return
        self.busy = True
        self.sent = time.perf_counter()
        self.transport.write(request)

    def start_schedule(self) -> None:
        """Open loop: start sending on this connection's schedule."""
        self.measured = self.load.steps(self.number)
        self.step = 0
        self._arm()

    def _arm(self) -> None:
        """Open loop: send the next request when it is due (at once if it is late)."""
        self.busy = False
        if self.done:
            return
        if self.step >= self.measured[1]:
            self.done = True
            self.load.went_idle()
            return
        self.due = self.load.due(self.number, self.step)
        delay = self.due - time.perf_counter()
        if delay > 0:
            self.timer = asyncio.get_running_loop().call_later(delay, self._fire, True)
        else:
            self._fire(False)

    def _fire(self, timed: bool) -> None:
        self.timer = None
        if self.done:
            return
        request = self.load.payload(self.number)
        self.busy = True
        self.timed = timed
        self.in_flight_due = self.due
        self.in_flight_step = self.step
        self.sent = time.perf_counter()
        self.load.sent_late(self.number, self.sent - self.due)
        self.step += 1
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
        if self.load.interval:
            first, end = self.measured
            measured = first <= self.in_flight_step < end
            self.load.completed_open(
                self.status, self.in_flight_due, measured, self.sent, now, self.timed
            )
            self._arm()
        else:
            self.load.completed(self.status, self.sent, now)
            self.send_next()

    def stop(self) -> None:
        """Send nothing more."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fail(self, reason: str) -> None:
        if not self.done:
            self.stop()
            self.load.failed(reason)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._fail(f"connection lost: {exc or 'closed by the server'}")


async def _run(spec: LoadSpec) -> dict[str, Any]:
    if spec.rate is not None and (spec.rate <= 0 or spec.count is not None):
        raise ValueError("an open-loop rate must be positive, and excludes a count")
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

    async def connect(number: int) -> _Connection:
        if spec.unix is not None:
            sock = await connect_unix(spec.unix)
            _, protocol = await loop.create_unix_connection(
                lambda: _Connection(load, number), sock=sock
            )
        else:
            assert spec.tcp is not None
            sock = socket.create_connection(spec.tcp, timeout=spec.timeout)
            _, protocol = await loop.create_connection(lambda: _Connection(load, number), sock=sock)
        return protocol

    connections = [await connect(number) for number in range(spec.connections)]
    started = load.started = time.perf_counter()
    scheduled = 0
    if spec.count is None:
        load.measure_start = started + spec.warmup
        load.measure_end = load.measure_start + spec.duration
        limit = spec.warmup + spec.duration + spec.timeout
    else:
        load.measure_start = started
        limit = spec.timeout
    if load.interval:
        scheduled = load.scheduled_in_window()
        for connection in connections:
            connection.start_schedule()
    else:
        for connection in connections:
            connection.send_next()
    try:
        await asyncio.wait_for(asyncio.shield(load.finished), limit)
    except asyncio.TimeoutError:
        busy = sum(1 for c in connections if c.busy)
        load.errors.append(f"timed out with {busy} requests unanswered")
    for connection in connections:
        connection.stop()
        if connection.transport is not None:
            connection.transport.close()
    await asyncio.sleep(0)

    measured = len(load.latencies)
    if spec.count is not None:
        window = max(load.last_completion - started, 1e-9)
    elif load.interval:
        # Answers to requests due in the window may come after it: when the
        # server falls behind, the rate achieved is over the longer time.
        window = max(spec.duration, load.last_measured_completion - load.measure_start)
    else:
        window = load.measure_end - load.measure_start
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
    if load.interval:
        assert spec.rate is not None
        result.update(_open_loop_figures(load, spec.rate, scheduled))
    return result


def _open_loop_figures(load: _Load, rate: float, scheduled: int) -> dict[str, Any]:
    """What an open-loop run adds: the schedule, whether it was kept, and where time went."""
    unanswered = scheduled - len(load.latencies)
    out: dict[str, Any] = {
        "mode": "open",
        "rate_per_connection": rate,
        "target_rps": rate * load.spec.connections,
        "scheduled": scheduled,
        "unanswered": unanswered,
        "behind_limit_s": BEHIND_LIMIT_S,
        "behind_connections": len(load.behind),
        "max_send_lag_ms": load.max_lag * 1000.0,
        "rate_kept": not load.behind and unanswered == 0,
    }
    # Latency from the actual send (what a closed-loop generator reports),
    # how late requests went out, and how late the generator's own timers
    # fired when the connection was idle (the generator's share of latency).
    for name, samples in (
        ("from_send", load.from_send),
        ("send_lag", load.send_lags),
        ("timer_lag", load.timer_lags),
    ):
        if samples:
            out[name] = percentiles_ms(samples)
    return out


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
    parser.add_argument(
        "--body", default=None, help="request body (JSON); {ID} and {CONN} are replaced"
    )
    parser.add_argument("--id-prefix", default="m")
    parser.add_argument("--start-index", type=int, default=0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--count", type=int, default=None, help="send exactly this many")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds of grace")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop: requests per second per connection, on a fixed schedule, "
        "latency measured from the scheduled send time (default: closed loop)",
    )
    args = parser.parse_args(argv)
    if args.rate is not None:
        if not args.rate > 0:
            parser.error("--rate must be positive")
        if args.count is not None:
            parser.error("--rate and --count do not go together")
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
        rate=args.rate,
    )
    result = run_load(spec)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

"""
The abuse section's own well-behaved client (L{bench.abuse}): one request at
a time over TCP or the unix socket, on one persistent connection or on a new
connection per request, every answer timed (closed loop, concurrency 1).

Blocking sockets and no event loop, so the client adds as little of its own
time as Python allows; it runs in the section's process while the daemon and
the flooder run in theirs.  The garbage collector is off while a window is
timed (as in L{bench.loadgen}), so its pauses are not counted as the daemon's.

``python -m bench.abuse_client PORT`` is the refusal probe (L{refusals}):
run as the flooding uid, it prints what a caller past its rates is answered,
as JSON.
"""

from __future__ import annotations

import gc
import json
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.probe import Connection, Target, request_bytes
from bench.stats import percentiles_ms
from bench.workload import PUBLISH_PATH, publish_body

__all__ = ["ClientConnection", "Window", "closed_loop", "main", "pooled", "refusals"]

#: A window gives up after this many failed requests (a daemon gone, say).
MAX_ERRORS = 20


class ClientConnection(Connection):
    """L{Connection} (one persistent HTTP/1.1 connection) over TCP as well as a unix socket."""

    def __init__(self, target: Target, timeout: float = 10.0) -> None:
        if target.transport == "unix":
            super().__init__(target.path, timeout)
            return
        self.sock = socket.create_connection((target.host, target.port), timeout=timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.sock.close()
            raise
        self._buffer = bytearray()


@dataclass
class Window:
    """The answers of one measured window: latencies (s), statuses, errors, its length (s)."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        """Requests, req/s, statuses and p50/p90/p99/max (ms), as the JSON keeps them."""
        out: dict[str, Any] = {
            "requests": len(self.latencies),
            "window_s": self.seconds,
            "rps": len(self.latencies) / self.seconds if self.seconds > 0 else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "non_2xx": sum(v for k, v in self.statuses.items() if not 200 <= k < 300),
            "errors": self.errors[:5],
            "error_count": len(self.errors),
        }
        if self.latencies:
            out.update(percentiles_ms(self.latencies))
        return out


def pooled(windows: list[Window]) -> Window:
    """Several windows as one: their samples together, their lengths added."""
    whole = Window()
    for window in windows:
        whole.latencies.extend(window.latencies)
        whole.statuses.update(window.statuses)
        whole.errors.extend(window.errors)
        whole.seconds += window.seconds
    return whole


def closed_loop(
    target: Target,
    payload: bytes,
    duration: float,
    warmup: float,
    new_connection: bool = False,
    limit: int = 1_000_000,
) -> Window:
    """
    Send C{payload} to C{target} one request at a time for C{warmup} seconds
    (not measured), then C{duration} seconds or C{limit} answers: on one
    persistent connection, or with C{new_connection} a new connection per
    request (the latency then runs from the connect to the answer's last
    byte; the close is not counted).  A request that fails is an error and
    the next one goes on a new connection; after L{MAX_ERRORS} the window
    ends.
    """
    window = Window()
    clock = time.perf_counter
    conn: ClientConnection | None = None
    enabled = gc.isenabled()
    gc.disable()
    try:
        measure_from = clock() + warmup
        end = measure_from + duration
        while len(window.latencies) < limit:
            began = clock()
            if began >= end:
                break
            try:
                if conn is None:
                    conn = ClientConnection(target)
                status, _, _ = conn.exchange(payload)
            except OSError as e:  # ConnectionError and socket timeouts included
                window.errors.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                    conn = None
                if len(window.errors) >= MAX_ERRORS:
                    break
                continue
            done = clock()
            if new_connection:
                conn.close()
                conn = None
            if began >= measure_from:
                window.latencies.append(done - began)
                window.statuses[status] += 1
        window.seconds = max(0.0, min(clock(), end) - measure_from)
    finally:
        if conn is not None:
            conn.close()
        if enabled:
            gc.enable()
    return window


def refusals(target: Target, limit: int = 2000) -> dict[str, Any]:
    """
    On one connection, publishes of a new module (C{probe-N}) until the
    first 429, then catalog reads (C{GET /api/v1/modules}) likewise (at most
    C{limit} each): per kind, how many were accepted before it (the burst,
    plus what the bucket gained meanwhile) and that 429's Retry-After,
    Content-Type and JSON body.
    """
    kinds: dict[str, Callable[[int], bytes]] = {
        "writes": lambda n: request_bytes(
            "POST", PUBLISH_PATH, publish_body(f"probe-{n}", process_id=0)
        ),
        "reads": lambda n: request_bytes("GET", "/api/v1/modules"),
    }
    out: dict[str, Any] = {}
    conn = ClientConnection(target)
    try:
        for kind, payload in kinds.items():
            began = time.perf_counter()
            found: dict[str, Any] = {"accepted_before": limit, "status": None}
            for number in range(limit):
                status, headers, body = conn.exchange(payload(number))
                if status == 429:
                    found = {
                        "accepted_before": number,
                        "status": status,
                        "retry_after": headers.get("retry-after"),
                        "content_type": headers.get("content-type"),
                        "body": json.loads(body),
                    }
                    break
                if status != 200:
                    raise RuntimeError(f"{kind}: answered {status}: {body[:200]!r}")
            found["seconds"] = time.perf_counter() - began
            out[kind] = found
    finally:
        conn.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """The refusal probe's command line: C{PORT} on 127.0.0.1; JSON on stdout."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        raise SystemExit("usage: python -m bench.abuse_client PORT")
    json.dump(refusals(Target.tcp(int(args[0]))), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

"""
Blocking HTTP/1.1 requests over TCP or a unix socket, for set-up, checks and
start-up polling, and requests as bytes on one persistent unix-socket
connection (L{Connection}) (never for load: see L{bench.loadgen} and
L{bench.wrk}).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "Connection", "Target", "request", "request_bytes", "wait_until_healthy"]


@dataclass(frozen=True)
class Target:
    """Where a server listens: TCP on 127.0.0.1 or a unix socket path."""

    transport: str  # "tcp" or "unix"
    port: int = 0
    path: str = ""
    host: str = "127.0.0.1"

    @classmethod
    def tcp(cls, port: int) -> Target:
        """TCP on 127.0.0.1:C{port}."""
        return cls("tcp", port=port)

    @classmethod
    def unix(cls, path: str) -> Target:
        """The unix socket at C{path}."""
        return cls("unix", path=path)

    def url(self, path: str) -> str:
        """An C{http://} URL (TCP only: wrk has no unix socket support)."""
        if self.transport != "tcp":
            raise ValueError("only a TCP target has an http:// URL")
        return f"http://{self.host}:{self.port}{path}"

    def loadgen_args(self) -> list[str]:
        """How L{bench.loadgen} is told to connect here."""
        if self.transport == "tcp":
            return ["--tcp", f"{self.host}:{self.port}"]
        return ["--unix", self.path]

    def describe(self) -> str:
        """A strports-like description."""
        if self.transport == "tcp":
            return f"tcp:{self.host}:{self.port}"
        return f"unix:{self.path}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.transport == "tcp":
        return http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    return _UnixHTTPConnection(target.path, timeout)


@dataclass(frozen=True)
class Answer:
    """A whole HTTP answer."""

    status: int
    content_type: str | None
    body: bytes


def request(
    target: Target,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Answer:
    """One request on a new connection, bounded by C{timeout} seconds per socket operation."""
    connection = _connection(target, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return Answer(response.status, response.getheader("Content-Type"), response.read())
    finally:
        connection.close()


def wait_until_healthy(
    target: Target,
    deadline: float,
    path: str = "/api/v1/health",
    interval: float = 0.002,
    check: Callable[[], None] = lambda: None,
) -> float:
    """
    Poll C{path} until it answers 200 or C{time.monotonic()} passes
    C{deadline}, sleeping C{interval} seconds between refused attempts and
    calling C{check} (which may raise, e.g. when the server has exited).

    @return: the C{time.perf_counter()} at which the 200 answer was read.
    @raise TimeoutError: no 200 answer before the deadline.
    """
    while True:
        check()
        try:
            answer = request(target, "GET", path, timeout=max(0.1, deadline - time.monotonic()))
        except (TimeoutError, ConnectionError, FileNotFoundError, http.client.HTTPException):
            pass
        else:
            if answer.status == 200:
                return time.perf_counter()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no healthy answer from {target.describe()}{path}")
        time.sleep(interval)


def request_bytes(
    method: str, path: str, body: bytes | None = None, host: str = "localhost"
) -> bytes:
    """An HTTP/1.1 request as bytes (a C{body} is JSON)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("ascii") + (body or b"")


class Connection:
    """HTTP/1.1 on one persistent unix-socket connection, one request at a time."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self._buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the daemon closed the connection")
        self._buffer += data

    def exchange(self, payload: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request; the status, headers (lower-case names) and body of its answer."""
        self.sock.sendall(payload)
        buffer = self._buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        del buffer[: end + 4]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" not in headers:
            raise ConnectionError(f"an answer without Content-Length: {lines[0]}")
        length = int(headers["content-length"])
        while len(buffer) < length:
            self._fill()
        body = bytes(buffer[:length])
        del buffer[:length]
        return int(lines[0].split(" ", 2)[1]), headers, body

    def get_json(self, path: str) -> tuple[Any, dict[str, str]]:
        """C{GET path}, which must answer 200; its JSON body and headers."""
        status, headers, body = self.exchange(request_bytes("GET", path))
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body[:200]!r}")
        return json.loads(body), headers

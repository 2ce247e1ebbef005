"""
Blocking HTTP/1.1 requests over TCP or a unix socket, for set-up, checks and
start-up polling (never for load: see L{bench.loadgen} and L{bench.wrk}).
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Answer", "Target", "request", "wait_until_healthy"]


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

# -*- test-case-name: tests.test_checks -*-
"""
The probes behind active checks: a TCP connect and an HTTP GET.

Each probe is bounded by its timeout and never fails: whatever goes wrong
becomes a critical L{ProbeResult} with a short reason, so callers only ever
handle results. Cancelling a probe aborts its connection, so an abandoned
probe leaves no socket or timer behind.

A daemon may run a thousand of these a second, so each is kept cheap: an IP
address is connected to directly (only host names go through the resolver's
threads), the factories do not log every connection, and the HTTP probe
sends one request and reads only the status line of the answer, which is
all a check needs, instead of parsing whole responses with a full client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectionClosed,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from hsu_registry.checks.spec import go_duration

__all__ = ["ProbeResult", "http_probe", "tcp_probe"]

USER_AGENT = b"hsu-registry-check"
_MAX_OUTPUT = 200


@frozen
class ProbeResult:
    """
    The outcome of one check: passing or critical, with a short human
    reason such as C{"connected"}, C{"HTTP 503"} or C{"connection refused"}.
    """

    passing: bool
    output: str


def tcp_probe(
    reactor: Any, host: str, port: int, timeout: float, clock: IReactorTime | None = None
) -> Deferred[ProbeResult]:
    """
    Check that C{host}:C{port} accepts a TCP connection, then hang up at once.

    @param reactor: an C{IReactorTCP} and C{IReactorPluggableNameResolver}
        (names resolve off the reactor thread).
    @param host: a host name or an IPv4 or IPv6 literal (without brackets).
    @param timeout: seconds before the probe gives up, critical.
    @param clock: the timer for C{timeout}; default: C{reactor}.
    @return: a L{Deferred} that fires with a L{ProbeResult}, never fails.
    """

    def connect() -> Deferred[ProbeResult]:
        connecting = _endpoint(reactor, host, port, timeout).connect(_QuietFactory(_HangUp))
        return connecting.addCallback(lambda _: ProbeResult(True, "connected"))

    return _bounded(connect, timeout, clock or reactor)


def http_probe(
    reactor: Any,
    host: str,
    port: int,
    path: str,
    timeout: float,
    clock: IReactorTime | None = None,
) -> Deferred[ProbeResult]:
    """
    GET C{path} from C{host}:C{port} over plain HTTP: passing on any 2xx
    status, critical otherwise. The body is never read.

    @param path: the request target, starting with C{/}, printable ASCII.
    @return: a L{Deferred} that fires with a L{ProbeResult}, never fails.
    @see: L{tcp_probe} for the other parameters.
    """

    def get() -> Deferred[ProbeResult]:
        request = (
            b"GET %b HTTP/1.1\r\nHost: %b:%d\r\nUser-Agent: %b\r\n"
            b"Connection: close\r\n\r\n" % (path.encode("ascii"), _url_host(host), port, USER_AGENT)
        )
        answered: Deferred[ProbeResult] = Deferred()
        factory = _QuietFactory(lambda: _StatusLine(request, answered))
        connecting = _endpoint(reactor, host, port, timeout).connect(factory)

        def connected(protocol: IProtocol) -> Deferred[ProbeResult]:
            # Cancelling the answer (the probe timed out) aborts the connection.
            answered.addErrback(lambda f: _abort(protocol, f))
            return answered

        return connecting.addCallback(connected)

    return _bounded(get, timeout, clock or reactor)


#: The longest status line read before the answer counts as garbage.
_MAX_STATUS_LINE = 1024


class _QuietFactory(Factory):
    """A client factory that does not log each connection's start and stop."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: object) -> Protocol:
        protocol = self._build()
        protocol.factory = self
        return protocol


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    An endpoint to C{host}:C{port}: an IP address directly, a name through
    the reactor's resolver (off the reactor thread).
    """
    slack = _slack(timeout)
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=slack)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=slack)
    return HostnameEndpoint(reactor, host, port, timeout=slack)


class _HangUp(Protocol):
    """Close the connection as soon as it is made: connecting was the test."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _StatusLine(Protocol):
    """
    Send one GET and judge the answer by its status line: any 2xx passes.
    The connection is then aborted, so a huge or endless body costs nothing.
    """

    def __init__(self, request: bytes, answered: Deferred[ProbeResult]) -> None:
        self.request = request
        self.answered = answered
        self.received = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.answered.called:
            return
        self.received += data
        end = self.received.find(b"\r\n")
        if end < 0:
            if len(self.received) > _MAX_STATUS_LINE:
                self._answer(ProbeResult(False, "bad response: status line too long"))
            return
        self._answer(_judge_status_line(self.received[:end]))

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.answered.called:
            self.answered.callback(ProbeResult(False, "no response: connection closed"))

    def _answer(self, result: ProbeResult) -> None:
        self.answered.callback(result)
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


def _judge_status_line(line: bytes) -> ProbeResult:
    """C{HTTP/1.1 200 OK}: passing for 2xx; anything else critical."""
    parts = line.split(None, 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        code = int(parts[1])
        if len(parts[1]) == 3:
            return ProbeResult(200 <= code < 300, f"HTTP {code}")
    shown = line[:60].decode("ascii", "replace")
    return ProbeResult(False, f"bad response: {shown!r}")


def _abort(protocol: IProtocol, failure: Failure) -> Failure:
    transport = getattr(protocol, "transport", None)
    if transport is not None:
        transport.abortConnection()
    return failure


def _slack(timeout: float) -> float:
    # Connection attempts get a longer timeout than the probe, so the probe's
    # own timer always wins and the output always reads "timed out after ...".
    return timeout + 1.0


def _url_host(host: str) -> bytes:
    if ":" in host:
        return b"[%b]" % host.encode("ascii")
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        return host.encode("idna")


def _bounded(
    start: Callable[[], Deferred[ProbeResult]], timeout: float, clock: IReactorTime
) -> Deferred[ProbeResult]:
    """
    Run C{start}, turning every failure into a critical result and giving up
    after C{timeout} seconds of C{clock}; cancelling the returned L{Deferred}
    cancels the work and fires it with a critical C{"cancelled"}.
    """
    stopped: list[str] = []
    work = maybeDeferred(start)

    def stop(reason: str) -> None:
        stopped.append(reason)
        work.cancel()
        if not done.called:  # the work ignored the cancellation
            finish(None)

    def finish(result: ProbeResult | Failure | None) -> None:
        if timer.active():
            timer.cancel()
        if done.called:
            return
        if stopped:
            done.callback(ProbeResult(False, stopped[0]))
        elif isinstance(result, ProbeResult):
            done.callback(result)
        elif isinstance(result, Failure):
            done.callback(ProbeResult(False, _describe(result)))
        else:
            done.callback(ProbeResult(False, f"probe returned {result!r}"[:_MAX_OUTPUT]))

    done: Deferred[ProbeResult] = Deferred(lambda _: stop("cancelled"))
    timer = clock.callLater(timeout, stop, f"timed out after {go_duration(timeout)}")
    work.addBoth(finish)
    return done


def _describe(failure: Failure) -> str:
    """A short reason for a failed probe, for the check's output."""
    exc = failure.value
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, DNSLookupError):
        return "host not found"
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    if isinstance(exc, ConnectionClosed):
        return "connection closed"
    text = failure.getErrorMessage().strip() or type(failure.value).__name__
    return text[:_MAX_OUTPUT]

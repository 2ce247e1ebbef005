# -*- test-case-name: tests.test_checks -*-
"""
The probes behind active checks: a TCP connect and an HTTP GET.

Each probe is bounded by its timeout and never fails: whatever goes wrong
becomes a critical L{ProbeResult}, so callers only ever handle results.
Cancelling a probe aborts its connection, so an abandoned probe leaves no
socket or timer behind.

What a result says (its C{output}, published as C{checkOutput}) comes from a
fixed vocabulary (L{OUTPUTS}, and C{HTTP} with a three-digit status): never
bytes from the target, or a check would read banners (SSH version lines,
SMTP greetings) for whoever published it (issue 12).  What went wrong in
detail, which may quote the target, is the result's C{detail}, for the
operator's log only.

A daemon may run a thousand of these a second, so each is kept cheap: an IP
address is connected to directly (only host names go through the resolver's
threads), the factories do not log every connection, and the HTTP probe
sends one request and reads only the status line of the answer, which is
all a check needs, instead of parsing whole responses with a full client.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable
from typing import Any

from attrs import field, frozen
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectionClosed,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from hsu_registry.checks.spec import go_duration

__all__ = [
    "BAD_RESPONSE",
    "CANCELLED",
    "CLOSED",
    "CONNECTED",
    "ERROR",
    "NOT_ALLOWED",
    "OUTPUTS",
    "REFUSED",
    "TIMEOUT",
    "UNREACHABLE",
    "UNRESOLVED",
    "ProbeResult",
    "http_probe",
    "http_status",
    "is_output",
    "tcp_probe",
]

USER_AGENT = b"hsu-registry-check"
_MAX_DETAIL = 200

# -- the vocabulary of check outputs ----------------------------------------

#: TCP: the connection was accepted (and closed at once, nothing read).
CONNECTED = "connected"
#: The target refused the connection (nothing listens there).
REFUSED = "refused"
#: No answer within the check's timeout (connecting or waiting for a status line).
TIMEOUT = "timeout"
#: No route to the target (network or host unreachable).
UNREACHABLE = "unreachable"
#: A host name did not resolve (the registry's own checks never look names up).
UNRESOLVED = "unresolved"
#: HTTP: the connection closed before a status line came.
CLOSED = "closed"
#: HTTP: the answer did not start with an HTTP status line.
BAD_RESPONSE = "bad response"
#: Any other failure; the detail is logged.
ERROR = "error"
#: The probe was cancelled (its result is never reported).
CANCELLED = "cancelled"
#: The address is not one a check of the registration's identity may reach.
NOT_ALLOWED = "not allowed"

#: Every output but C{HTTP nnn} (see L{http_status}).
OUTPUTS = frozenset(
    {
        CONNECTED,
        REFUSED,
        TIMEOUT,
        UNREACHABLE,
        UNRESOLVED,
        CLOSED,
        BAD_RESPONSE,
        ERROR,
        CANCELLED,
        NOT_ALLOWED,
    }
)
_HTTP_STATUS = re.compile(r"HTTP [0-9]{3}")


def http_status(code: int) -> str:
    """The output of an HTTP check answered with status C{code} (100..999)."""
    return f"HTTP {code:03d}"


def is_output(text: str) -> bool:
    """Whether C{text} belongs to the vocabulary: one of L{OUTPUTS} or C{HTTP nnn}."""
    return text in OUTPUTS or _HTTP_STATUS.fullmatch(text) is not None


@frozen
class ProbeResult:
    """
    The outcome of one check: passing or critical, with an C{output} from the
    fixed vocabulary (L{OUTPUTS}, C{HTTP nnn}) that answers may show, and a
    C{detail} for the operator's log only (it may quote the target, so it is
    never published, and results compare equal whatever their detail).
    """

    passing: bool
    output: str
    detail: str = field(default="", eq=False)


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
        return connecting.addCallback(lambda _: ProbeResult(True, CONNECTED))

    return _bounded(connect, timeout, clock or reactor)


def http_probe(
    reactor: Any,
    host: str,
    port: int,
    path: str,
    timeout: float,
    clock: IReactorTime | None = None,
    address: str | None = None,
) -> Deferred[ProbeResult]:
    """
    GET C{path} from C{host}:C{port} over plain HTTP: passing on any 2xx
    status, critical otherwise.  The body is never read and redirects are
    never followed (a 3xx is critical, C{HTTP 301}...): the check talks to
    the API's own address only.

    @param path: the request target, starting with C{/}, printable ASCII.
    @param address: the IP address to connect to, when C{host} is a name
        resolved beforehand (the C{Host} header still names C{host}).
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
        connecting = _endpoint(reactor, address or host, port, timeout).connect(factory)

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
                self._answer(
                    ProbeResult(
                        False,
                        BAD_RESPONSE,
                        f"no status line in the first {_MAX_STATUS_LINE} bytes: "
                        + _quote(self.received),
                    )
                )
            return
        self._answer(_judge_status_line(self.received[:end]))

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        if not self.answered.called:
            self.answered.callback(
                ProbeResult(False, CLOSED, "connection closed before a status line")
            )

    def _answer(self, result: ProbeResult) -> None:
        self.answered.callback(result)
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


def _judge_status_line(line: bytes) -> ProbeResult:
    """
    C{HTTP/1.1 200 OK}: passing for 2xx; anything else critical.  Only the
    status code is kept: the reason phrase and anything that is not an HTTP
    status line (a banner) go to the detail.
    """
    parts = line.split(None, 2)
    if (
        len(parts) >= 2
        and parts[0].startswith(b"HTTP/")
        and len(parts[1]) == 3
        and parts[1].isdigit()
        and parts[1].isascii()
    ):
        code = int(parts[1])
        return ProbeResult(200 <= code < 300, http_status(code), _quote(line))
    return ProbeResult(False, BAD_RESPONSE, "not an HTTP status line: " + _quote(line))


def _quote(data: bytes) -> str:
    """Bytes from a target, made safe and short for a log line."""
    return repr(data[:60])[1:]


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
    stopped: list[ProbeResult] = []
    work = maybeDeferred(start)

    def stop(reason: ProbeResult) -> None:
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
            done.callback(stopped[0])
        elif isinstance(result, ProbeResult):
            done.callback(result)
        elif isinstance(result, Failure):
            done.callback(_describe(result))
        else:
            done.callback(ProbeResult(False, ERROR, f"probe returned {result!r}"[:_MAX_DETAIL]))

    done: Deferred[ProbeResult] = Deferred(
        lambda _: stop(ProbeResult(False, CANCELLED, "cancelled"))
    )
    timer = clock.callLater(
        timeout,
        stop,
        ProbeResult(False, TIMEOUT, f"no answer within {go_duration(timeout)}"),
    )
    work.addBoth(finish)
    return done


_UNREACHABLE_ERRNOS = frozenset(
    code
    for code in (getattr(errno, "ENETUNREACH", None), getattr(errno, "EHOSTUNREACH", None))
    if code is not None
)


def _describe(failure: Failure) -> ProbeResult:
    """
    The critical result of a failed probe: an output from the vocabulary,
    and the failure's own words as the detail.
    """
    exc = failure.value
    detail = (failure.getErrorMessage().strip() or type(exc).__name__)[:_MAX_DETAIL]
    if isinstance(exc, ConnectionRefusedError):
        output = REFUSED
    elif isinstance(exc, DNSLookupError):
        output = UNRESOLVED
    elif isinstance(exc, (TimeoutError, TCPTimedOutError)):
        output = TIMEOUT
    elif isinstance(exc, NoRouteError) or (
        isinstance(exc, ConnectError) and getattr(exc, "osError", None) in _UNREACHABLE_ERRNOS
    ):
        output = UNREACHABLE
    elif isinstance(exc, ConnectionClosed):
        output = CLOSED
    else:
        output = ERROR
    return ProbeResult(False, output, detail)

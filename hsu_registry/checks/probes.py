# -*- test-case-name: tests.test_checks -*-
"""
The probes behind active checks: a TCP connect and an HTTP GET.

Each probe is bounded by its timeout and never fails: whatever goes wrong
becomes a critical L{ProbeResult} with a short reason, so callers only ever
handle results. Cancelling a probe aborts its connection, so an abandoned
probe leaves no socket or timer behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import (
    ConnectionClosed,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

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
        endpoint = HostnameEndpoint(reactor, host, port, timeout=_slack(timeout))
        connecting = endpoint.connect(Factory.forProtocol(_HangUp))
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
        url = b"http://%b:%d%b" % (_url_host(host), port, path.encode("ascii"))
        # Agent's default pool is not persistent: the connection closes with
        # the response, and a check interval later a fresh one is made.
        agent = Agent(reactor, connectTimeout=_slack(timeout))
        requesting = agent.request(b"GET", url, Headers({b"User-Agent": [USER_AGENT]}))
        return requesting.addCallback(_judge_response)

    return _bounded(get, timeout, clock or reactor)


class _HangUp(Protocol):
    """Close the connection as soon as it is made: connecting was the test."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()


class _Discard(Protocol):
    """Receive a response body by refusing it: stop the transport at once."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


def _judge_response(response: IResponse) -> ProbeResult:
    # Only the status matters; a huge or endless body must cost nothing.
    response.deliverBody(_Discard())
    return ProbeResult(200 <= response.code < 300, f"HTTP {response.code}")


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
    if isinstance(exc, ResponseFailed):  # ResponseNeverReceived included
        reasons = exc.reasons
        return "no response: " + (_describe(reasons[0]) if reasons else "unknown error")
    text = failure.getErrorMessage().strip() or type(failure.value).__name__
    return text[:_MAX_OUTPUT]

# -*- test-case-name: tests.test_site -*-
"""
The registry's L{Site}: bounded connections, deadlines and request bodies,
no tracebacks, no access log unless asked for.

twisted.web has no limit on request bodies (large ones are spooled to a
temporary file), so the channel here refuses a declared C{Content-Length}
over the limit with a JSON 413 before reading any of the body, and a chunked
body as soon as it passes the limit.  Bodies are held in memory: the limit
keeps each bounded, and one budget shared by every connection
(L{hsu_registry.web.budget}) keeps them all bounded (a JSON 503 past it).

Each new connection is admitted or refused by the site's
L{ConnectionLimiter} (L{hsu_registry.web.connections}): a total, a limit per
peer (uid or address) and a reserve for the operator.  Twisted's idle timer
(reset by every byte) is replaced by deadlines that bytes do not move
(L{hsu_registry.web.deadlines}): the request line and headers within the
header timeout, a body at the minimum rate, the next request within the idle
timeout; none while a request is processed.  Every refusal is JSON.
"""

from __future__ import annotations

import io
import socket
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from hsu_registry.web.budget import DEFAULT_MAX_BODY_MEMORY, BodyBudget
from hsu_registry.web.connections import (
    ConnectionLimiter,
    ConnectionLimits,
    Peer,
    RateLimitedLog,
    Slot,
    derive_connection_limits,
    peer_of,
    privileged_uids,
)
from hsu_registry.web.deadlines import Deadlines, DeadlineTimer
from hsu_registry.web.responses import error_body

if TYPE_CHECKING:
    from hsu_registry.config import RegistryConfig

__all__ = ["DEFAULT_MAX_BODY_SIZE", "RegistrySite", "site_bounds"]

from hsu_registry.web.limits import DEFAULT_MAX_BODY_SIZE

#: The one request a connection admitted for health only may make.
HEALTH_PATH = b"/api/v1/health"
#: The most seconds such a connection has to send it: a monitor sends it at
#: once, and a peer holding the slot without asking frees it soon.
HEALTH_HEADER_TIMEOUT = 1.0

# Methods whose body the API reads; any other request's body is dropped (and
# its bytes given back to the budget) once received, so that a long-held
# request (a watch stream, a blocking query) holds no body.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


def _raw_error(
    status: bytes,
    message: str,
    context: dict[str, Any] | None = None,
    retry_after: int | None = None,
) -> bytes:
    """
    A whole JSON error answer, written straight to the transport when no
    request can be (or is yet) answered the usual way; the connection closes
    after it.
    """
    body = error_body(message, context)
    retry = b"Retry-After: %d\r\n" % retry_after if retry_after is not None else b""
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % len(body) + retry + b"Connection: close\r\n\r\n" + body
    )


def _too_large_response(limit: int) -> bytes:
    return _raw_error(
        b"413 Request Entity Too Large",
        f"request body is larger than the limit of {limit} bytes",
        {"maxBodySize": limit},
    )


class _BoundedRequest(Request):
    """
    A request whose body is kept in memory and cut off past the limit, and
    never parsed as a form: the API speaks JSON, and parsing the Content-Type
    of every POST (with the email package) cost a fifth of a publish.
    """

    channel: _BoundedChannel
    _received = 0
    _chunked = False

    def __init__(self, channel: HTTPChannel, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        self.content = self._body = io.BytesIO()
        self._received = 0
        # A chunked body takes its bytes from the budget as they arrive.
        self._chunked = length is None

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if channel._refused:
            return  # the rest of a read that held a refused part
        self._received += len(data)
        limit = channel.maxBodySize
        if self._received > limit:
            channel.refuseBody(limit)
            return
        if self._chunked and not channel.holdBody(len(data)):
            return
        self._body.write(data)


class _NoTimer:
    """The timer of a connection that was refused: it has no deadline."""

    deadline: float | None = None

    def ensure(self) -> None:
        pass

    def stop(self) -> None:
        pass


_NO_TIMER = _NoTimer()

# A connection's phases, for its deadlines.
_IDLE = "idle"  # waiting for a request to begin (a new or kept-alive connection)
_HEADERS = "headers"  # a request has begun: its line and headers are arriving
_BODY = "body"  # its body is arriving
_BUSY = "busy"  # it is being processed: no deadline
_CLOSING = "closing"  # closing: aborted if it does not take its last answer
_CLOSED = "closed"


class _BoundedChannel(HTTPChannel):
    """
    An HTTP channel that refuses oversized bodies before buffering them,
    holds its bodies within the site's budget, answers only when admitted by
    the site's connection limiter, and keeps deadlines that trickled bytes do
    not move (see the module docstring).
    """

    site: RegistrySite
    maxBodySize = DEFAULT_MAX_BODY_SIZE
    _refused = False
    #: Set when the daemon stops (see hsu_registry.web.drain): the request
    #: under way is answered, then the connection closes; no other is read.
    draining = False
    #: The peer and where it was admitted (None: not admitted).
    _peer: Peer | None = None
    _slot: Slot | None = None
    _timer: DeadlineTimer | _NoTimer = _NO_TIMER
    _phase = _IDLE
    # Set by RegistrySite.buildProtocol (read on every request).
    _seconds: Callable[[], float]
    _header_timeout: float
    _idle_timeout: float
    # Body bytes of the current request taken from the budget.
    _held = 0
    # Body bytes received when the current rate period began.
    _body_mark = 0

    def connectionMade(self) -> None:
        site = self.site
        transport = self.transport
        assert transport is not None
        peer, identity = site.identify_peer(transport)
        if identity is not None:
            # Looked up once per connection: the API asks the channel for it.
            self.hsu_identity = identity
        slot = site.connections.admit(peer)
        if not slot.admitted:
            # Answer at once and hold nothing: no timer, no producer.
            self._phase = _CLOSED
            self._refused = True
            self.dataReceived = _ignore  # type: ignore[method-assign,assignment]
            _refuse_now(transport, site.refusal(slot))
            return
        self._peer, self._slot = peer, slot
        if peer.unidentified:
            site.unidentified.add(self)
        if slot is Slot.HEALTH:
            self._header_timeout = min(self._header_timeout, HEALTH_HEADER_TIMEOUT)
        self._timer = timer = DeadlineTimer(site.reactor, self._deadlinePassed)
        super().connectionMade()
        # A new connection must begin its request within the header timeout.
        timer.deadline = self._seconds() + self._header_timeout
        timer.ensure()

    def dataReceived(self, data: bytes) -> None:
        # Unlike Twisted's idle timer, bytes never push a deadline back: the
        # first byte of a request starts its header deadline, and that is all.
        if self._phase is _IDLE:
            self._phase = _HEADERS
            self._timer.deadline = self._seconds() + self._header_timeout
        LineReceiver.dataReceived(self, data)
        if self._phase is _HEADERS or self._phase is _BODY:
            # The request arrives in pieces: its deadline may be sooner than
            # the timer (the cheap path, a request in one read, skips this).
            self._timer.ensure()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self.draining or self._slot is Slot.HEALTH:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def allHeadersReceived(self) -> None:
        length = self.length
        if length is not None and length > self.maxBodySize:
            # Answer now: no 100-continue, and none of the body is read.
            self.requests[-1].content = io.BytesIO()
            self.refuseBody(self.maxBodySize)
            return
        if self._slot is Slot.HEALTH and not (
            self._command == b"GET" and self._path.split(b"?", 1)[0] == HEALTH_PATH
        ):
            self.requests[-1].content = io.BytesIO()
            self._answerAndClose(self.site.refusal(Slot.HEALTH))
            return
        if length != 0:
            if self._peer is not None and self._peer.unidentified:
                # A body is counted per peer: its uid matters now (and the
                # API asks for it anyway, to own what a publish creates).
                self.identify()
            if length is not None:
                # The declared length is taken before any of the body is read.
                if not self.holdBody(length):
                    self.requests[-1].content = io.BytesIO()
                    return
            self._phase = _BODY
            self._body_mark = 0
            self._timer.deadline = self._seconds() + self.site.deadlines.body_grace
        super().allHeadersReceived()

    def identify(self) -> None:
        """
        Ask the kernel for the uid of this loopback TCP connection, admitted
        unidentified (see L{hsu_registry.web.connections}), and count it as
        that uid's from now on.
        """
        site = self.site
        site.unidentified.discard(self)
        before = self._peer
        if before is None or not before.unidentified or self.transport is None:
            return
        peer, identity = site.identify_peer(self.transport, eager=True)
        if identity is not None and getattr(self, "hsu_identity", None) is None:
            self.hsu_identity = identity
        site.connections.identified(before, peer)
        self._peer = peer

    def holdBody(self, size: int) -> bool:
        """
        Take C{size} more bytes of this request's body from the site's
        budget; when they do not fit, answer a JSON 503 and close instead.
        """
        assert self._peer is not None
        if self.site.bodies.take(self._peer, size):
            self._held += size
            return True
        self._answerAndClose(self.site.body_refusal)
        return False

    def _giveBackBody(self) -> None:
        held, self._held = self._held, 0
        if held and self._peer is not None:
            self.site.bodies.give_back(self._peer, held)

    def allContentReceived(self) -> None:
        if self._refused:
            # Answered already (a health-only connection asking for more):
            # a request without a body comes here after its refusal.
            return
        self._phase = _BUSY
        self._timer.deadline = None
        if self._held and self._command not in _BODY_METHODS:
            request = self.requests[-1]
            request.content = request._body = io.BytesIO()
            self._giveBackBody()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self._held:
            self._giveBackBody()
        if self.persistent and self._phase is _BUSY:
            self._phase = _IDLE
            self._timer.deadline = self._seconds() + self._idle_timeout
        super().requestDone(request)
        if self._phase is not _CLOSED:
            self._timer.ensure()

    def loseConnection(self) -> None:
        if self._phase is not _CLOSED:
            self._phase = _CLOSING
            self._timer.deadline = self._seconds() + (self.abortTimeout or 0)
            self._timer.ensure()
        super().loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._phase = _CLOSED
        self._timer.stop()
        self.site.unidentified.discard(self)
        self._giveBackBody()
        slot, self._slot = self._slot, None
        if slot is not None and self._peer is not None:
            self.site.connections.release(self._peer, slot)
        super().connectionLost(reason)

    def _deadlinePassed(self) -> None:
        """The deadline of the connection's phase passed: act on it."""
        phase = self._phase
        site = self.site
        if phase is _IDLE:
            # No request began in time: close quietly, as an idle timeout.
            site.idle_timeouts += 1
            self.loseConnection()
        elif phase is _HEADERS:
            site.header_timeouts += 1
            site.warn(
                "header-timeout",
                "Closed {count} connections in {interval}s whose request line and headers "
                "did not arrive within {timeout}s (the latest from {peer})",
                timeout=site.deadlines.header_timeout,
                peer=self._peer.key if self._peer is not None else "?",
            )
            self._answerAndClose(site.header_timeout_response)
        elif phase is _BODY:
            received = self.requests[-1]._received if self.requests else 0
            deadlines = site.deadlines
            if received - self._body_mark >= deadlines.body_bytes_per_period:
                # Fast enough over this period: measure the next one.
                self._body_mark = received
                self._timer.deadline = self._seconds() + deadlines.body_grace
                self._timer.ensure()
                return
            site.body_timeouts += 1
            site.warn(
                "body-timeout",
                "Closed {count} connections in {interval}s whose request body arrived "
                "slower than {rate} bytes a second (the latest from {peer})",
                rate=deadlines.min_body_rate,
                peer=self._peer.key if self._peer is not None else "?",
            )
            self._answerAndClose(site.body_timeout_response)
        elif phase is _CLOSING and self.transport is not None:
            # It would not take its last answer: cut it off.
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def refuseBody(self, limit: int) -> None:
        """Write a JSON 413, ignore whatever else arrives, and close."""
        self._answerAndClose(_too_large_response(limit))

    def _answerAndClose(self, response: bytes) -> None:
        """Write C{response} (a whole JSON error), ignore whatever else arrives, and close."""
        if self._refused:
            return
        self._refused = True
        self.dataReceived = self.rawDataReceived = self.lineReceived = _ignore  # type: ignore[method-assign,assignment]
        self._buffer = b""  # what was read past the refused part (up to a read's size)
        self._giveBackBody()
        assert self.transport is not None
        self.transport.write(response)
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Twisted's answer to a request it cannot parse (a raw space or
        non-ASCII byte in the request line, a malformed header, headers over
        the size limit) is a bare 400: answer it as JSON like every other error.
        """
        self._answerAndClose(_BAD_REQUEST)


def _bad_request_response() -> bytes:
    return _raw_error(
        b"400 Bad Request",
        "malformed HTTP request: the request line or a header is not valid HTTP/1.1 "
        "(percent-encode spaces and non-ASCII characters in the path)",
    )


_BAD_REQUEST = _bad_request_response()


def _ignore(*args: Any) -> None:
    pass


def _refuse_now(transport: Any, response: bytes) -> None:
    """
    Answer a refused connection and close it before returning, so that its
    descriptor is free at once: Twisted accepts up to a hundred connections
    and more in one go, and refusals closed the usual way (on the next turn
    of the reactor) could together take every descriptor left.

    What the client has sent so far is read and dropped first: a socket
    closed with bytes unread is reset, and the reset destroys the answer
    before the client reads it.  (Bytes arriving after the close still reset
    it: that client sees a reset, not the JSON refusal.)  Transports without
    a socket of their own (TLS, in memory) are answered and closed the usual
    way.
    """
    handle = None
    # A socket transport of the reactor's (TLS: the socket is its wrapper's).
    if hasattr(transport, "connectionLost") and not hasattr(transport, "wrappedProtocol"):
        try:
            handle = transport.getHandle()
        except Exception:
            handle = None
    if not isinstance(handle, socket.socket):
        transport.write(response)
        transport.loseConnection()
        return
    try:
        for _ in range(4):
            if len(handle.recv(65536, socket.MSG_DONTWAIT)) < 65536:
                break
    except OSError:
        pass
    try:
        handle.send(response, socket.MSG_DONTWAIT)  # a new socket has room for it
    except OSError:
        pass
    # What the reactor does when a connection ends: stop watching the
    # socket, shut it down and close it, and tell the protocol.
    transport.connectionLost(Failure(ConnectionDone()))


class RegistrySite(Site):
    """
    The Site serving the registry API.

    @param max_body_size: the largest request body accepted, in bytes.
    @param access_log: when false (the default) requests are not logged; the
        access log costs about 15% of throughput.
    @param timeout: the idle timeout, when C{deadlines} is not given.
    @param deadlines: how long a client may take over each part of a
        connection (L{Deadlines}).
    @param connection_limits: how many connections are held (default:
        derived from the open-file limit, L{derive_connection_limits}).
    @param max_body_memory: the bytes of request bodies held at once, by
        all connections together.
    @param privileged: the uids that may use the reserve and are not
        limited per peer (default: root and the registry's own uid).

    The counters (for a metrics endpoint) are attributes: C{connections}
    (L{ConnectionLimiter}), C{bodies} (L{BodyBudget}), C{header_timeouts},
    C{body_timeouts} and C{idle_timeouts}; L{stats} has them all by name.
    """

    displayTracebacks = False
    requestFactory = _BoundedRequest
    protocol = _BoundedChannel  # type: ignore[assignment]
    _logger = Logger()

    def __init__(
        self,
        resource: IResource,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        access_log: bool = False,
        timeout: float = 60.0,
        reactor: Any = None,
        *,
        deadlines: Deadlines | None = None,
        connection_limits: ConnectionLimits | None = None,
        max_body_memory: int = DEFAULT_MAX_BODY_MEMORY,
        privileged: frozenset[int] | None = None,
    ) -> None:
        # Twisted's idle timer (reset by every byte) is off: the channels
        # keep their own deadlines.
        kwargs: dict[str, Any] = {"timeout": None}
        if reactor is not None:
            kwargs["reactor"] = reactor
        super().__init__(resource, **kwargs)
        self.max_body_size = max_body_size
        self.access_log = access_log
        self._channels: weakref.WeakSet[HTTPChannel] = weakref.WeakSet()
        self.deadlines = deadlines if deadlines is not None else Deadlines(idle_timeout=timeout)
        self.connection_limits = (
            connection_limits if connection_limits is not None else derive_connection_limits()
        )
        self.privileged = privileged if privileged is not None else privileged_uids()
        self._rate_limited = RateLimitedLog(self._logger, self.reactor)
        self.warn = self._rate_limited.warn
        self.connections = ConnectionLimiter(self.connection_limits, self.warn)
        self.bodies = BodyBudget(
            max_body_memory, peer_share=max(max_body_memory // 4, max_body_size), warn=self.warn
        )
        self.header_timeouts = 0
        self.body_timeouts = 0
        self.idle_timeouts = 0
        # Loopback TCP connections admitted before their uid could matter.
        self.unidentified: set[_BoundedChannel] = set()
        self._responses()

    def _responses(self) -> None:
        """The JSON refusals, made once (the limits do not change)."""
        limits, deadlines = self.connection_limits, self.deadlines
        self._refusals = {
            Slot.OVER_PEER_LIMIT: _raw_error(
                b"429 Too Many Requests",
                f"too many connections from this peer: at most {limits.max_per_peer} "
                "at once; reuse a kept-alive connection",
                {"maxConnectionsPerPeer": limits.max_per_peer},
                retry_after=1,
            ),
            Slot.OVER_TOTAL_LIMIT: _raw_error(
                b"503 Service Unavailable",
                "the registry is at its connection limit; retry later",
                {"maxConnections": limits.max_connections},
                retry_after=1,
            ),
            Slot.HEALTH: _raw_error(
                b"503 Service Unavailable",
                "the registry is at its connection limit: this connection may only "
                "ask GET /api/v1/health; retry later",
                {"maxConnections": limits.max_connections},
                retry_after=1,
            ),
        }
        self.body_refusal = _raw_error(
            b"503 Service Unavailable",
            "the registry is receiving too many request bodies at once; retry later",
            {"maxBodyMemory": self.bodies.capacity},
            retry_after=1,
        )
        self.header_timeout_response = _raw_error(
            b"408 Request Timeout",
            f"the request line and headers did not arrive within {deadlines.header_timeout:g}s",
            {"headerTimeout": deadlines.header_timeout},
        )
        self.body_timeout_response = _raw_error(
            b"408 Request Timeout",
            f"the request body arrived slower than {deadlines.min_body_rate} bytes a second",
            {"minBodyRate": deadlines.min_body_rate},
        )

    def refusal(self, slot: Slot) -> bytes:
        """The whole answer to a connection refused for C{slot}'s reason."""
        return self._refusals[slot]

    def identify_peer(self, transport: Any, eager: bool = False) -> tuple[Peer, Any]:
        """
        The peer of a new connection, and its kernel identity (see
        L{peer_of}).  A loopback TCP connection is identified only when
        C{eager} or when its uid can matter; the moment uids start to
        matter, the connections admitted unidentified are identified.
        """
        if not eager:
            eager = self.connections.needs_uid()
            if eager and self.unidentified:
                for channel in list(self.unidentified):
                    channel.identify()
        return peer_of(transport, self.privileged, identify_loopback=eager)

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.maxBodySize = self.max_body_size
        channel._seconds = self.reactor.seconds
        channel._header_timeout = self.deadlines.header_timeout
        channel._idle_timeout = self.deadlines.idle_timeout
        self._channels.add(channel)
        return channel

    def startFactory(self) -> None:
        super().startFactory()
        limits, deadlines = self.connection_limits, self.deadlines
        self._logger.info(
            "Connections: at most {max_connections} ({max_per_peer} per peer), "
            "{reserved} more for root and uid {uid}; request line and headers within "
            "{header_timeout}s, bodies at {min_body_rate} bytes/s or faster and "
            "{max_body_memory} bytes of them at once, idle connections closed after "
            "{idle_timeout}s",
            max_connections=limits.max_connections,
            max_per_peer=limits.max_per_peer,
            reserved=limits.reserved,
            uid=max(self.privileged, default=0),
            header_timeout=deadlines.header_timeout,
            min_body_rate=deadlines.min_body_rate,
            max_body_memory=self.bodies.capacity,
            idle_timeout=deadlines.idle_timeout,
            file_limit=limits.file_limit,
        )
        if limits.overcommitted():
            self._logger.warn(
                "The connection limits ({connections} with the reserve) exceed the "
                "{descriptors} descriptors left for connections under the open-file limit "
                "of {file_limit}: raise the limit (LimitNOFILE=) or lower --max-connections",
                connections=limits.max_connections + limits.reserved,
                descriptors=limits.descriptors,
                file_limit=limits.file_limit,
            )

    def stopFactory(self) -> None:
        self._rate_limited.stop()
        super().stopFactory()

    def stats(self) -> dict[str, int]:
        """Every counter of the site's bounds, by name (for a metrics endpoint)."""
        return {
            **self.connections.stats(),
            **self.bodies.stats(),
            "header_timeouts": self.header_timeouts,
            "body_timeouts": self.body_timeouts,
            "idle_timeouts": self.idle_timeouts,
        }

    def channels(self) -> list[HTTPChannel]:
        """The connections open now (for draining them on stop)."""
        return [channel for channel in list(self._channels) if channel.transport is not None]

    def close_connections(self) -> None:
        """Close every connection (the service is stopping: no new ones arrive)."""
        for channel in list(self._channels):
            if channel.transport is not None:
                channel.transport.loseConnection()

    def log(self, request: Any) -> None:
        if self.access_log:
            super().log(request)


def site_bounds(config: RegistryConfig, process_binding: bool) -> dict[str, Any]:
    """
    The L{RegistrySite} arguments for C{config}'s connection limits (the
    unset ones derived from the open-file limit, leaving room for
    C{config.check_concurrency} health checks and, when C{process_binding},
    the process monitor's pidfds), deadlines and body budget.
    """
    return {
        "connection_limits": derive_connection_limits(
            max_connections=config.max_connections,
            max_per_peer=config.max_connections_per_peer,
            reserved=config.reserved_connections,
            check_concurrency=config.check_concurrency,
            process_binding=process_binding,
        ),
        "deadlines": Deadlines(
            header_timeout=config.header_timeout,
            idle_timeout=config.idle_timeout,
            min_body_rate=config.min_body_rate,
            body_grace=config.body_grace,
        ),
        "max_body_memory": config.max_body_memory,
    }

# -*- test-case-name: tests.test_site -*-
"""
The registry's L{Site}: bounded request bodies, no tracebacks, no access log
unless asked for.

twisted.web has no limit on request bodies (large ones are spooled to a
temporary file), so the channel here refuses a declared C{Content-Length}
over the limit with a JSON 413 before reading any of the body, and a chunked
body as soon as it passes the limit.  Bodies are held in memory: the limit
keeps that bounded.
"""

from __future__ import annotations

import io
import weakref
from typing import Any

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from hsu_registry.web.responses import error_body

__all__ = ["DEFAULT_MAX_BODY_SIZE", "RegistrySite"]

from hsu_registry.web.limits import DEFAULT_MAX_BODY_SIZE


def _too_large_response(limit: int) -> bytes:
    body = error_body(
        f"request body is larger than the limit of {limit} bytes",
        {"maxBodySize": limit},
    )
    return (
        b"HTTP/1.1 413 Request Entity Too Large\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    ) + body


class _BoundedRequest(Request):
    """
    A request whose body is kept in memory and cut off past the limit, and
    never parsed as a form: the API speaks JSON, and parsing the Content-Type
    of every POST (with the email package) cost a fifth of a publish.
    """

    channel: _BoundedChannel

    def __init__(self, channel: HTTPChannel, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)

    def gotLength(self, length: int | None) -> None:
        self.content = self._body = io.BytesIO()
        self._received = 0

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        limit = self.channel.maxBodySize
        if self._received > limit:
            self.channel.refuseBody(limit)
            return
        self._body.write(data)


class _BoundedChannel(HTTPChannel):
    """An HTTP channel that refuses oversized bodies before buffering them."""

    maxBodySize = DEFAULT_MAX_BODY_SIZE
    _refused = False
    #: Set when the daemon stops (see hsu_registry.web.drain): the request
    #: under way is answered, then the connection closes; no other is read.
    draining = False

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        if self.draining:
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
        super().allHeadersReceived()

    def refuseBody(self, limit: int) -> None:
        """Write a JSON 413, ignore whatever else arrives, and close."""
        if self._refused:
            return
        self._refused = True
        self.dataReceived = self.rawDataReceived = self.lineReceived = _ignore  # type: ignore[method-assign,assignment]
        assert self.transport is not None
        self.transport.write(_too_large_response(limit))
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """
        Twisted's answer to a request it cannot parse (a raw space or
        non-ASCII byte in the request line, a malformed header, headers over
        the size limit) is a bare 400: answer it as JSON like every other error.
        """
        assert self.transport is not None
        self.transport.write(_BAD_REQUEST)
        self.loseConnection()


def _bad_request_response() -> bytes:
    body = error_body(
        "malformed HTTP request: the request line or a header is not valid HTTP/1.1 "
        "(percent-encode spaces and non-ASCII characters in the path)"
    )
    return (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % len(body)
    ) + body


_BAD_REQUEST = _bad_request_response()


def _ignore(*args: Any) -> None:
    pass


class RegistrySite(Site):
    """
    The Site serving the registry API.

    @param max_body_size: the largest request body accepted, in bytes.
    @param access_log: when false (the default) requests are not logged; the
        access log costs about 15% of throughput.
    """

    displayTracebacks = False
    requestFactory = _BoundedRequest
    protocol = _BoundedChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        access_log: bool = False,
        timeout: float = 60.0,
        reactor: Any = None,
    ) -> None:
        kwargs: dict[str, Any] = {"timeout": timeout}
        if reactor is not None:
            kwargs["reactor"] = reactor
        super().__init__(resource, **kwargs)
        self.max_body_size = max_body_size
        self.access_log = access_log
        self._channels: weakref.WeakSet[HTTPChannel] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.maxBodySize = self.max_body_size
        self._channels.add(channel)
        return channel

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

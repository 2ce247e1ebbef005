# -*- test-case-name: tests.test_client_watch -*-
"""
Watching the registry from a reactor: L{Watch} follows the SSE stream and
resumes by itself from the last event it saw; L{RegistryCache} keeps a live
local copy of the catalog and keeps serving it, marked stale, while the
registry is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from hsu_registry.client.events import EventParser, WatchEvent

if TYPE_CHECKING:
    from hsu_registry.client.asynchronous import RegistryClient

__all__ = ["Catalog", "RegistryCache", "Watch"]


@frozen
class Catalog:
    """The registry's catalog at one change index."""

    index: int
    epoch: str
    modules: dict[str, dict[str, Any]]


class _Stream(Protocol):
    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.parser = EventParser()

    def dataReceived(self, data: bytes) -> None:
        self.watch._alive()
        for event in self.parser.feed(data):
            self.watch._event(event)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.watch._lost(reason)


class Watch:
    """
    A running watch of the registry's changes.

    C{callback(event)} gets every L{WatchEvent}: C{hello} on each
    (re)connection, the changes, and C{resync} when changes were missed (after
    a long disconnection or a daemon restart): reload the catalog then.
    C{on_connection(connected)} is told when the stream comes and goes.  A
    lost or silent stream (no keep-alive for C{idle_timeout}) is resumed
    after a capped, growing delay, from the last index seen.
    """

    log = Logger()

    def __init__(
        self,
        client: RegistryClient,
        callback: Callable[[WatchEvent], object],
        last_index: int | None = None,
        epoch: str | None = None,
        on_connection: Callable[[bool], object] | None = None,
        idle_timeout: float = 45.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.client = client
        self.callback = callback
        self.last_index = last_index
        self.epoch = epoch
        self.on_connection = on_connection
        self.idle_timeout = idle_timeout
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.connected = False
        self.stopped = False
        self.failures = 0
        self._reactor = client._reactor
        self._agent = Agent.usingEndpointFactory(self._reactor, client._endpoints)
        self._request: Deferred[Any] | None = None
        self._stream: _Stream | None = None
        self._idle: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None

    def start(self) -> Watch:
        self._connect()
        return self

    def stop(self) -> None:
        """End the watch: no more events, no reconnection."""
        self.stopped = True
        for call in (self._idle, self._retry):
            if call is not None and call.active():
                call.cancel()
        if self._request is not None:
            self._request.cancel()
        self._abort_stream()

    def _abort_stream(self) -> None:
        transport: Any = self._stream.transport if self._stream is not None else None
        if transport is not None:
            transport.stopProducing()  # the body's producer: drops the connection

    def _connect(self) -> None:
        self._retry = None
        headers = Headers({b"accept": [b"text/event-stream"]})
        if self.client._authorization is not None:
            headers.addRawHeader(b"authorization", self.client._authorization)
        if self.last_index is not None:
            headers.addRawHeader(b"last-event-id", b"%d" % self.last_index)
            if self.epoch:
                headers.addRawHeader(b"x-hsu-epoch", self.epoch.encode("ascii"))
        d = self._agent.request(b"GET", self.client.address.base + b"/api/v1/watch", headers)
        d.addTimeout(self.client.timeout, self._reactor)
        self._request = d
        d.addCallbacks(self._streaming, self._lost)

    def _streaming(self, response: Any) -> None:
        self._request = None
        if response.code != 200:
            readBody(response).addBoth(lambda _: None)
            self._lost(Failure(ConnectionError(f"watch answered HTTP {response.code}")))
            return
        self._stream = _Stream(self)
        response.deliverBody(self._stream)
        self._alive()

    def _alive(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        elif not self.stopped:
            self._idle = self._reactor.callLater(self.idle_timeout, self._silent)

    def _silent(self) -> None:
        self.log.warn("The watch stream went silent; reconnecting")
        self._abort_stream()

    def _event(self, event: WatchEvent) -> None:
        if event.kind == "hello" or event.kind == "resync":
            self.failures = 0
            if not self.connected:
                self.connected = True
                if self.on_connection is not None:
                    self.on_connection(True)
        self.last_index = event.index
        if event.epoch:
            self.epoch = event.epoch
        self.callback(event)

    def _lost(self, reason: Failure) -> None:
        self._request = None
        self._stream = None
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        if self.connected:
            self.connected = False
            if self.on_connection is not None:
                self.on_connection(False)
        if self.stopped:
            return
        self.failures += 1
        delay = min(self.retry_max, self.retry_initial * 2 ** min(self.failures - 1, 10))
        self.log.info(
            "Watch stream lost ({reason}); resuming from {index} in {delay}s",
            reason=reason.getErrorMessage(),
            index=self.last_index,
            delay=delay,
        )
        self._retry = self._reactor.callLater(delay, self._connect)


class RegistryCache:
    """
    A live local copy of the registry's catalog: loaded once, then kept up to
    date by a L{Watch}; reloaded on C{resync}.  While the registry cannot be
    reached it keeps answering from the last known view, with C{stale} true.
    """

    log = Logger()

    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self.modules: dict[str, dict[str, Any]] = {}
        self.stale = True
        self.index: int | None = None
        self.watch: Watch | None = None
        self._listeners: list[Callable[[WatchEvent], object]] = []

    def start(self) -> Deferred[None]:
        """Load the catalog and start following changes (fires once loaded)."""
        return self._reload().addCallback(self._follow)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()

    def get(self, module_id: str) -> dict[str, Any] | None:
        """The module's catalog entry from the local view (no request)."""
        return self.modules.get(module_id)

    def listen(self, listener: Callable[[WatchEvent], object]) -> None:
        """Also call C{listener} with every change applied to the view."""
        self._listeners.append(listener)

    def _reload(self) -> Deferred[Catalog]:
        def loaded(catalog: Catalog) -> Catalog:
            self.modules = dict(catalog.modules)
            self.index = catalog.index
            self.stale = False
            return catalog

        return self.client.catalog().addCallback(loaded)

    def _follow(self, catalog: Catalog) -> None:
        self.watch = Watch(
            self.client,
            self._event,
            last_index=catalog.index,
            epoch=catalog.epoch,
            on_connection=self._connection,
        ).start()

    def _connection(self, connected: bool) -> None:
        if not connected:
            self.stale = True

    def _event(self, event: WatchEvent) -> None:
        if event.kind == "resync":
            self.stale = True
            self._reload().addErrback(lambda f: self.log.failure("Could not reload the catalog", f))
            return
        if event.kind == "hello":
            self.stale = False
            return
        module_id = event.module_id
        if module_id is None:
            return
        if event.kind in ("published", "updated", "status"):
            self.modules[module_id] = event.data
        else:
            self.modules.pop(module_id, None)
        self.index = event.index
        for listener in list(self._listeners):
            listener(event)

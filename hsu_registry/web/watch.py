# -*- test-case-name: tests.test_watch_api -*-
"""
The watch stream: C{GET /api/v1/watch} as Server-Sent Events, one event per
change, with the change index as the event id.

 - A reconnecting client sends C{Last-Event-ID} (and the epoch it saw, as
   C{X-HSU-Epoch} or C{?epoch=}); it is replayed what it missed from the
   change log, or sent an explicit C{resync} event when those changes are no
   longer there (or the daemon restarted).
 - Each change is encoded once for all streams.  A stream whose client reads
   too slowly is paused by its transport; its events queue up to a limit,
   past which it is disconnected (it can resume with C{Last-Event-ID}), so no
   watcher can grow the daemon's memory without bound.
 - One timer for all streams writes keep-alive comments while any is open;
   idle streams cost nothing else.  Stopping the daemon ends every stream.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from hsu_registry.registry import Change
from hsu_registry.watch import ChangeLog
from hsu_registry.web.catalog import rfc3339

__all__ = ["WatchHub", "encode_change"]


def _event(name: str, index: int, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (index, name.encode("ascii"), data)


def encode_change(change: Change, epoch: str) -> bytes:
    """One SSE event for C{change}: its kind, index and the registration."""
    registration = change.registration
    data = (
        registration.discover_body[:-1]
        + (
            f',"processID":{registration.process_id},'
            f'"registeredAt":"{rfc3339(registration.registered_at)}",'
            f'"index":{change.index},"epoch":"{epoch}"}}'
        ).encode()
    )
    return _event(change.kind.value, change.index, data)


@implementer(IPushProducer)
class _Stream:
    """One open watch: writes events, or queues them while its client is slow."""

    def __init__(self, hub: WatchHub, request: Any) -> None:
        self.hub = hub
        self.request = request
        self.paused = False
        self.closed = False
        self.queue: deque[bytes] = deque()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.paused:
            self.request.write(data)
            return
        self.queue.append(data)
        if len(self.queue) > self.hub.queue_limit:
            self.hub.log.warn(
                "Disconnecting a watcher that fell {count} events behind",
                count=len(self.queue),
            )
            self.close()
            self.request.transport.abortConnection()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.queue and not self.paused and not self.closed:
            self.request.write(self.queue.popleft())

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.clear()
            self.hub.discard(self)

    def finish(self) -> None:
        """End the stream cleanly (the daemon is stopping)."""
        if not self.closed:
            self.close()
            self.request.unregisterProducer()
            self.request.finish()


class WatchHub:
    """
    The open watch streams of a registry.

    @param keepalive: seconds between keep-alive comments on open streams.
    @param queue_limit: events a slow watcher may fall behind before it is
        disconnected.
    """

    log = Logger()

    def __init__(
        self,
        changelog: ChangeLog,
        clock: IReactorTime,
        keepalive: float = 15.0,
        queue_limit: int = 1024,
    ) -> None:
        self.changelog = changelog
        self.clock = clock
        self.keepalive = keepalive
        self.queue_limit = queue_limit
        self.streams: set[_Stream] = set()
        self._pinger: LoopingCall | None = None
        # After the change log (subscribed when it was made): a stream that
        # reconnects at once finds the change in its buffer.
        changelog.registry.subscribe(self._changed)

    def open(self, request: Any, last_index: int | None, epoch: str | None) -> object:
        """Start a stream on C{request}, replaying from C{last_index} when given."""
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        log = self.changelog
        request.setHeader(b"x-hsu-epoch", log.epoch.encode("ascii"))
        stream = _Stream(self, request)
        self.streams.add(stream)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        hello = json.dumps({"index": log.index, "epoch": log.epoch}).encode("ascii")
        out = [b"retry: 1000\n\n"]
        if last_index is None:
            out.append(_event("hello", log.index, hello))
        else:
            missed = log.since(last_index) if epoch in (None, log.epoch) else None
            if missed is None:
                out.append(_event("resync", log.index, hello))
            else:
                out.append(_event("hello", last_index, hello))
                out.extend(encode_change(change, log.epoch) for change in missed)
        request.write(b"".join(out))
        self._ping_while_open()
        return NOT_DONE_YET

    def discard(self, stream: _Stream) -> None:
        self.streams.discard(stream)
        if not self.streams and self._pinger is not None:
            if self._pinger.running:
                self._pinger.stop()
            self._pinger = None

    def _ping_while_open(self) -> None:
        if self._pinger is None and self.streams:
            self._pinger = LoopingCall(self._ping)
            self._pinger.clock = self.clock
            self._pinger.start(self.keepalive, now=False)

    def _ping(self) -> None:
        for stream in list(self.streams):
            if not stream.paused:
                stream.send(b": keep-alive\n\n")

    def _changed(self, change: Change) -> None:
        if self.streams:
            data = encode_change(change, self.changelog.epoch)
            for stream in list(self.streams):
                stream.send(data)

    def close(self) -> None:
        """End every stream (the daemon is stopping)."""
        for stream in list(self.streams):
            stream.finish()

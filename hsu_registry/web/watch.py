# -*- test-case-name: tests.test_watch_api,tests.test_memory_bounds -*-
"""
The watch stream: C{GET /api/v1/watch} as Server-Sent Events, one event per
change, with the change index as the event id.

 - A reconnecting client sends C{Last-Event-ID} (and the epoch it saw, as
   C{X-HSU-Epoch} or C{?epoch=}); it is replayed what it missed from the
   change log, or sent an explicit C{resync} event when those changes are no
   longer there (or the daemon restarted).
 - A stream is a cursor over the change log, not a queue: it writes the
   log's events (each encoded once, the same C{bytes} for every stream) as
   its client reads.  Each stream is a push producer registered with its
   request: it writes until its transport says its buffer is full (64 KiB),
   and goes on when the transport has sent it, so a client that does not
   read holds about that much of the daemon's memory, whatever it is sent
   or replayed.  A large event is written in slices for the same reason:
   Twisted joins what is buffered into one C{bytes} per connection before
   sending, which would copy a whole event per watcher.
 - A watcher that falls C{queue_events} events or C{queue_bytes} bytes
   behind the changes that came after it connected is disconnected (it can
   resume with C{Last-Event-ID}); so is one whose next change the log no
   longer holds.
 - A change is written to at most L{BATCH_STREAMS} streams (and
   L{BATCH_BYTES}) per reactor turn, the first batch at once; the others
   follow turn after turn, each stream writing every change it has not
   written yet, so one change or a burst of changes costs each stream one
   write, and the reactor serves requests between batches however many
   watchers there are.
 - Streams are bounded in number, in all and per peer (503 and 429, see
   L{hsu_registry.watch.WatchLimits}).
 - One timer for all streams writes keep-alive comments (in batches too)
   while any is open; idle streams cost nothing else.  Stopping the daemon
   ends every stream.
 - When closed streams had buffered much, the memory is handed back to the
   system soon after (L{Reclaimer}), rather than at the next full collection.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from hsu_registry.registry import Change
from hsu_registry.security.identity import Identity
from hsu_registry.watch import ChangeLog, WatchLimitReached, encode_change
from hsu_registry.web.reclaim import Reclaimer

__all__ = ["Reclaimer", "WatchHub", "encode_change", "peer_of"]

#: The most bytes one write call hands the transport: a larger event is
#: written in slices of this size, smaller ones are written as they are (or
#: a few together).
CHUNK = 8 * 1024
#: How much a stream's transport buffers before it says it is full (Twisted's
#: default is 64 KiB): what a client that does not read holds of the
#: daemon's memory (the kernel's socket buffers aside).
STREAM_BUFFER = 16 * 1024
#: The most bytes a stream writes in one go before it lets other streams
#: have their turn (a transport that never says it is full, for one).
PUMP_BYTES = 256 * 1024
#: Streams written to, and bytes written, per reactor turn.
BATCH_STREAMS = 256
BATCH_BYTES = 4 * 1024 * 1024

_KEEPALIVE = b": keep-alive\n\n"

#: About what a paused stream's transport holds: its buffer is full and one
#: more write may be there.
PAUSED_BUFFER = STREAM_BUFFER + CHUNK
#: About what a closed stream's connection lets go besides (its channel,
#: request and transport objects, and what their buffers grew to).
CLOSED_STREAM = 16 * 1024

# A stream's states: caught up and writable, waiting for its turn, being
# written to, paused by its transport, gone.
_IDLE, _READY, _WRITING, _PAUSED, _CLOSED = range(5)


def _event(name: str, index: int, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (index, name.encode("ascii"), data)


def peer_of(identity: Identity, request: Any) -> str:
    """
    Whose share of the watch limits a request takes: its connection's
    principal (C{uid:1000}, C{x509:NAME}), or, for a peer the kernel cannot
    name (remote TCP), C{anonymous@HOST}, so that remote clients do not all
    share one count.
    """
    if not identity.anonymous:
        return identity.principal
    try:
        host = getattr(request.getClientAddress(), "host", None)
    except Exception:
        host = None
    return f"anonymous@{host}" if host else "anonymous"


@implementer(IPushProducer)
class _Stream:
    """
    One open watch: a cursor over the change log, written as its transport
    takes it.

    @ivar cursor: the index of the last change written whole.
    @ivar offset: how much of the next change's event is written (a large
        event goes out in slices).
    @ivar base: the index when the stream opened: the changes before it (a
        replay) do not count against the stream's queue bounds.
    """

    def __init__(self, hub: WatchHub, request: Any, peer: str, cursor: int) -> None:
        self.hub = hub
        self.request: Any = request
        self.peer = peer
        self.cursor = cursor
        self.base = hub.changelog.index
        self.offset = 0
        # What the reclaiming pass watches for once the stream is closed.
        self.transport = getattr(request, "transport", None)
        self.paused = False
        self.state = _WRITING  # settled by the hub once opened
        self.pinged = hub.ping_round
        # Which of its entries in the hub's heap of paused streams is live.
        self.mark = 0

    # -- IPushProducer: called by the transport ---------------------------

    def pauseProducing(self) -> None:
        self.paused = True
        if self.state == _IDLE:
            self.hub.paused(self)

    def resumeProducing(self) -> None:
        self.paused = False
        if self.state == _PAUSED:
            self.hub.ready(self)

    def stopProducing(self) -> None:
        self.close()

    # -- writing ---------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Whether some change is not written yet."""
        return self.offset > 0 or self.cursor < self.hub.changelog.index

    def pump(self, budget: int) -> int:
        """
        Write what is not written yet, until the transport is full, C{budget}
        bytes are written or nothing is left; the bytes written.
        """
        log = self.hub.changelog
        written = 0
        while not self.paused and self.state != _CLOSED and written < budget:
            head = log.index
            if self.cursor >= head:
                if self.pinged != self.hub.ping_round:
                    self.pinged = self.hub.ping_round
                    self.request.write(_KEEPALIVE)
                    written += len(_KEEPALIVE)
                break
            entry = log.entry(self.cursor + 1)
            if entry is None:
                self.hub.drop(self, "its next change is no longer in the change log")
                break
            event = entry.event()
            if self.offset == 0 and len(event) <= CHUNK:
                # Small events as they are, a few together (the join copies
                # at most CHUNK bytes, once).
                parts = [event]
                size = len(event)
                cursor = self.cursor + 1
                while cursor < head:
                    following = log.entry(cursor + 1)
                    if following is None:
                        break
                    more = following.event()
                    if size + len(more) > CHUNK:
                        break
                    parts.append(more)
                    size += len(more)
                    cursor += 1
                self.cursor = cursor
                data = parts[0] if len(parts) == 1 else b"".join(parts)
            else:
                data = event[self.offset : self.offset + CHUNK]
                self.offset += len(data)
                if self.offset >= len(event):
                    self.cursor += 1
                    self.offset = 0
            self.pinged = self.hub.ping_round
            written += len(data)
            self.request.write(data)  # may pause this stream
        return written

    def close(self) -> None:
        if self.state != _CLOSED:
            self.state = _CLOSED
            self.hub.discard(self)
            # No cycle through the request's reference to its producer.
            self.request = self.transport = None

    def finish(self) -> None:
        """End the stream cleanly (the daemon is stopping)."""
        request = self.request
        if self.state != _CLOSED and request is not None:
            self.close()
            request.unregisterProducer()
            request.finish()


class WatchHub:
    """
    The open watch streams of a registry.

    @param keepalive: seconds between keep-alive comments on open streams.
    @param queue_limit: events a slow watcher may fall behind before it is
        disconnected (default: the change log's C{limits.queue_events}).
    @param queue_bytes: the same bound in bytes (default: C{limits.queue_bytes}).
    """

    log = Logger()

    def __init__(
        self,
        changelog: ChangeLog,
        clock: IReactorTime,
        keepalive: float = 15.0,
        queue_limit: int | None = None,
        queue_bytes: int | None = None,
    ) -> None:
        limits = changelog.limits
        self.changelog = changelog
        self.clock = clock
        self.keepalive = keepalive
        self.queue_limit = queue_limit if queue_limit is not None else limits.queue_events
        self.queue_bytes = queue_bytes if queue_bytes is not None else limits.queue_bytes
        self.max_watchers = limits.max_watchers
        self.max_watchers_per_peer = limits.max_watchers_per_peer
        self.streams: set[_Stream] = set()
        self._by_peer: dict[str, int] = {}
        # Streams caught up (written to at the next change), streams waiting
        # for their turn, and paused streams by how far behind they started
        # to lag (index, mark, stream): the first ones fall behind first.
        self._idle: set[_Stream] = set()
        self._ready: deque[_Stream] = deque()
        self._lagging: list[tuple[int, int, _Stream]] = []
        self._marks = 0
        self._pass: IDelayedCall | None = None
        self.ping_round = 0
        self._pinger: LoopingCall | None = None
        self.reclaimer = Reclaimer(clock, open_streams=lambda: len(self.streams))
        # After the change log (subscribed when it was made): the change is
        # in its buffer when the streams are told of it.
        changelog.registry.subscribe(self._changed)

    def count(self, peer: str) -> int:
        """How many streams C{peer} has open."""
        return self._by_peer.get(peer, 0)

    def open(
        self, request: Any, last_index: int | None, epoch: str | None, peer: str = "anonymous"
    ) -> object:
        """
        Start a stream on C{request} for C{peer}, replaying from
        C{last_index} when given.

        @raise WatchLimitReached: past C{max_watchers} (503) or
            C{max_watchers_per_peer} for C{peer} (429); nothing is written.
        """
        if len(self.streams) >= self.max_watchers:
            raise WatchLimitReached(
                f"the registry serves its maximum of {self.max_watchers} watch streams",
                {"limit": "max-watchers", "max": self.max_watchers},
                status=503,
            )
        if self.count(peer) >= self.max_watchers_per_peer:
            raise WatchLimitReached(
                f"{peer} has its maximum of {self.max_watchers_per_peer} watch streams open",
                {"limit": "max-watchers-per-peer", "max": self.max_watchers_per_peer, "peer": peer},
                status=429,
            )
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        log = self.changelog
        request.setHeader(b"x-hsu-epoch", log.epoch.encode("ascii"))
        hello = json.dumps({"index": log.index, "epoch": log.epoch}).encode("ascii")
        if last_index is None:
            cursor, first = log.index, _event("hello", log.index, hello)
        else:
            reachable = (
                epoch in (None, log.epoch)
                and last_index <= log.index
                and log.position(last_index) is not None
            )
            if reachable:
                cursor, first = last_index, _event("hello", last_index, hello)
            else:
                cursor, first = log.index, _event("resync", log.index, hello)
        transport = getattr(request, "transport", None)
        if isinstance(transport, FileDescriptor):
            # The connection is the stream's from now on: pause it sooner.
            transport.bufferSize = STREAM_BUFFER
        stream = _Stream(self, request, peer, cursor)
        self.streams.add(stream)
        self._by_peer[peer] = self.count(peer) + 1
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        request.write(b"retry: 1000\n\n" + first)
        if stream.state != _CLOSED:
            # A replay starts now, as much as the transport takes; the rest
            # as the client reads.
            stream.pump(PUMP_BYTES)
            self._settle(stream)
        self._ping_while_open()
        return NOT_DONE_YET

    # -- stream states ---------------------------------------------------

    def _settle(self, stream: _Stream) -> None:
        """Put a stream that was just written to where its state says."""
        if stream.state == _CLOSED:
            return
        if stream.paused:
            self.paused(stream)
        elif stream.behind or stream.pinged != self.ping_round:
            self.ready(stream)
        else:
            stream.state = _IDLE
            self._idle.add(stream)

    def ready(self, stream: _Stream) -> None:
        """Give C{stream} a turn (soon: at most one batch per reactor turn)."""
        if stream.state in (_READY, _CLOSED):
            return
        self._idle.discard(stream)
        stream.state = _READY
        self._ready.append(stream)
        self._schedule()

    def paused(self, stream: _Stream) -> None:
        """C{stream}'s transport is full: note how far behind it starts to lag."""
        self._idle.discard(stream)
        stream.state = _PAUSED
        log = self.changelog
        since = max(stream.cursor, stream.base)
        if since < log.first - 1:
            self.drop(stream, "its next change is no longer in the change log")
            return
        self._marks += 1
        stream.mark = self._marks
        heapq.heappush(self._lagging, (since, self._marks, stream))  # marks are unique

    def drop(self, stream: _Stream, why: str) -> None:
        """Disconnect a watcher that fell behind; it can resume with Last-Event-ID."""
        log = self.changelog
        self.log.warn(
            "Disconnecting a watcher ({peer}) that fell behind: {why}",
            peer=stream.peer,
            why=why,
            behind_events=log.index - stream.cursor,
        )
        request = stream.request
        stream.close()
        if request is not None and request.transport is not None:
            request.transport.abortConnection()

    def _check_lagging(self) -> None:
        """Disconnect the paused streams now too far behind (the first ones in the heap)."""
        log = self.changelog
        head = log.index
        while self._lagging:
            since, mark, stream = self._lagging[0]
            if stream.state != _PAUSED or stream.mark != mark:
                heapq.heappop(self._lagging)  # resumed (or gone) since
                continue
            position = log.position(since)
            events = head - since
            if position is None or events > self.queue_limit:
                why = f"{events} events behind"
            elif log.logged_bytes - position > self.queue_bytes:
                why = f"{log.logged_bytes - position} bytes behind"
            else:
                break
            heapq.heappop(self._lagging)
            self.drop(stream, why)

    # -- writing in batches ----------------------------------------------

    def _schedule(self) -> None:
        if self._pass is None:
            self._pass = self.clock.callLater(0, self._run)

    def _run(self) -> None:
        self._pass = None
        self._batch()

    def _batch(self) -> None:
        """
        Let up to L{BATCH_STREAMS} ready streams write (up to L{BATCH_BYTES}
        in all); a later turn takes the next ones.  After a batch the next
        one is always a turn later, even when none is waiting yet, so the
        changes of one turn (an expiry of a hundred modules) are written in
        one batch, not one batch each.
        """
        streams = written = 0
        ready = self._ready
        # Those waiting now: a stream that goes on writing waits for the next turn.
        turn = min(len(ready), BATCH_STREAMS)
        while turn and written < BATCH_BYTES:
            turn -= 1
            stream = ready.popleft()
            if stream.state != _READY:
                continue
            stream.state = _WRITING
            written += stream.pump(PUMP_BYTES)
            streams += 1
            self._settle(stream)
        if streams and self._pass is None:
            self._pass = self.clock.callLater(0, self._run)

    def _changed(self, change: Change) -> None:
        if not self.streams:
            return
        if self._lagging:
            self._check_lagging()
        if self._idle:
            for stream in self._idle:
                stream.state = _READY
            self._ready.extend(self._idle)
            self._idle.clear()
        if self._pass is None and self._ready:
            # The first batch at once (the publish's answer waits for it no
            # more than it would for a batch in the next turn), then turn
            # after turn.
            self._batch()
            if self._pass is None:
                self._pass = self.clock.callLater(0, self._run)

    # -- keep-alive ------------------------------------------------------

    def _ping_while_open(self) -> None:
        if self._pinger is None and self.streams:
            self._pinger = LoopingCall(self._ping)
            self._pinger.clock = self.clock
            self._pinger.start(self.keepalive, now=False)

    def _ping(self) -> None:
        """A keep-alive comment for every caught-up stream (paused ones are not idle)."""
        self.ping_round += 1
        for stream in list(self._idle):
            self.ready(stream)

    # -- closing ---------------------------------------------------------

    def discard(self, stream: _Stream) -> None:
        if stream not in self.streams:
            return
        self.streams.discard(stream)
        self._idle.discard(stream)
        left = self._by_peer.get(stream.peer, 1) - 1
        if left > 0:
            self._by_peer[stream.peer] = left
        else:
            self._by_peer.pop(stream.peer, None)
        # Its connection's objects, and its transport's full buffer when
        # paused, are let go with it.
        self.reclaimer.released(
            CLOSED_STREAM + (PAUSED_BUFFER if stream.paused else 0), stream.transport
        )
        if not self.streams:
            if self._pinger is not None:
                if self._pinger.running:
                    self._pinger.stop()
                self._pinger = None
            if self._pass is not None and self._pass.active():
                self._pass.cancel()
            self._pass = None
            self._ready.clear()
            self._lagging.clear()

    def close(self) -> None:
        """End every stream (the daemon is stopping)."""
        for stream in list(self.streams):
            stream.finish()
        self.reclaimer.cancel()

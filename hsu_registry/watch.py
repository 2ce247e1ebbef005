# -*- test-case-name: tests.test_watch,tests.test_memory_bounds -*-
"""
What watchers need from the registry: the recent changes, kept in a replay
buffer bounded in bytes and in count so a reconnecting watcher can be
replayed what it missed (or told it must resynchronise), and Deferreds for
blocking queries waiting for the next change.

Each change is encoded once, as its Server-Sent Event, the first time a
stream or a replay needs it, and that one C{bytes} object is what every
stream writes: nothing is copied per watcher.  Once encoded, the buffer keeps
the event and lets go of the registration it came from (a registration that
was replaced since is then freed).

Memory is counted in bytes, not items: one module published again and again
with a large body costs at most the buffer's byte budget, not its count
times the body.  Watch streams and held queries are bounded in number, in
total and per peer (L{WatchLimits}).

Idle watchers cost nothing but their entry here: no timer runs while nothing
changes, except the one a blocking query sets for the end of its wait.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

from attrs import evolve, field, frozen
from attrs.validators import ge
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from hsu_registry.errors import TooManyRequests
from hsu_registry.interfaces import IRegistry
from hsu_registry.registry import Change, ChangeKind
from hsu_registry.web.catalog import rfc3339

__all__ = [
    "DEFAULT_MAX_WAIT",
    "DEFAULT_WATCH_LIMITS",
    "ChangeLog",
    "LoggedChange",
    "WatchLimitReached",
    "WatchLimits",
    "encode_change",
]

# The longest a blocking query may wait, whatever it asks for.
DEFAULT_MAX_WAIT = 300.0

# Blocking queries answered per reactor turn after a change: between batches
# the reactor writes what is ready (the publish's answer, the other answers).
WAKE_BATCH = 64
WAKE_DELAY = 0.002

#: What an event adds to its registration's discover answer (id, event name,
#: process ID, registration time, index, epoch): counted with it.
EVENT_OVERHEAD = 192


@frozen
class WatchLimits:
    """
    The bounds on what watching may cost the daemon.

    @ivar replay_bytes: the most bytes of encoded changes the replay buffer
        keeps (the newest change is always kept, whatever its size).
    @ivar replay_changes: the most changes it keeps.
    @ivar queue_bytes: how many bytes of changes a watch stream may fall
        behind the newest one (the events that came after it connected: a
        replay is read from the buffer as the client reads) before it is
        disconnected; it can resume with C{Last-Event-ID}.
    @ivar queue_events: the same bound in events.
    @ivar max_watchers: the most watch streams open at once (more: 503).
    @ivar max_watchers_per_peer: the most watch streams of one peer (more: 429).
    @ivar max_held: the most blocking queries held at once (more: 503).
    @ivar max_held_per_peer: the most blocking queries one peer may have held (more: 429).
    """

    replay_bytes: int = field(default=16 * 1024 * 1024, validator=ge(1))
    replay_changes: int = field(default=4096, validator=ge(1))
    queue_bytes: int = field(default=4 * 1024 * 1024, validator=ge(1))
    queue_events: int = field(default=1024, validator=ge(1))
    max_watchers: int = field(default=10_000, validator=ge(0))
    max_watchers_per_peer: int = field(default=2_500, validator=ge(0))
    max_held: int = field(default=10_000, validator=ge(0))
    max_held_per_peer: int = field(default=2_500, validator=ge(0))


DEFAULT_WATCH_LIMITS = WatchLimits()


class WatchLimitReached(TooManyRequests):
    """
    A watch stream or blocking query past one of the L{WatchLimits}: a 429
    when its peer has its share, a 503 when the daemon has its total; the
    message and the context's C{limit} name which, and C{Retry-After} says
    when to try again.
    """

    def __init__(
        self, message: str, context: Mapping[str, Any], status: int, retry_after: float = 5.0
    ) -> None:
        super().__init__(message, context, retry_after)
        self.status = status


def _event(name: str, index: int, data: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (index, name.encode("ascii"), data)


def encode_change(change: Change, epoch: str) -> bytes:
    """
    One SSE event for C{change}: its kind, index and the registration.  The
    discover answer is copied once, into the event (not sliced, then joined).
    """
    registration = change.registration
    body = registration.discover_body
    tail = (
        f',"processID":{registration.process_id},'
        f'"registeredAt":"{rfc3339(registration.registered_at)}",'
        f'"index":{change.index},"epoch":"{epoch}"}}\n\n'
    ).encode()
    head = b"id: %d\nevent: %s\ndata: " % (change.index, change.kind.value.encode("ascii"))
    return b"".join((head, memoryview(body)[:-1], tail))


class LoggedChange:
    """
    One change in the replay buffer: its index, kind and module, its size,
    and its SSE event, encoded on first use (L{event}).

    @ivar end: the bytes logged up to and including this change, since the
        log began: how far behind a stream is, in bytes, is the difference of
        two of these.
    """

    __slots__ = ("_change", "_epoch", "_event", "end", "index", "kind", "module_id", "size")

    def __init__(self, change: Change, epoch: str, end: int, size: int) -> None:
        self.index = change.index
        self.kind: ChangeKind = change.kind
        self.module_id = change.module_id
        self.size = size
        self.end = end
        self._change: Change | None = change
        self._epoch = epoch
        self._event: bytes | None = None

    def event(self) -> bytes:
        """The SSE event, encoded once and shared by every stream that writes it."""
        event = self._event
        if event is None:
            assert self._change is not None
            event = self._event = encode_change(self._change, self._epoch)
            self._change = None  # the event is all we need from now on
        return event


class _Waiter:
    def __init__(self, index: int, done: Deferred[int], timer: IDelayedCall) -> None:
        self.index = index
        self.done = done
        self.timer = timer


class ChangeLog:
    """
    The last changes of C{registry} (at most C{limits.replay_changes}, and
    at most C{limits.replay_bytes} bytes of them), and the blocking queries
    waiting for the change index to pass a value.

    @param size: the most changes kept (default: C{limits.replay_changes}).
    @param max_bytes: the most bytes kept (default: C{limits.replay_bytes}).
    @param max_wait: the longest wait granted to a blocking query.
    @param jitter: a random source; a wait is stretched by up to 1/16 so that
        many clients that started together do not all come back together.
    @param limits: the bounds on the buffer, on watch streams and on held
        queries (the streams' are applied by L{hsu_registry.web.watch.WatchHub}).
    """

    def __init__(
        self,
        registry: IRegistry,
        clock: IReactorTime,
        size: int | None = None,
        max_wait: float = DEFAULT_MAX_WAIT,
        jitter: random.Random | None = None,
        limits: WatchLimits = DEFAULT_WATCH_LIMITS,
        max_bytes: int | None = None,
    ) -> None:
        if size is not None:
            limits = evolve(limits, replay_changes=size)
        if max_bytes is not None:
            limits = evolve(limits, replay_bytes=max_bytes)
        self.registry = registry
        self.clock = clock
        self.limits = limits
        self.max_wait = max_wait
        self._jitter = jitter or random.Random()
        # By index: the changes are indexed consecutively (each one takes the
        # next value), so the oldest kept is _first and the newest the index.
        self._changes: dict[int, LoggedChange] = {}
        self._first = registry.index + 1
        self._bytes = 0
        # Bytes logged since the log began, through the newest change and
        # through the last one let go.
        self._logged = 0
        self._dropped = 0
        # By their Deferreds, in the order they came: a query waits only at
        # the current index, which never goes down, so the ready ones (their
        # index passed) are always the first ones.
        self._waiters: dict[Deferred[int], _Waiter] = {}
        self._wake: IDelayedCall | None = None
        # Held blocking queries, in all and per peer (see admit).
        self._held = 0
        self._held_by_peer: dict[str, int] = {}
        self.closed = False
        registry.subscribe(self._changed)

    @property
    def size(self) -> int:
        """The most changes kept."""
        return self.limits.replay_changes

    @property
    def index(self) -> int:
        return self.registry.index

    @property
    def epoch(self) -> str:
        return self.registry.epoch

    @property
    def waiting(self) -> int:
        """How many blocking queries are waiting."""
        return len(self._waiters)

    @property
    def held(self) -> int:
        """How many blocking queries are held (admitted and not answered yet)."""
        return self._held

    @property
    def kept_bytes(self) -> int:
        """The bytes of the changes in the buffer."""
        return self._bytes

    @property
    def kept(self) -> int:
        """How many changes the buffer holds."""
        return len(self._changes)

    @property
    def first(self) -> int:
        """The index of the oldest change kept (the next index when none is)."""
        return self._first

    @property
    def logged_bytes(self) -> int:
        """The bytes logged since the log began, through the newest change."""
        return self._logged

    def entry(self, index: int) -> LoggedChange | None:
        """The change of C{index}, when the buffer still holds it."""
        return self._changes.get(index)

    def position(self, index: int) -> int | None:
        """
        The bytes logged through change C{index} (see L{LoggedChange.end}),
        or L{None} when it is older than the buffer's reach: a stream that
        has written change C{index} is C{logged_bytes - position(index)}
        bytes behind.
        """
        if index >= self.registry.index:
            return self._logged
        if index == self._first - 1:
            return self._dropped
        kept = self._changes.get(index)
        return None if kept is None else kept.end

    def since(self, index: int) -> list[LoggedChange] | None:
        """
        The changes after C{index}, oldest first; L{None} when some of them
        are no longer in the buffer (or C{index} is from the future, as after
        a restart): the caller must resynchronise.
        """
        current = self.registry.index
        if index == current:
            return []
        if index > current or index < self._first - 1:
            return None
        return [self._changes[i] for i in range(index + 1, current + 1)]

    def encoded(self, change: Change) -> bytes:
        """The SSE event of C{change}: the buffer's, when it still holds it."""
        kept = self._changes.get(change.index)
        return kept.event() if kept is not None else encode_change(change, self.epoch)

    def _changed(self, change: Change) -> None:
        size = len(change.registration.discover_body) + EVENT_OVERHEAD
        self._logged += size
        self._changes[change.index] = LoggedChange(change, self.epoch, self._logged, size)
        self._bytes += size
        limits = self.limits
        changes = self._changes
        # Let go of the oldest while over either bound, always keeping the
        # newest (streams read it from here).
        while len(changes) > 1 and (
            len(changes) > limits.replay_changes or self._bytes > limits.replay_bytes
        ):
            dropped = changes.pop(self._first)
            self._first += 1
            self._bytes -= dropped.size
            self._dropped = dropped.end
        # Blocking queries are answered in a later reactor turn, each building
        # a whole answer, so they delay neither the publish that made the
        # change nor the watch streams (registry observers, written at once).
        if self._waiters and self._wake is None:
            # A moment later, not just the next turn: a zero-delay call would
            # run before the reactor writes the streams' events out.
            self._wake = self.clock.callLater(WAKE_DELAY, self._wake_waiters)

    # -- held queries --------------------------------------------------------

    def admit(self, peer: str) -> Callable[[], None]:
        """
        Count one more held blocking query of C{peer}; the function that
        counts it out (call it once, when the query is answered or its
        client leaves).

        @raise WatchLimitReached: when the daemon holds C{max_held} queries
            (503) or C{peer} holds C{max_held_per_peer} (429).
        """
        limits = self.limits
        if self._held >= limits.max_held:
            raise WatchLimitReached(
                f"the registry holds its maximum of {limits.max_held} blocking queries; "
                "retry later or ask without ?index=",
                {"limit": "max-held-queries", "max": limits.max_held},
                status=503,
            )
        mine = self._held_by_peer.get(peer, 0)
        if mine >= limits.max_held_per_peer:
            raise WatchLimitReached(
                f"{peer} holds its maximum of {limits.max_held_per_peer} blocking queries",
                {
                    "limit": "max-held-queries-per-peer",
                    "max": limits.max_held_per_peer,
                    "peer": peer,
                },
                status=429,
            )
        self._held += 1
        self._held_by_peer[peer] = mine + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._held -= 1
            left = self._held_by_peer[peer] - 1
            if left:
                self._held_by_peer[peer] = left
            else:
                del self._held_by_peer[peer]

        return release

    def wait(self, index: int, wait: float) -> Deferred[int]:
        """
        Fire with the change index once it passes C{index}, or when C{wait}
        seconds (bounded by C{max_wait}, stretched by jitter) have passed.
        Cancelling the Deferred (a client that went away) forgets the wait.
        """
        current = self.registry.index
        if current != index:
            # Passed already, or an index from before a restart (the index
            # starts again with each epoch): answer now.
            return succeed(current)
        seconds = min(max(wait, 0.0), self.max_wait)
        seconds += seconds * self._jitter.random() / 16

        waiter: _Waiter

        def cancel(d: Deferred[int]) -> None:
            self._forget(waiter)

        done: Deferred[int] = Deferred(cancel)
        timer = self.clock.callLater(seconds, self._expire, done)
        waiter = _Waiter(index, done, timer)
        self._waiters[done] = waiter
        return done

    def _expire(self, done: Deferred[int]) -> None:
        self._waiters.pop(done, None)
        if not done.called:
            done.callback(self.registry.index)

    def _forget(self, waiter: _Waiter) -> None:
        self._waiters.pop(waiter.done, None)
        if waiter.timer.active():
            waiter.timer.cancel()

    def _wake_waiters(self) -> None:
        """Answer up to C{WAKE_BATCH} ready queries, then let the reactor write."""
        self._wake = None
        index = self.registry.index
        ready: list[_Waiter] = []
        for waiter in self._waiters.values():
            if waiter.index >= index or len(ready) == WAKE_BATCH:
                break
            ready.append(waiter)
        for waiter in ready:
            del self._waiters[waiter.done]
        for waiter in ready:
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.done.callback(index)
        first = next(iter(self._waiters.values()), None)
        if first is not None and first.index < index:
            self._wake = self.clock.callLater(0, self._wake_waiters)

    def close(self) -> None:
        """Answer every waiting query now (the daemon is stopping)."""
        self.closed = True
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        waiters, self._waiters = list(self._waiters.values()), {}
        for waiter in waiters:
            if waiter.timer.active():
                waiter.timer.cancel()
            if not waiter.done.called:
                waiter.done.callback(self.registry.index)

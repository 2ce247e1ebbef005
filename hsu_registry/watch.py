# -*- test-case-name: tests.test_watch -*-
"""
What watchers need from the registry: the recent changes, kept in a bounded
buffer so a reconnecting watcher can be replayed what it missed (or told it
must resynchronise), and Deferreds for blocking queries waiting for the next
change.

Idle watchers cost nothing but their entry here: no timer runs while nothing
changes, except the one a blocking query sets for the end of its wait.
"""

from __future__ import annotations

import random
from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from hsu_registry.interfaces import IRegistry
from hsu_registry.registry import Change

__all__ = ["DEFAULT_MAX_WAIT", "ChangeLog"]

# The longest a blocking query may wait, whatever it asks for.
DEFAULT_MAX_WAIT = 300.0

# Blocking queries answered per reactor turn after a change: between batches
# the reactor writes what is ready (the publish's answer, the other answers).
WAKE_BATCH = 64
WAKE_DELAY = 0.002


class _Waiter:
    def __init__(self, index: int, done: Deferred[int], timer: IDelayedCall) -> None:
        self.index = index
        self.done = done
        self.timer = timer


class ChangeLog:
    """
    The last C{size} changes of C{registry}, and the blocking queries waiting
    for the change index to pass a value.

    @param max_wait: the longest wait granted to a blocking query.
    @param jitter: a random source; a wait is stretched by up to 1/16 so that
        many clients that started together do not all come back together.
    """

    def __init__(
        self,
        registry: IRegistry,
        clock: IReactorTime,
        size: int = 4096,
        max_wait: float = DEFAULT_MAX_WAIT,
        jitter: random.Random | None = None,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.size = size
        self.max_wait = max_wait
        self._jitter = jitter or random.Random()
        self._changes: deque[Change] = deque(maxlen=size)
        # By their Deferreds, in the order they came: a query waits only at
        # the current index, which never goes down, so the ready ones (their
        # index passed) are always the first ones.
        self._waiters: dict[Deferred[int], _Waiter] = {}
        self._wake: IDelayedCall | None = None
        self.closed = False
        registry.subscribe(self._changed)

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

    def since(self, index: int) -> list[Change] | None:
        """
        The changes after C{index}, oldest first; L{None} when some of them
        are no longer in the buffer (or C{index} is from the future, as after
        a restart): the caller must resynchronise.
        """
        current = self.registry.index
        if index == current:
            return []
        if index > current:
            return None
        oldest = self._changes[0].index if self._changes else current + 1
        if index < oldest - 1:
            return None
        return [change for change in self._changes if change.index > index]

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

    def _changed(self, change: Change) -> None:
        self._changes.append(change)
        # Blocking queries are answered in a later reactor turn, each building
        # a whole answer, so they delay neither the publish that made the
        # change nor the watch streams (registry observers, written at once).
        if self._waiters and self._wake is None:
            # A moment later, not just the next turn: a zero-delay call would
            # run before the reactor writes the streams' events out.
            self._wake = self.clock.callLater(WAKE_DELAY, self._wake_waiters)

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

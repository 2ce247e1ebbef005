# -*- test-case-name: tests.test_deadlines -*-
"""
Deadlines of a connection, so that a client trickling bytes cannot hold one
for long.

Twisted's C{Site(timeout=...)} is an idle timer that every received byte
resets: a client sending one byte every 20 s keeps a connection (and its
descriptor) forever.  The registry's channel replaces it with deadlines
that bytes do not move:

 - a new connection, or a kept-alive one between requests, is closed
   when no request has begun within its deadline (L{Deadlines.header_timeout}
   for a new connection, L{Deadlines.idle_timeout} between requests);
 - once the first byte of a request has arrived, its request line and
   headers must all arrive within L{Deadlines.header_timeout} (JSON 408);
 - a body must arrive at L{Deadlines.min_body_rate} bytes a second at
   least, measured over each period of L{Deadlines.body_grace} from the end
   of the headers (JSON 408);
 - while a request is processed (blocking queries, watch streams) there is
   no deadline at all, as with Twisted's own timer;
 - a connection being closed that does not take its last answer within
   the channel's C{abortTimeout} is aborted.

Each connection has one L{DeadlineTimer}: moving its deadline later costs
an attribute write, and a request that arrives in one read never touches the
reactor's timer heap.  Resetting a Twisted timer to an earlier time searches
the whole heap (linear in the number of timers), so the timer is never reset
sooner: it is cancelled and scheduled anew, which only requests arriving in
pieces pay.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = [
    "DEFAULT_BODY_GRACE",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MIN_BODY_RATE",
    "DeadlineTimer",
    "Deadlines",
]

#: Seconds for a request line and headers, from the request's first byte.
DEFAULT_HEADER_TIMEOUT = 10.0
#: Seconds a kept-alive connection may wait for its next request.
DEFAULT_IDLE_TIMEOUT = 60.0
#: Bytes a second a request body must arrive at, at least.
DEFAULT_MIN_BODY_RATE = 1024
#: Seconds over which the body's rate is measured (the first are free).
DEFAULT_BODY_GRACE = 10.0

# A timer that fires this close to its deadline counts as on time (float
# rounding must not make it re-arm itself for a nanosecond).
_EARLY = 0.001


@frozen
class Deadlines:
    """
    How long a client may take over each part of a connection.  Seconds,
    and bytes a second for the body.
    """

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    min_body_rate: int = DEFAULT_MIN_BODY_RATE
    body_grace: float = DEFAULT_BODY_GRACE

    @property
    def body_bytes_per_period(self) -> float:
        """The bytes of a body that must arrive in every L{body_grace} period."""
        return self.min_body_rate * self.body_grace


class DeadlineTimer:
    """
    One connection's timer: calls C{expired} once C{deadline} has passed.

    Setting L{deadline} is free: the timer already scheduled fires when it
    was due, sees the deadline moved later and schedules itself again.
    L{ensure} must follow a move to an I{earlier} deadline.  A deadline of
    L{None} means none: the timer fires and does nothing.
    """

    __slots__ = ("_call", "_call_later", "_expired", "_seconds", "deadline")

    def __init__(self, clock: IReactorTime, expired: Callable[[], object]) -> None:
        self._seconds = clock.seconds
        self._call_later = clock.callLater
        self._expired = expired
        self._call: IDelayedCall | None = None
        self.deadline: float | None = None

    def ensure(self) -> None:
        """Make sure the timer fires no later than L{deadline}."""
        deadline = self.deadline
        if deadline is None:
            return
        call = self._call
        if call is not None:
            if call.getTime() <= deadline:
                return  # fires in time (and re-arms itself if early)
            call.cancel()  # never reset sooner: that searches the heap
        self._call = self._call_later(max(0.0, deadline - self._seconds()), self._fire)

    def stop(self) -> None:
        """Cancel the timer for good (the connection is gone)."""
        self.deadline = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    @property
    def scheduled(self) -> bool:
        """Whether a call is pending (for tests)."""
        return self._call is not None

    def _fire(self) -> None:
        self._call = None
        deadline = self.deadline
        if deadline is None:
            return
        now = self._seconds()
        if deadline - now > _EARLY:
            self._call = self._call_later(deadline - now, self._fire)
            return
        self._expired()

# -*- test-case-name: tests.test_drain -*-
"""
A graceful stop: once the listeners are down, every request already received
is answered (for at most the drain timeout), idle keep-alive connections are
closed at once, and none is taken afterwards; then the rest of the daemon
stops (the store flushes and closes last).  So on SIGTERM a publish is either
answered or was never read, never committed and left unanswered.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "DrainService", "drain"]

#: Seconds the requests under way at a stop may take to be answered.
DEFAULT_DRAIN_TIMEOUT = 10.0

# How often the connections are looked at while draining: a stop is rare,
# and the channels' own request lists say when they are done.
_TICK = 0.01

log = Logger()


def _busy(channel: Any) -> bool:
    """Whether the connection has a request received and not yet answered."""
    return bool(getattr(channel, "requests", None))


def _open(channel: Any) -> bool:
    """
    Whether the connection is still open: an answer is only delivered once
    its transport has written it out and closed (the reactor's shutdown
    drops whatever is still buffered).
    """
    transport = channel.transport
    if transport is None:
        return False
    closed = getattr(transport, "disconnected", None)  # a real socket's transport
    if closed is None:
        closed = getattr(transport, "disconnecting", False)  # an in-memory one
    return not closed


def drain(site: Any, clock: IReactorTime, timeout: float) -> Deferred[int]:
    """
    Close C{site}'s idle connections, let the busy ones finish their requests
    (each is closed once it has answered), and after C{timeout} seconds close
    whatever is left.

    @return: a Deferred firing with the number of connections cut off with a
        request unanswered (0 for a clean drain).
    """
    done: Deferred[int] = Deferred()
    channels = site.channels()
    for channel in channels:
        # Answer what was received, then close: a request whose headers are
        # still arriving is answered "Connection: close" too.
        channel.draining = True
        channel.persistent = False
        if not _busy(channel) and channel.transport is not None:
            channel.transport.loseConnection()
    deadline = clock.seconds() + timeout
    busy = [c for c in channels if _busy(c) and c.transport is not None]
    if busy:
        log.info("Draining {count} connections with requests under way", count=len(busy))

    def look() -> None:
        # Done once every connection has answered and its answer is out.
        left = [c for c in channels if _open(c)]
        if not left:
            done.callback(0)
            return
        if clock.seconds() >= deadline:
            unanswered = [c for c in left if _busy(c)]
            for channel in left:
                channel.transport.abortConnection()
            log.warn(
                "Drain timeout: closed {count} connections whose requests were not "
                "answered within {timeout}s",
                count=len(unanswered),
                timeout=timeout,
            )
            done.callback(len(unanswered))
            return
        clock.callLater(_TICK, look)

    look()
    return done


class DrainService(Service):
    """
    Drains the site when the daemon stops; it sits just before the
    listeners in the service tree, so it stops right after them and before
    the store.
    """

    name = "drain"

    def __init__(self, site: Any, clock: IReactorTime, timeout: float) -> None:
        self.site = site
        self.clock = clock
        self.timeout = timeout

    def stopService(self) -> Deferred[int]:
        super().stopService()
        return drain(self.site, self.clock, self.timeout)

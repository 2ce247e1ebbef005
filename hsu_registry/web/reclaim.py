# -*- test-case-name: tests.test_memory_bounds -*-
"""
Handing memory back to the system soon after large buffers were let go
(closed watch streams and their connections), instead of at the next full
collection: a bounded collection, then C{malloc_trim} on glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["MAX_WITNESSES", "Reclaimer"]

#: The most closed connections a reclaiming pass looks for.
MAX_WITNESSES = 100_000


class Reclaimer:
    """
    Hands memory back to the system soon after large buffers were let go.

    A closed connection's objects (its channel, request and transport, and
    what the transport had buffered) are freed when the last reference goes,
    unless they are held in a reference cycle: then only the collector frees
    them, and those that lived long enough to reach the oldest generation
    wait for a full collection, which may not come for a long time.  And
    glibc keeps freed memory in its heap rather than return it.  So once
    about C{threshold} bytes were let go, a moment later (C{delay}, so that a
    burst of closes costs one pass): the collector runs, but only when some
    of the closed connections are still there (each is watched through a
    weak reference to its transport), and only when the connections it would
    walk, closed and open (C{open_streams}), are at most C{max_collect}: a
    full collection walks every object made since start-up, about 20 ms
    per thousand connections here, and the reactor waits meanwhile; past
    that it is left to Python's own collector, and said so.  Then, on glibc
    and in the next turn, C{malloc_trim(0)} returns the free pages.  Each
    step is logged with its duration.

    Closed watch streams hold no reference cycle of their own: with a
    channel that holds none either, their connections are freed as they
    close and the pass only returns memory to the system.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int = 4 * 1024 * 1024,
        delay: float = 1.0,
        open_streams: Callable[[], int] = lambda: 0,
        max_collect: int = 1000,
    ) -> None:
        self.clock = clock
        self.threshold = threshold
        self.delay = delay
        self.open_streams = open_streams
        self.max_collect = max_collect
        self.pending = 0
        self._call: IDelayedCall | None = None
        self._trim = _malloc_trim()
        # Weak references to what was let go since the last pass (at most
        # MAX_WITNESSES; past that, the pass collects without looking).
        self._witnesses: list[weakref.ref[Any]] = []
        self._unwitnessed = False

    def released(self, size: int, witness: object = None) -> None:
        """
        Note that about C{size} bytes were let go, with C{witness} (the
        closed connection's transport): if it still exists at the pass, it
        waits for the collector.
        """
        self.pending += size
        if witness is not None:
            if len(self._witnesses) < MAX_WITNESSES:
                try:
                    self._witnesses.append(weakref.ref(witness))
                except TypeError:
                    self._unwitnessed = True
            else:
                self._unwitnessed = True
        if self.pending >= self.threshold and self._call is None:
            self._call = self.clock.callLater(self.delay, self.reclaim)

    def reclaim(self) -> None:
        """Collect now if needed, and return the free memory to the system in the next turn."""
        self._call = None
        pending, self.pending = self.pending, 0
        waiting = sum(1 for ref in self._witnesses if ref() is not None)
        cyclic = self._unwitnessed or waiting > 0
        self._witnesses, self._unwitnessed = [], False
        walked = waiting + self.open_streams()
        if cyclic and walked > self.max_collect:
            self.log.info(
                "{waiting} closed connections wait for the collector: left to Python's own, "
                "a pass over {walked} connections would keep the reactor busy too long",
                waiting=waiting,
                walked=walked,
            )
            cyclic = False
        started = time.perf_counter()
        found = gc.collect() if cyclic else None
        collect_ms = (time.perf_counter() - started) * 1000
        if self._trim is None:
            self._reclaimed(pending, waiting, found, collect_ms, None)
            return
        # Not in the same turn: each is one stretch of work of its own.
        self._call = self.clock.callLater(0, self._return, pending, waiting, found, collect_ms)

    def _return(self, pending: int, waiting: int, found: int | None, collect_ms: float) -> None:
        self._call = None
        started = time.perf_counter()
        if self._trim is not None:
            self._trim(0)
        trim_ms = (time.perf_counter() - started) * 1000
        self._reclaimed(pending, waiting, found, collect_ms, trim_ms)

    def _reclaimed(
        self,
        pending: int,
        waiting: int,
        found: int | None,
        collect_ms: float,
        trim_ms: float | None,
    ) -> None:
        if found is not None:
            collected = (
                f"{waiting} connections waited for the collector, "
                f"{found} objects collected in {collect_ms:.1f} ms"
            )
        else:
            collected = "not collected" if waiting else "no collection needed"
        trimmed = "" if trim_ms is None else f", returned to the system in {trim_ms:.1f} ms"
        self.log.info(
            "Reclaimed the memory of closed streams (about {pending} bytes): {collected}{trimmed}",
            pending=pending,
            collected=collected,
            trimmed=trimmed,
            waiting=waiting,
            found=found,
            collect_ms=collect_ms,
            trim_ms=trim_ms,
        )

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's C{malloc_trim}, or L{None} elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    function: Callable[[int], int] = trim
    return function

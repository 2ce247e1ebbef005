# -*- test-case-name: tests.test_watch_api,tests.test_memory_bounds -*-
"""
The catalog's JSON: a registration with its times and state, built by
extending the registration's pre-encoded discover answer rather than encoding
its APIs again; and the catalog's large answers (every module, a service's
providers), built in slices across reactor turns, shared per change index,
and written as the client reads (L{Answers}, L{respond}).
"""

from __future__ import annotations

import datetime
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from hsu_registry.interfaces import IRegistry
from hsu_registry.model import PASSING, Registration, encode_json
from hsu_registry.processes.table import ProcessIdentity
from hsu_registry.web.responses import json_response

__all__ = ["Answers", "Built", "module_entry", "provider_entry", "respond", "rfc3339"]


def rfc3339(seconds: float) -> str:
    """A POSIX time as RFC 3339 UTC with milliseconds: C{2026-11-29T00:58:38.123Z}."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def module_entry(
    registration: Registration,
    last_seen: float,
    now: float,
    stale_after: float,
    bound: ProcessIdentity | None = None,
) -> bytes:
    """
    C{{"moduleID", "apis", "processID", "registeredAt", "lastSeen", "owner",
    "processBound", "state"}} (C{owner}: the principal of the identity that
    created it, C{unknown} when not recorded), C{boundPID} when the registration is bound to
    a process (it is then ready for as long as that process runs) and, when
    the state is not C{ready}, a C{reason}.
    """
    body = registration.discover_body
    tail = (
        f',"processID":{registration.process_id},'
        f'"registeredAt":"{rfc3339(registration.registered_at)}",'
        f'"lastSeen":"{rfc3339(last_seen)}",'
        f'"owner":{json.dumps(registration.owner or "unknown")},'
    )
    if bound is not None:
        tail += f'"processBound":true,"boundPID":{bound.pid},'
    else:
        tail += '"processBound":false,'
    if bound is None and now - last_seen > stale_after:
        reason = json.dumps(f"not seen since {rfc3339(last_seen)} (stale after {stale_after:g}s)")
        tail += f'"state":"stale","reason":{reason}}}'
    else:
        tail += '"state":"ready"}'
    return body[:-1] + tail.encode("utf-8")


# -- large answers: built in slices, shared, written as the client reads --------

#: Entries built per reactor turn at most, bytes of them, and seconds spent.
SLICE_ITEMS = 1000
SLICE_BYTES = 1024 * 1024
SLICE_SECONDS = 0.005
#: Bytes of built answers kept for the next requests of the same change index.
CACHE_BYTES = 64 * 1024 * 1024
#: Requests answered per reactor turn once the answer they waited for is built
#: (each starts writing it).
DELIVER_BATCH = 64
#: Answers larger than this are written in slices as the client reads.
STREAM_OVER = 64 * 1024
#: The size of one slice, and the most one connection writes in one go.
WRITE_SLICE = 32 * 1024
WRITE_BUDGET = 256 * 1024


# What an answer is as new as: the epoch, the change index, the second.
_Stamp = tuple[str, int, int]


@frozen
class Built:
    """
    An answer, and the change index and epoch it is as new as.  A large
    answer stays in pieces (one per slice it was built in): joining them
    would copy all of it in one go.
    """

    index: int
    epoch: str
    pieces: tuple[bytes, ...]
    size: int

    @property
    def body(self) -> bytes:
        """The whole answer (joined: for small answers)."""
        return self.pieces[0] if len(self.pieces) == 1 else b"".join(self.pieces)


class Answers:
    """
    The catalog's large answers (every module; the providers of a service),
    built once per change index and second and shared: by the requests that
    come while it holds, and by the blocking queries one change wakes.

    An answer that takes more than a slice (L{SLICE_ITEMS} entries,
    L{SLICE_BYTES} bytes or L{SLICE_SECONDS} of work, whichever comes
    first) is built one slice per reactor turn, so that no request makes
    the reactor busy for long however many modules are registered; those
    who ask meanwhile wait for the same build, and are answered
    L{DELIVER_BATCH} per turn once it is done.  The answer then says the
    index it was started at (it may hold newer entries, never older ones).
    Lookups by service read the registry's index by service: their cost is
    that of the answer.

    @param cache_bytes: the most bytes of answers kept; an answer larger
        than that is shared by those waiting for it, and not kept.
    @param timer: what slices measure their work with (seconds; the
        process's performance counter, not the clock: it measures work,
        it schedules nothing).
    """

    def __init__(
        self,
        registry: IRegistry,
        clock: IReactorTime,
        slice_items: int = SLICE_ITEMS,
        slice_bytes: int = SLICE_BYTES,
        cache_bytes: int = CACHE_BYTES,
        slice_seconds: float = SLICE_SECONDS,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.slice_items = slice_items
        self.slice_bytes = slice_bytes
        self.slice_seconds = slice_seconds
        self.timer = timer
        self.cache_bytes = cache_bytes
        # Newest last: (stamp, answer) by what was asked.
        self._cache: OrderedDict[Hashable, tuple[_Stamp, Built]] = OrderedDict()
        self._cached_bytes = 0
        self._building: dict[Hashable, tuple[_Stamp, list[Deferred[Built]]]] = {}
        #: How many answers were built (tests and benchmarks count them).
        self.builds = 0

    def _stamp(self, now: float) -> _Stamp:
        # Entries' states change with time: an answer holds for its second.
        return (self.registry.epoch, self.registry.index, int(now))

    def modules(self) -> Built | Deferred[Built]:
        """C{{"modules": [...]}}: every registration (see L{module_entry})."""
        registry = self.registry
        now = self.clock.seconds()

        def entries() -> Iterator[bytes | None]:
            stale, binding = registry.stale_after, registry.binding
            if isinstance(registry, Iterable):
                # A snapshot of the registrations, read one slice at a time:
                # one removed meanwhile has no last-seen time any more.
                for registration in registry:
                    seen = registry.last_seen(registration.module_id)
                    if seen is not None:
                        module_id = registration.module_id
                        yield module_entry(registration, seen, now, stale, binding(module_id))
                return
            for registration, seen in list(registry.registrations()):
                yield module_entry(registration, seen, now, stale, binding(registration.module_id))

        return self._answer(("modules",), now, b'{"modules":[', entries)

    def service(self, service_id: str, passing: bool) -> Built | Deferred[Built]:
        """
        C{{"serviceID", "providers": [{"moduleID", "processID", "apis",
        "state"}]}}: every module with an API serving C{service_id} and those
        APIs (only the passing or unchecked ones with C{passing}).
        """
        registry = self.registry
        now = self.clock.seconds()

        def entries() -> Iterator[bytes | None]:
            by_service = getattr(registry, "_by_service", None)
            if by_service is None:  # another IRegistry: its (whole) list
                for registration, _ in registry.providers(service_id):
                    yield provider_entry(
                        registration,
                        service_id,
                        passing,
                        registry.is_stale(registration.module_id, now),
                    )
                return
            for module_id in list(by_service.get(service_id, ())):
                found = registry.get(module_id)
                if found is not None:
                    stale = registry.is_stale(module_id, now)
                    yield provider_entry(found, service_id, passing, stale)

        prefix = b'{"serviceID":' + encode_json(service_id) + b',"providers":['
        return self._answer(("service", service_id, passing), now, prefix, entries)

    def _answer(
        self,
        key: Hashable,
        now: float,
        prefix: bytes,
        entries: Callable[[], Iterator[bytes | None]],
    ) -> Built | Deferred[Built]:
        stamp = self._stamp(now)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] == stamp:
                self._cache.move_to_end(key)
                return cached[1]
            self._uncache(key)
        building = self._building.get(key)
        if building is not None and building[0][:2] == stamp[:2]:
            joined: Deferred[Built] = Deferred()
            building[1].append(joined)
            return joined
        self.builds += 1
        started = Built(self.registry.index, self.registry.epoch, (), 0)
        # The answer so far, one piece per slice (separators included): a
        # large answer is never joined whole (see Built).
        parts: list[bytes] = [prefix]
        items = entries()
        if self._slice(items, parts):
            return self._built(key, stamp, started, parts)
        waiting: list[Deferred[Built]] = []
        self._building[key] = (stamp, waiting)
        first: Deferred[Built] = Deferred()
        waiting.append(first)

        def more() -> None:
            try:
                done = self._slice(items, parts)
            except Exception:
                failure = Failure()
                self._forget(key, waiting)
                for d in waiting:
                    d.errback(failure)
                return
            if not done:
                self.clock.callLater(0, more)
                return
            self._forget(key, waiting)
            self._deliver(waiting, self._built(key, stamp, started, parts))

        self.clock.callLater(0, more)
        return first

    def _deliver(self, waiting: list[Deferred[Built]], built: Built) -> None:
        """Answer those waiting for C{built}, L{DELIVER_BATCH} per reactor turn."""
        now, later = waiting[:DELIVER_BATCH], waiting[DELIVER_BATCH:]
        for d in now:
            d.callback(built)
        if later:
            self.clock.callLater(0, self._deliver, later, built)

    def _forget(self, key: Hashable, waiting: list[Deferred[Built]]) -> None:
        building = self._building.get(key)
        if building is not None and building[1] is waiting:
            del self._building[key]

    def _slice(self, items: Iterator[bytes | None], parts: list[bytes]) -> bool:
        """Build up to a slice of entries, as one more piece of C{parts}; whether all are built."""
        count = size = 0
        deadline = self.timer() + self.slice_seconds
        entries: list[bytes] = []
        done = True
        for entry in items:
            if entry is not None:
                entries.append(entry)
                size += len(entry)
            count += 1
            if count >= self.slice_items or size >= self.slice_bytes:
                done = False
                break
            if count % 64 == 0 and self.timer() >= deadline:
                done = False
                break
        if entries:
            # Only the prefix so far: no separator before the first entry.
            parts.append((b"," if len(parts) > 1 else b"") + b",".join(entries))
        return done

    def _built(self, key: Hashable, stamp: _Stamp, started: Built, parts: list[bytes]) -> Built:
        parts.append(b"]}")
        if len(parts) <= 3:  # one slice: one piece
            parts = [b"".join(parts)]
        built = Built(started.index, started.epoch, tuple(parts), sum(map(len, parts)))
        if built.size <= self.cache_bytes:
            self._uncache(key)
            self._cache[key] = (stamp, built)
            self._cached_bytes += built.size
            while self._cached_bytes > self.cache_bytes:
                self._uncache(next(iter(self._cache)))
        return built

    def _uncache(self, key: Hashable) -> None:
        cached = self._cache.pop(key, None)
        if cached is not None:
            self._cached_bytes -= cached[1].size


def provider_entry(
    registration: Registration, service_id: str, passing: bool, stale: bool
) -> bytes | None:
    """
    One provider of a service answer: C{{"moduleID", "processID", "apis",
    "state"}} with the APIs serving C{service_id} (only passing or unchecked
    ones with C{passing}), or L{None} when none is left.  A module with one
    API (which serves the service: the caller found it by service) reuses
    its encoded discover answer; others are decoded, filtered and encoded.
    """
    body = registration.discover_body
    if registration.api_count == 1 and not (passing and registration.has_checks):
        # The apis array of {"moduleID":...,"apis":[...]}: the ID comes
        # first, and its encoded string cannot hold ,"apis":[ (its quotes
        # are escaped).
        apis = body[body.index(b',"apis":[') + 8 : -1]
    else:
        chosen = [
            api
            for api in json.loads(body)["apis"]
            if service_id in api["serviceIDs"]
            and (not passing or "check" not in api or api.get("status") == PASSING)
        ]
        if not chosen:
            return None
        apis = encode_json(chosen)
    return b"".join(
        (
            b'{"moduleID":',
            encode_json(registration.module_id),
            b',"processID":%d,"apis":' % registration.process_id,
            apis,
            b',"state":"stale"}' if stale else b',"state":"ready"}',
        )
    )


@implementer(IPushProducer)
class _BodyWriter:
    """Writes a large answer in slices as the client reads it (see L{respond})."""

    def __init__(self, request: Any, pieces: tuple[bytes, ...], clock: IReactorTime) -> None:
        self.request = request
        self.pieces = pieces
        self.clock = clock
        # The piece being written, and how much of it is.
        self.piece = 0
        self.offset = 0
        self.paused = False
        self.done = False
        self._later: IDelayedCall | None = None

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(lambda _: self.stopProducing())
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._later = None
        written = 0
        pieces = self.pieces
        while not self.paused and not self.done and written < WRITE_BUDGET:
            current = pieces[self.piece]
            data = current[self.offset : self.offset + WRITE_SLICE]
            self.offset += len(data)
            written += len(data)
            if self.offset >= len(current):
                self.piece += 1
                self.offset = 0
                if self.piece == len(pieces):
                    self._finish(data)
                    return
            if data:
                self.request.write(data)
        if not self.paused and not self.done and self._later is None:
            # A transport that takes everything: go on next turn.
            self._later = self.clock.callLater(0, self.resumeProducing)

    def _finish(self, last: bytes) -> None:
        request = self.request
        self.done = True
        request.write(last)
        request.unregisterProducer()
        request.finish()
        self.pieces = ()

    def stopProducing(self) -> None:
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        self.done = True
        self.pieces = ()


def respond(request: Any, built: Built, clock: IReactorTime) -> bytes | int:
    """
    Answer C{request} with C{built} and its index headers: as bytes, or,
    when large, written in slices as the client reads
    (C{NOT_DONE_YET}): the answer is shared by every request, and Twisted
    would copy it whole into each connection's buffer.
    """
    request.setHeader(b"x-hsu-index", b"%d" % built.index)
    request.setHeader(b"x-hsu-epoch", built.epoch.encode("ascii"))
    if built.size <= STREAM_OVER or getattr(request, "channel", None) is None:
        # Small, or nobody to write to (the client left).
        return json_response(request, built.body)
    json_response(request, b"")  # the status and content type
    request.setHeader(b"content-length", b"%d" % built.size)
    _BodyWriter(request, built.pieces, clock).start()
    return NOT_DONE_YET

# -*- test-case-name: tests.test_checks,tests.test_check_fairness -*-
"""
When to run which check: every target is probed C{interval} seconds after
its previous check completed, with at most one check per target pending and
at most C{concurrency} probes in flight overall.

Due checks wait in one FIFO queue per identity (a target's C{owner}), and
the identities with due checks take turns (round robin), so one identity's
thousand checks never stand in front of another's (issue 12).  Optionally
each identity may also start only so many checks per second (a token
bucket) and hold only so many of the concurrency slots at once: then checks
that hang until their timeout cannot occupy every slot, and a flood of
checks against one target is throttled to the identity's rate.

A probe that hangs or fails cannot stop the schedule: the scheduler applies
the check's timeout itself, and logs and carries on after errors, its own
callbacks' included.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, field, frozen
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsu_registry.checks.probes import (
    ERROR,
    NOT_ALLOWED,
    TIMEOUT,
    ProbeResult,
    http_probe,
    tcp_probe,
)
from hsu_registry.checks.spec import CheckSpec, go_duration

__all__ = ["CheckScheduler", "Probe", "Report", "Target", "network_probe"]

log = Logger()

#: Token counts this close below a whole token count as one (float dust).
_EPSILON = 1e-9


@frozen
class Target:
    """
    One API of one module to check: where, and how (C{spec}).

    @ivar host: the API's address as published (or the registry's host).
    @ivar owner: the principal of the identity the registration belongs to:
        checks are scheduled fairly between owners, and bounded per owner.
    @ivar ip: the IP address checks connect to when C{host} is a name,
        resolved once when the API was published; L{None} when C{host} is
        itself an IP address.
    """

    module_id: str
    api_index: int
    host: str
    port: int
    spec: CheckSpec
    owner: str = ""
    ip: str | None = None

    @property
    def connect_to(self) -> str:
        """The address a check connects to."""
        return self.ip or self.host


Probe = Callable[[Target], Deferred[ProbeResult]]
Report = Callable[[Target, ProbeResult], object]


def network_probe(reactor: Any, clock: IReactorTime | None = None) -> Probe:
    """
    The production L{Probe}: L{tcp_probe} or L{http_probe} as the target's
    spec says, bounded by its timeout, to the target's IP address.  It never
    resolves a name: a target whose address is a name that was not resolved
    when published is critical, C{not allowed}, without any connection.
    """

    def probe(target: Target) -> Deferred[ProbeResult]:
        spec = target.spec
        address = target.connect_to
        if not (isIPAddress(address) or isIPv6Address(address)):
            return succeed(
                ProbeResult(False, NOT_ALLOWED, f"{address!r} is a name not resolved at publish")
            )
        if spec.kind == "http" and spec.path is not None:
            return http_probe(
                reactor, target.host, target.port, spec.path, spec.timeout, clock, address=address
            )
        return tcp_probe(reactor, address, target.port, spec.timeout, clock)

    return probe


@define(eq=False)
class _Entry:
    """The mutable schedule of one target (hashed by identity)."""

    target: Target
    owner: _Owner
    state: str = "idle"  # "waiting" on a timer, "queued", "running", or "idle" when dropped
    timer: IDelayedCall | None = None
    probe: Deferred[ProbeResult] | None = None
    deadline: IDelayedCall | None = None
    run: int = 0  # numbers the probes started, so a late result of an old one is ignored


@define(eq=False)
class _Owner:
    """The checks of one identity: its due checks in FIFO order, its budget."""

    name: str
    tokens: float
    stamp: float
    queue: OrderedDict[_Entry, None] = field(factory=OrderedDict)
    entries: int = 0  # targets scheduled, whatever their state
    in_flight: int = 0
    refill: IDelayedCall | None = None  # waiting for a token


class CheckScheduler:
    """
    Run the checks of a changing set of targets.

    A new target is first checked after C{first_delay(target)} seconds
    (default: a random jitter below C{min(interval, 1s)}, so that targets
    published together do not all fire in the same turn), then C{interval}
    seconds after each check completes. Results go to C{report} only while
    the target is still current: a result of a removed or replaced target is
    dropped. After L{stop}, L{set_targets} and L{remove} do nothing, so late
    registry notifications during shutdown are harmless.

    Due checks start in turn by owner (L{Target.owner}), in FIFO order within
    an owner.

    @param clock: the timer for schedules and timeouts.
    @param probe: runs one check; it should not fail, but failing, raising
        and hanging are all handled (critical results).
    @param report: receives each result; its errors are logged and ignored.
    @param concurrency: the most probes in flight at once.
    @param first_delay: seconds before a new target's first check.
    @param rng: the source of the default jitter, in [0, 1).
    @param owner_concurrency: the most probes of one owner in flight at
        once (default: C{concurrency}, no bound of its own).
    @param owner_rate: the most checks of one owner started per second, on
        average (default: L{None}, unbounded).
    @param owner_burst: how many checks of one owner may start at once
        after a quiet spell, when C{owner_rate} is set.
    """

    def __init__(
        self,
        clock: IReactorTime,
        probe: Probe,
        report: Report,
        concurrency: int = 32,
        first_delay: Callable[[Target], float] | None = None,
        rng: Callable[[], float] = random.random,
        owner_concurrency: int | None = None,
        owner_rate: float | None = None,
        owner_burst: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if owner_concurrency is not None and owner_concurrency < 1:
            raise ValueError("owner_concurrency must be at least 1")
        if owner_rate is not None and owner_rate <= 0:
            raise ValueError("owner_rate must be positive")
        if owner_burst < 1:
            raise ValueError("owner_burst must be at least 1")
        self._clock = clock
        self._probe = probe
        self._report = report
        self._concurrency = concurrency
        self._owner_concurrency = owner_concurrency or concurrency
        self._owner_rate = owner_rate
        self._owner_burst = float(owner_burst)
        self._first_delay = first_delay or (lambda target: rng() * min(target.spec.interval, 1.0))
        self._modules: dict[str, dict[Target, _Entry]] = {}
        self._owners: dict[str, _Owner] = {}
        # Owners with a due check that may start one now, in turn order.
        self._ready: OrderedDict[_Owner, None] = OrderedDict()
        self._in_flight = 0
        self._running = True
        self._pumping = False

    @property
    def running(self) -> bool:
        """False once L{stop} was called."""
        return self._running

    @property
    def in_flight(self) -> int:
        """Probes running now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Checks due but waiting for a free slot (or their owner's turn)."""
        return sum(len(owner.queue) for owner in self._owners.values())

    @property
    def scheduled(self) -> int:
        """Targets under check: waiting for their next check, queued or running."""
        return sum(len(entries) for entries in self._modules.values())

    def owner_in_flight(self, owner: str) -> int:
        """Probes of C{owner}'s targets running now."""
        state = self._owners.get(owner)
        return state.in_flight if state is not None else 0

    def targets(self, module_id: str) -> tuple[Target, ...]:
        """The module's current targets (none when it has no checks)."""
        return tuple(self._modules.get(module_id, {}))

    def __contains__(self, module_id: object) -> bool:
        """Whether the module has checks scheduled."""
        return module_id in self._modules

    def set_targets(self, module_id: str, targets: Iterable[Target]) -> None:
        """
        Make C{targets} the module's checks. A target equal to a current one
        keeps its schedule (and any check in flight); the others are new, and
        current targets not listed are dropped, their checks cancelled.

        @raise ValueError: if a target belongs to another module.
        """
        wanted = list(dict.fromkeys(targets))
        for target in wanted:
            if target.module_id != module_id:
                raise ValueError(f"target of {target.module_id!r} given for {module_id!r}")
        if not self._running:
            return
        old = self._modules.pop(module_id, {})
        new: dict[Target, _Entry] = {}
        for target in wanted:
            entry = old.pop(target, None)
            if entry is None:
                owner = self._owner(target.owner)
                owner.entries += 1
                entry = _Entry(target, owner)
                self._wait(entry, max(0.0, self._first_delay(target)))
            new[target] = entry
        if new:
            self._modules[module_id] = new
        for entry in old.values():
            self._drop(entry)
        self._pump()

    def remove(self, module_id: str) -> None:
        """Drop every check of the module, cancelling those in flight."""
        for entry in self._modules.pop(module_id, {}).values():
            self._drop(entry)
        self._pump()

    def stop(self) -> None:
        """
        Cancel every timer and every probe in flight, for good: later calls
        of L{set_targets} and L{remove} do nothing, and no report follows.
        """
        self._running = False
        modules, self._modules = self._modules, {}
        for entries in modules.values():
            for entry in entries.values():
                self._drop(entry)

    # -- owners: their turns and budgets

    def _owner(self, name: str) -> _Owner:
        owner = self._owners.get(name)
        if owner is None:
            owner = _Owner(name, tokens=self._owner_burst, stamp=self._clock.seconds())
            self._owners[name] = owner
        return owner

    def _refill(self, owner: _Owner) -> None:
        if self._owner_rate is None:
            return
        now = self._clock.seconds()
        owner.tokens = min(self._owner_burst, owner.tokens + (now - owner.stamp) * self._owner_rate)
        owner.stamp = now

    def _consider(self, owner: _Owner) -> None:
        """Give C{owner} a turn if it has a due check it may start now."""
        if (
            not owner.queue
            or owner.in_flight >= self._owner_concurrency
            or owner in self._ready
            or not self._running
        ):
            return
        self._refill(owner)
        if self._owner_rate is None or owner.tokens >= 1.0 - _EPSILON:
            self._ready[owner] = None
        elif owner.refill is None:
            wait = (1.0 - owner.tokens) / self._owner_rate
            owner.refill = self._clock.callLater(wait, self._refilled, owner)

    def _refilled(self, owner: _Owner) -> None:
        owner.refill = None
        self._consider(owner)
        self._pump()

    def _forget_if_idle(self, owner: _Owner) -> None:
        if owner.entries or owner.in_flight or owner.queue:
            return
        if owner.refill is not None and owner.refill.active():
            owner.refill.cancel()
        owner.refill = None
        self._ready.pop(owner, None)
        if self._owners.get(owner.name) is owner:
            del self._owners[owner.name]

    # -- the life of an entry: waiting -> queued -> running -> waiting ...

    def _wait(self, entry: _Entry, delay: float) -> None:
        entry.state = "waiting"
        entry.timer = self._clock.callLater(delay, self._due, entry)

    def _due(self, entry: _Entry) -> None:
        entry.timer = None
        entry.state = "queued"
        entry.owner.queue[entry] = None
        self._consider(entry.owner)
        self._pump()

    def _pump(self) -> None:
        # A loop, not recursion: probes that finish synchronously must not
        # deepen the stack once per queued check.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._ready and self._in_flight < self._concurrency:
                owner, _ = self._ready.popitem(last=False)
                if not owner.queue or owner.in_flight >= self._owner_concurrency:
                    continue
                entry, _ = owner.queue.popitem(last=False)
                if self._owner_rate is not None:
                    self._refill(owner)
                    owner.tokens -= 1.0
                self._start(entry)
                self._consider(owner)  # back at the end of the turn order
        finally:
            self._pumping = False

    def _start(self, entry: _Entry) -> None:
        entry.state = "running"
        entry.run += 1
        self._in_flight += 1
        entry.owner.in_flight += 1
        entry.deadline = self._clock.callLater(
            entry.target.spec.timeout, self._expire, entry, entry.run
        )
        entry.probe = maybeDeferred(self._probe, entry.target)
        entry.probe.addBoth(self._finished, entry, entry.run)

    def _finished(self, result: object, entry: _Entry, run: int) -> None:
        if entry.state != "running" or entry.run != run:
            return None  # dropped or timed out meanwhile: nobody wants it
        self._end_run(entry)
        if isinstance(result, Failure):
            log.failure(
                "Probe of {module_id} API {api_index} ({host}:{port}) failed",
                result,
                **_fields(entry.target),
            )
            outcome = ProbeResult(False, ERROR, _error_text(result))
        elif isinstance(result, ProbeResult):
            outcome = result
        else:
            log.error(
                "Probe of {module_id} API {api_index} returned {result!r}, not a ProbeResult",
                result=result,
                **_fields(entry.target),
            )
            outcome = ProbeResult(False, ERROR, "probe returned no result")
        self._completed(entry, outcome)
        return None

    def _expire(self, entry: _Entry, run: int) -> None:
        entry.deadline = None
        if entry.state != "running" or entry.run != run:
            return
        probe = entry.probe
        self._end_run(entry)
        if probe is not None:
            _cancel(probe, entry.target)
        timeout = go_duration(entry.target.spec.timeout)
        self._completed(entry, ProbeResult(False, TIMEOUT, f"no answer within {timeout}"))

    def _end_run(self, entry: _Entry) -> None:
        if entry.deadline is not None and entry.deadline.active():
            entry.deadline.cancel()
        entry.deadline = None
        entry.probe = None
        entry.state = "idle"
        self._in_flight -= 1
        entry.owner.in_flight -= 1
        self._consider(entry.owner)

    def _completed(self, entry: _Entry, outcome: ProbeResult) -> None:
        target = entry.target
        if self._modules.get(target.module_id, {}).get(target) is not entry:
            return  # dropped while its probe was being cancelled
        self._wait(entry, target.spec.interval)
        self._pump()
        self._deliver(entry.target, outcome)

    def _deliver(self, target: Target, outcome: ProbeResult) -> None:
        try:
            reported = self._report(target, outcome)
        except Exception:
            log.failure("Reporting the check of {module_id} failed", **_fields(target))
            return
        if isinstance(reported, Deferred):
            reported.addErrback(
                lambda f: log.failure(
                    "Reporting the check of {module_id} failed", f, **_fields(target)
                )
            )

    def _drop(self, entry: _Entry) -> None:
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        owner = entry.owner
        owner.queue.pop(entry, None)
        if entry.state == "running":
            probe = entry.probe
            self._end_run(entry)
            if probe is not None:
                _cancel(probe, entry.target)
        entry.state = "idle"
        owner.entries -= 1
        self._forget_if_idle(owner)


def _cancel(probe: Deferred[ProbeResult], target: Target) -> None:
    # Whatever the cancelled probe fires with lands in _finished, which
    # ignores it: its entry is no longer running.
    try:
        probe.cancel()
    except Exception:
        log.failure("Cancelling the probe of {module_id} failed", **_fields(target))


def _fields(target: Target) -> dict[str, Any]:
    return {
        "module_id": target.module_id,
        "api_index": target.api_index,
        "host": target.host,
        "ip": target.ip,
        "port": target.port,
        "owner": target.owner,
        "check": target.spec.kind,
    }


def _error_text(failure: Failure) -> str:
    return (failure.getErrorMessage().strip() or type(failure.value).__name__)[:200]

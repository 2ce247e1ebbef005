# -*- test-case-name: tests.test_checks -*-
"""
When to run which check: every target is probed C{interval} seconds after
its previous check completed, with at most one check per target pending and
at most C{concurrency} probes in flight overall, the rest waiting in FIFO
order.

A probe that hangs or fails cannot stop the schedule: the scheduler applies
the check's timeout itself, and logs and carries on after errors, its own
callbacks' included.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from attrs import define, frozen
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsu_registry.checks.probes import ProbeResult, http_probe, tcp_probe
from hsu_registry.checks.spec import CheckSpec, go_duration

__all__ = ["CheckScheduler", "Probe", "Report", "Target", "network_probe"]

log = Logger()


@frozen
class Target:
    """One API of one module to check: where, and how (C{spec})."""

    module_id: str
    api_index: int
    host: str
    port: int
    spec: CheckSpec


Probe = Callable[[Target], Deferred[ProbeResult]]
Report = Callable[[Target, ProbeResult], object]


def network_probe(reactor: Any, clock: IReactorTime | None = None) -> Probe:
    """
    The production L{Probe}: L{tcp_probe} or L{http_probe} as the target's
    spec says, bounded by its timeout.
    """

    def probe(target: Target) -> Deferred[ProbeResult]:
        spec = target.spec
        if spec.kind == "http" and spec.path is not None:
            return http_probe(reactor, target.host, target.port, spec.path, spec.timeout, clock)
        return tcp_probe(reactor, target.host, target.port, spec.timeout, clock)

    return probe


@define(eq=False)
class _Entry:
    """The mutable schedule of one target (hashed by identity)."""

    target: Target
    state: str = "idle"  # "waiting" on a timer, "queued", "running", or "idle" when dropped
    timer: IDelayedCall | None = None
    probe: Deferred[ProbeResult] | None = None
    deadline: IDelayedCall | None = None
    run: int = 0  # numbers the probes started, so a late result of an old one is ignored


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

    @param clock: the timer for schedules and timeouts.
    @param probe: runs one check; it should not fail, but failing, raising
        and hanging are all handled (critical results).
    @param report: receives each result; its errors are logged and ignored.
    @param concurrency: the most probes in flight at once.
    @param first_delay: seconds before a new target's first check.
    @param rng: the source of the default jitter, in [0, 1).
    """

    def __init__(
        self,
        clock: IReactorTime,
        probe: Probe,
        report: Report,
        concurrency: int = 32,
        first_delay: Callable[[Target], float] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._clock = clock
        self._probe = probe
        self._report = report
        self._concurrency = concurrency
        self._first_delay = first_delay or (lambda target: rng() * min(target.spec.interval, 1.0))
        self._modules: dict[str, dict[Target, _Entry]] = {}
        self._queue: OrderedDict[_Entry, None] = OrderedDict()
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
        """Checks due but waiting for a free slot."""
        return len(self._queue)

    @property
    def scheduled(self) -> int:
        """Targets under check: waiting for their next check, queued or running."""
        return sum(len(entries) for entries in self._modules.values())

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
                entry = _Entry(target)
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

    # -- the life of an entry: waiting -> queued -> running -> waiting ...

    def _wait(self, entry: _Entry, delay: float) -> None:
        entry.state = "waiting"
        entry.timer = self._clock.callLater(delay, self._due, entry)

    def _due(self, entry: _Entry) -> None:
        entry.timer = None
        entry.state = "queued"
        self._queue[entry] = None
        self._pump()

    def _pump(self) -> None:
        # A loop, not recursion: probes that finish synchronously must not
        # deepen the stack once per queued check.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and self._in_flight < self._concurrency:
                entry, _ = self._queue.popitem(last=False)
                self._start(entry)
        finally:
            self._pumping = False

    def _start(self, entry: _Entry) -> None:
        entry.state = "running"
        entry.run += 1
        self._in_flight += 1
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
            outcome = ProbeResult(False, _error_text(result))
        elif isinstance(result, ProbeResult):
            outcome = result
        else:
            log.error(
                "Probe of {module_id} API {api_index} returned {result!r}, not a ProbeResult",
                result=result,
                **_fields(entry.target),
            )
            outcome = ProbeResult(False, "probe returned no result")
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
        outcome = ProbeResult(False, f"timed out after {go_duration(entry.target.spec.timeout)}")
        self._completed(entry, outcome)

    def _end_run(self, entry: _Entry) -> None:
        if entry.deadline is not None and entry.deadline.active():
            entry.deadline.cancel()
        entry.deadline = None
        entry.probe = None
        entry.state = "idle"
        self._in_flight -= 1

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
        self._queue.pop(entry, None)
        if entry.state == "running":
            probe = entry.probe
            self._end_run(entry)
            if probe is not None:
                _cancel(probe, entry.target)
        entry.state = "idle"


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
        "port": target.port,
        "check": target.spec.kind,
    }


def _error_text(failure: Failure) -> str:
    return (failure.getErrorMessage().strip() or type(failure.value).__name__)[:200]

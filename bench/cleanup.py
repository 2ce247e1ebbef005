"""
Cleanup lag: how long one cleanup pass blocks the reactor when half of
100 000 registrations expire at once.

In its own process (C{python -m bench.cleanup --registrations N}, printing
JSON), on a real reactor: a L{hsu_registry.registry.Registry} over a
L{MemoryStore} gets N modules of two APIs through its public C{publish}; its
clock is the reactor's shifted into the past for the first half, so those
were last seen longer ago than the expiry time.  Then, while a 1 ms
L{LoopingCall} heartbeat records the gaps between its ticks, one
L{CleanupService.run_once} runs; the longest gap is the reactor's lag.  Log
events of the pass are formatted and written to a file as the daemon's
stderr log would be (the pass logs one line per expired module).

Only public API is used: C{Registry(store, clock, ...)}, C{publish},
C{parse_publish_body} and C{CleanupService(registry, interval, clock).run_once()}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import implementer

from bench.workload import publish_body

__all__ = ["ShiftedClock", "main", "measure_cleanup"]

HEARTBEAT = 0.001
QUIET = 0.3
EXPIRE_AFTER = 600.0


@implementer(IReactorTime)
class ShiftedClock:
    """The reactor's clock plus C{offset} seconds (negative: the past)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.offset = 0.0

    def seconds(self) -> float:
        return float(self.reactor.seconds()) + self.offset

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> IDelayedCall:
        return self.reactor.callLater(delay, callable, *args, **kw)

    def getDelayedCalls(self) -> Any:
        return self.reactor.getDelayedCalls()


@implementer(ILogObserver)
class _Switch:
    """Passes events on only while C{on}: publishing N modules logs N lines we do not time."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer
        self.on = False

    def __call__(self, event: LogEvent) -> None:
        if self.on:
            self.observer(event)


def measure_cleanup(registrations: int, log_path: str, log: bool = True) -> dict[str, Any]:
    """Build the registry, run one timed pass on the reactor, and return the figures."""
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    import hsu_registry
    from hsu_registry.model import parse_publish_body
    from hsu_registry.registry import Registry
    from hsu_registry.service import CleanupService
    from hsu_registry.stores.memory import MemoryStore

    r: Any = reactor
    log_file = open(log_path, "w", encoding="utf-8")
    switch = _Switch(
        FilteringLogObserver(
            textFileLogObserver(log_file), [LogLevelFilterPredicate(LogLevel.info)]
        )
    )
    globalLogBeginner.beginLoggingTo([switch], redirectStandardIO=False)

    clock = ShiftedClock(r)
    registry = Registry(
        MemoryStore(),
        clock,
        stale_after=EXPIRE_AFTER / 2,
        expire_after=EXPIRE_AFTER,
        max_modules=registrations,
    )
    old = registrations // 2
    failures: list[Any] = []
    build_started = time.perf_counter()
    for index in range(registrations):
        clock.offset = -(EXPIRE_AFTER + 60.0) if index < old else 0.0
        d = registry.publish(parse_publish_body(publish_body(f"mod-{index}")))
        d.addErrback(failures.append)
    clock.offset = 0.0
    build_s = time.perf_counter() - build_started
    if failures or len(registry) != registrations:
        raise RuntimeError(f"building the registry failed: {failures[:1]}")

    cleanup = CleanupService(registry, 60.0, r)
    ticks: list[float] = []
    marks: dict[str, float] = {}

    def tick() -> None:
        ticks.append(time.perf_counter())

    heartbeat = LoopingCall(tick)
    heartbeat.clock = r

    def finish() -> None:
        heartbeat.stop()
        r.stop()

    def empty_pass() -> None:
        started = time.perf_counter()
        cleanup.run_once().addBoth(lambda _: marks.setdefault("empty_pass_s", 0.0))
        marks["empty_pass_s"] = time.perf_counter() - started
        r.callLater(QUIET, finish)

    def timed_pass() -> None:
        switch.on = log
        marks["pass_start"] = time.perf_counter()

        def done(_: object) -> None:
            marks["pass_end"] = time.perf_counter()
            switch.on = False
            r.callLater(QUIET, empty_pass)

        cleanup.run_once().addBoth(done)

    def start() -> None:
        heartbeat.start(HEARTBEAT, now=True)
        r.callLater(QUIET, timed_pass)

    def abort() -> None:
        marks["aborted"] = 1.0
        r.stop()

    r.callWhenRunning(start)
    guard = r.callLater(120.0, abort)
    r.run()
    if guard.active():
        guard.cancel()
    log_file.close()
    if "aborted" in marks or "pass_end" not in marks:
        raise RuntimeError("the cleanup pass did not finish within 120 s")

    began, ended = marks["pass_start"], marks["pass_end"]
    gaps = [(a, b) for a, b in itertools.pairwise(ticks)]
    baseline = [b - a for a, b in gaps if b < began and a > ticks[0] + 0.05]
    during = [b - a for a, b in gaps if b >= began and a <= ended + QUIET / 2]
    remaining = len(registry)
    with open(log_path, "rb") as f:
        log_lines = sum(1 for _ in f)
    return {
        "registrations": registrations,
        "expired": registrations - remaining,
        "remaining": remaining,
        "pass_ms": (ended - began) * 1000.0,
        "max_gap_ms": max(during) * 1000.0 if during else 0.0,
        "lag_ms": max(0.0, (max(during) if during else 0.0) - HEARTBEAT) * 1000.0,
        "baseline_max_gap_ms": max(baseline) * 1000.0 if baseline else 0.0,
        "heartbeat_ms": HEARTBEAT * 1000.0,
        "empty_pass_ms": marks.get("empty_pass_s", 0.0) * 1000.0,
        "build_s": build_s,
        "log_lines": log_lines,
        "logged": log,
        "hsu_registry": os.path.dirname(hsu_registry.__file__),
        "hsu_registry_version": hsu_registry.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    """Print the figures of one measurement as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--registrations", type=int, default=100_000)
    parser.add_argument("--log", default="cleanup.log", help="where the pass's log goes")
    parser.add_argument(
        "--no-log", action="store_true", help="drop the pass's log events (to see their cost)"
    )
    args = parser.parse_args(argv)
    result = measure_cleanup(args.registrations, args.log, log=not args.no_log)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

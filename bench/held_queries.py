"""
What held blocking queries cost the reactor: N queries held on one index
(``GET ...?index=I&wait=30s``) of a L{hsu_registry.watch.ChangeLog}, then
the CPU time to answer all of them when they time out, and when one change
wakes them.  In process, on a heap-ordered clock (C{task.Clock} re-sorts
all its calls after each one it runs, which would hide the change log's own
cost)::

    python -m bench.held_queries [--queries 20000]

Prints one JSON object: seconds for the timeouts and for the wake-up.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import time
from typing import Any

from hsu_registry.model import parse_publish_body
from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog

__all__ = ["measure"]


class _Call:
    def __init__(self, when: float, func: Any, args: tuple[Any, ...]) -> None:
        self.when, self.func, self.args, self.live = when, func, args, True

    def active(self) -> bool:
        return self.live

    def cancel(self) -> None:
        self.live = False

    def getTime(self) -> float:
        return self.when


class _HeapClock:
    """Just enough of C{IReactorTime} for the registry and the change log."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.heap: list[tuple[float, int, _Call]] = []
        self.order = itertools.count()

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, func: Any, *args: Any) -> _Call:
        call = _Call(self.now + delay, func, args)
        heapq.heappush(self.heap, (call.when, next(self.order), call))
        return call

    def advance(self, amount: float) -> None:
        self.now += amount
        while self.heap and self.heap[0][0] <= self.now:
            call = heapq.heappop(self.heap)[2]
            if call.live:
                call.live = False
                call.func(*call.args)


def measure(queries: int) -> dict[str, Any]:
    """Seconds of CPU to answer C{queries} held queries by timeout, and by one change."""
    result: dict[str, Any] = {"queries": queries}
    for how in ("timeout", "change"):
        clock = _HeapClock()
        registry = Registry(MemoryStore(), clock)  # type: ignore[arg-type]
        log = ChangeLog(registry, clock)  # type: ignore[arg-type]
        held = [log.wait(registry.index, 30) for _ in range(queries)]
        began = time.process_time()
        if how == "timeout":
            clock.advance(40)
        else:
            registry.publish(parse_publish_body(b'{"moduleID":"a","apis":[]}'))
            while not all(d.called for d in held):
                clock.advance(0.002)
        result[f"{how}_s"] = time.process_time() - began
        if not all(d.called for d in held):
            raise RuntimeError(f"some queries were not answered by {how}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.held_queries")
    parser.add_argument("--queries", type=int, default=20_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.queries)))


if __name__ == "__main__":
    main()

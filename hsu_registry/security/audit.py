# -*- test-case-name: tests.test_quotas -*-
"""
The audit trail of refused requests: every refusal is logged with the
identity and what it asked for, with C{audit=True} among the event's fields,
but a flood of the same refusal (an identity hammering past its rate) is
one line per interval with the count, so the log cannot be flooded either.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["RefusalLog"]


class RefusalLog:
    """
    Logs refusals, at most one line per (kind, identity) every C{interval}
    seconds, saying how many were not logged since.  Memory is bounded by
    C{max_tracked} (kind, identity) pairs.
    """

    log = Logger(namespace="hsu_registry.audit")

    def __init__(self, clock: IReactorTime, interval: float = 10.0, max_tracked: int = 10_000):
        self.clock = clock
        self.interval = interval
        self.max_tracked = max_tracked
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self.refused = 0  # every refusal, logged or not (a counter for metrics)

    def refuse(self, kind: str, identity: str, target: str, reason: str) -> None:
        """Record that C{identity} was refused C{target} (a path) for C{reason}."""
        self.refused += 1
        key = (kind, identity)
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if len(self._last) >= self.max_tracked:
            self._last.clear()
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self.log.warn(
            "Refused {target} by {identity} ({kind}): {reason}{more}",
            kind=kind,
            identity=identity,
            target=target,
            reason=reason,
            suppressed=suppressed,
            more=f" ({suppressed} more like it not logged)" if suppressed else "",
            audit=True,
        )

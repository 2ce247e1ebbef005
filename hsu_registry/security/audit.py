# -*- test-case-name: tests.test_quotas -*-
"""
Log lines an attack would repeat thousands of times a second, without
flooding the log: L{RateLimitedLog} (at most one line per key and interval,
saying how many events it stands for, the rest flushed when the interval
ends), and on it L{RefusalLog}, the audit trail of refused requests (with
C{audit=True} among each event's fields).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["RateLimitedLog", "RefusalLog"]


class RateLimitedLog:
    """
    Log lines that an attack would repeat thousands of times a second: at
    most one line per key every C{interval} seconds, which says how many
    events it stands for (the first at once; those that follow within the
    interval in one line when it ends).

    Each format is given C{count} (the events the line stands for) and
    C{interval}, with the fields of the latest event.
    """

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0) -> None:
        self.log = log
        self.clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._pending: dict[str, tuple[int, str, Mapping[str, Any]]] = {}
        self._flushes: dict[str, IDelayedCall] = {}

    def warn(self, key: str, format: str, **fields: Any) -> None:
        """One more event of C{key}: logged now, or counted into the next line."""
        now = self.clock.seconds()
        last = self._last.get(key)
        if last is None or now - last >= self.interval:
            self._last[key] = now
            self.log.warn(format, count=1, interval=self.interval, limit_key=key, **fields)
            return
        count = self._pending.get(key, (0, "", {}))[0]
        self._pending[key] = (count + 1, format, fields)
        if key not in self._flushes:
            self._flushes[key] = self.clock.callLater(last + self.interval - now, self._flush, key)

    def _flush(self, key: str) -> None:
        self._flushes.pop(key, None)
        count, format, fields = self._pending.pop(key, (0, "", {}))
        if count:
            self._last[key] = self.clock.seconds()
            self.log.warn(format, count=count, interval=self.interval, limit_key=key, **fields)

    def stop(self) -> None:
        """Log what is pending now and cancel the timers."""
        for key, call in list(self._flushes.items()):
            if call.active():
                call.cancel()
            self._flush(key)


class RefusalLog:
    """
    The audit trail of refusals: each (kind, identity) logs at most one line
    per C{interval} seconds, saying how many refusals it stands for; every
    refusal is counted in L{refused}.
    """

    log = Logger(namespace="hsu_registry.audit")

    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self._lines = RateLimitedLog(self.log, clock, interval)
        self.refused = 0  # every refusal, logged or not (a counter for metrics)

    def refuse(self, kind: str, identity: str, target: str, reason: str) -> None:
        """Record that C{identity} was refused C{target} (a path) for C{reason}."""
        self.refused += 1
        self._lines.warn(
            f"{kind}\0{identity}",
            "Refused {target} by {identity} ({kind}): {reason} ({count} in {interval}s)",
            kind=kind,
            identity=identity,
            target=target,
            reason=reason,
            audit=True,
        )

    def stop(self) -> None:
        """Log the refusals still counted, and cancel the timers (the daemon stops)."""
        self._lines.stop()

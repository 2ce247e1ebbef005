# -*- test-case-name: tests.test_health -*-
"""
The daemon's health checking: follows the registry's changes, keeps a
L{CheckScheduler} target for every API published with a C{check}, and
records each result in the registry (where a new status is a change).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hsu_registry.checks.probes import ProbeResult
from hsu_registry.checks.scheduler import CheckScheduler, Probe, Target, network_probe
from hsu_registry.model import CRITICAL, PASSING, CheckTarget, Registration
from hsu_registry.registry import Change, ChangeKind, Registry

__all__ = ["HealthCheckService", "targets_of"]


def targets_of(registration: Registration) -> list[Target]:
    """
    The check targets of C{registration}'s APIs that have a check, at their
    address or, without one, the registry's host.
    """
    if not registration.has_checks:
        return []
    targets = []
    for index, api in enumerate(registration.apis):
        where = api.check_target()
        if where is not None:
            targets.append(
                Target(registration.module_id, index, where.host, where.port, where.check)
            )
    return targets


class HealthCheckService(Service):
    """
    Runs the health checks of the registered APIs while the daemon runs.

    @param concurrency: the most checks in flight at once; the others wait
        their turn, and a target never has more than one check pending.
    @param probe: how a target is checked (the network by default).
    """

    name = "health-checks"
    log = Logger()

    def __init__(
        self,
        registry: Registry,
        reactor: Any,
        concurrency: int = 32,
        probe: Probe | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.registry = registry
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.concurrency = concurrency
        self.probe = probe if probe is not None else network_probe(reactor, self.clock)
        self.scheduler: CheckScheduler | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self.scheduler = CheckScheduler(self.clock, self.probe, self._report, self.concurrency)
        for registration in self.registry:
            self._follow(registration)
        self._unsubscribe = self.registry.subscribe(self._changed)

    def stopService(self) -> None:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None

    def _changed(self, change: Change) -> None:
        if change.kind in (ChangeKind.PUBLISHED, ChangeKind.UPDATED):
            self._follow(change.registration)
        elif change.kind in (ChangeKind.UNPUBLISHED, ChangeKind.EXPIRED):
            if self.scheduler is not None and change.module_id in self.scheduler:
                self.scheduler.remove(change.module_id)

    def _follow(self, registration: Registration) -> None:
        if self.scheduler is None:
            return
        module_id = registration.module_id
        targets = targets_of(registration)
        if targets or module_id in self.scheduler:
            self.scheduler.set_targets(module_id, targets)

    def _report(self, target: Target, result: ProbeResult) -> None:
        status = PASSING if result.passing else CRITICAL
        where = CheckTarget(target.host, target.port, target.spec)
        d = self.registry.set_status(
            target.module_id, target.api_index, where, status, result.output
        )
        d.addErrback(
            lambda f: self.log.failure(
                "Could not record the {status} check of {module_id}",
                f,
                status=status,
                module_id=target.module_id,
            )
        )

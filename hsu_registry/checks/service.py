# -*- test-case-name: tests.test_health,tests.test_check_fairness -*-
"""
The daemon's health checking: follows the registry's changes, keeps a
L{CheckScheduler} target for every API published with a C{check}, and
records each result in the registry (where a new status is a change).

Before a target is checked it is judged again, against its registration's
owner (L{CheckTargets}): an address no check of the owner's may reach is
never connected to (registrations stored before publishes were vetted,
loaded from the store, or a policy that shrank: critical, C{not allowed}),
a name not pinned at publish is resolved once when the registration is
followed and its address pinned, and an owner's checks past its limit are
not run (their status stays C{unknown}; the publish path refuses them).

What a check found in detail (which may quote the target) is logged for the
operator when an API's status changes, and never published: answers show
only the fixed vocabulary of L{hsu_registry.checks.probes}.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_address
from typing import Any

from attrs import evolve
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsu_registry.checks.addresses import AddressRefused, parse_address
from hsu_registry.checks.probes import ERROR, NOT_ALLOWED, ProbeResult, is_output
from hsu_registry.checks.scheduler import CheckScheduler, Probe, Target, network_probe
from hsu_registry.checks.targets import CheckTargets
from hsu_registry.model import CRITICAL, PASSING, CheckTarget, Registration
from hsu_registry.registry import Change, ChangeKind, Registry

__all__ = ["HealthCheckService", "targets_of"]


def targets_of(registration: Registration) -> list[Target]:
    """
    The check targets of C{registration}'s APIs that have a check, at their
    address or, without one, the registry's host, owned by the
    registration's owner, with the address pinned at publish if any.
    """
    if not registration.has_checks:
        return []
    targets = []
    for index, api in enumerate(registration.apis):
        where = api.check_target()
        if where is not None:
            targets.append(
                Target(
                    registration.module_id,
                    index,
                    where.host,
                    where.port,
                    where.check,
                    registration.owner,
                    where.check.ip,
                )
            )
    return targets


def _place(target: Target) -> tuple[int, str, int, Any, str]:
    """What makes two targets the same check of the same place (the pin aside)."""
    return (target.api_index, target.host, target.port, target.spec, target.owner)


class HealthCheckService(Service):
    """
    Runs the health checks of the registered APIs while the daemon runs.

    @param concurrency: the most checks in flight at once; the others wait
        their turn (identities take turns), and a target never has more than
        one check pending.
    @param probe: how a target is checked (the network by default).
    @param targets: where checks may go and the per-identity bounds; share
        it with the publish path (L{CheckTargets.vet}), which reads the
        counts of checked APIs this service keeps in it.  Default: one of
        its own (loopback and this host's addresses only).
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
        targets: CheckTargets | None = None,
    ) -> None:
        self.registry = registry
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.concurrency = concurrency
        self.probe = probe if probe is not None else network_probe(reactor, self.clock)
        self.targets = targets if targets is not None else CheckTargets(reactor, clock=self.clock)
        self.scheduler: CheckScheduler | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # Bumped at each follow of a module, so a slow lookup of an older
        # registration's names does not overwrite a newer one's targets.
        self._generations: dict[str, int] = {}

    def startService(self) -> None:
        super().startService()
        limits = self.targets.limits
        self.scheduler = CheckScheduler(
            self.clock,
            self.probe,
            self._report,
            self.concurrency,
            owner_concurrency=limits.in_flight_per_identity(self.concurrency),
            owner_rate=limits.starts_per_second,
            owner_burst=limits.burst,
        )
        self.recheck()
        self._unsubscribe = self.registry.subscribe(self._changed)

    def stopService(self) -> None:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        self._generations.clear()

    def recheck(self) -> None:
        """
        Judge every registration's targets again: after the policy or this
        host's addresses changed (L{CheckTargets.refresh}), say.  Names keep
        the address they were pinned to; targets no longer allowed stop.
        """
        for registration in self.registry:
            self._follow(registration)

    def _changed(self, change: Change) -> None:
        if change.kind in (ChangeKind.PUBLISHED, ChangeKind.UPDATED):
            self._follow(change.registration)
        elif change.kind in (ChangeKind.UNPUBLISHED, ChangeKind.EXPIRED):
            self._forget(change.module_id)

    def _forget(self, module_id: str) -> None:
        self._generations.pop(module_id, None)
        self.targets.usage.discard(module_id)
        if self.scheduler is not None and module_id in self.scheduler:
            self.scheduler.remove(module_id)

    def _follow(self, registration: Registration) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        module_id = registration.module_id
        generation = self._generations.get(module_id, 0) + 1
        self._generations[module_id] = generation
        targets = targets_of(registration)
        if not targets:
            self._forget(module_id)
            return
        owner = registration.owner
        usage = self.targets.usage
        room = max(0, self.targets.limits.max_checked_apis - usage.others(owner, module_id))
        wanted, surplus = targets[:room], targets[room:]
        usage.set(module_id, owner, len(wanted))
        if surplus:
            # The publish path refuses these (403); this is the safety net
            # (a race of publishes, a restart, registrations stored before).
            # Their status stays unknown: writing one status per API would
            # re-encode the registration once per API.
            self.log.warn(
                "Not checking {count} APIs of {module_id} (from API {first}): {owner} has "
                "{limit} checked APIs, its limit",
                count=len(surplus),
                module_id=module_id,
                first=surplus[0].api_index,
                owner=owner or "(unknown)",
                limit=self.targets.limits.max_checked_apis,
            )
        refused: list[tuple[Target, str, str]] = []
        current = {_place(t): t for t in scheduler.targets(module_id)}
        ready: list[Target] = []
        lookups: list[tuple[Target, Deferred[Target]]] = []
        for target in wanted:
            try:
                judged = self._judge(target, current)
            except AddressRefused as e:
                refused.append((target, NOT_ALLOWED, f"{target.host!r} {e.reason}"))
                continue
            if isinstance(judged, Deferred):
                lookups.append((target, judged))
            else:
                ready.append(judged)
        if not lookups:
            self._apply(module_id, generation, ready, refused)
            return

        def resolved(results: list[tuple[bool, Any]]) -> None:
            for (target, _), (ok, value) in zip(lookups, results, strict=True):
                if ok:
                    ready.append(value)
                else:
                    refused.append((target, NOT_ALLOWED, _why(target, value)))
            ready.sort(key=lambda t: t.api_index)
            self._apply(module_id, generation, ready, refused)

        DeferredList([d for _, d in lookups], consumeErrors=True).addCallback(resolved)

    def _judge(self, target: Target, current: dict[Any, Target]) -> Target | Deferred[Target]:
        """
        C{target} with the IP address its checks connect to, judged for its
        owner now or (a name not resolved yet) once resolved.

        @raise AddressRefused: when its address may not be checked.
        """
        owner = target.owner
        if target.ip is not None:
            try:
                ip = ip_address(target.ip)
            except ValueError:
                raise AddressRefused(f"is pinned to {target.ip!r}, not an IP address") from None
            reason = self.targets.refusal(ip, owner)
            if reason is not None:
                raise AddressRefused(f"is pinned to {ip}, which {reason}")
            return target
        parsed = parse_address(target.host)
        if not isinstance(parsed, str):
            reason = self.targets.refusal(parsed, owner)
            if reason is not None:
                raise AddressRefused(reason)
            return target if str(parsed) == target.host else evolve(target, ip=str(parsed))
        known = current.get(_place(target))
        if known is not None and known.ip is not None:
            # Followed before (an update, a recheck): keep the address the
            # name was resolved to then, never a new lookup's.
            reason = self.targets.refusal(ip_address(known.ip), owner)
            if reason is not None:
                raise AddressRefused(f"resolved to {known.ip}, which {reason}")
            return known
        return self.targets.resolve(parsed, owner).addCallback(
            lambda ip: evolve(target, ip=str(ip))
        )

    def _apply(
        self,
        module_id: str,
        generation: int,
        ready: list[Target],
        refused: list[tuple[Target, str, str]],
    ) -> None:
        scheduler = self.scheduler
        if scheduler is None or self._generations.get(module_id) != generation:
            return  # stopped, or followed again meanwhile
        scheduler.set_targets(module_id, ready)
        for target, output, why in refused:
            self.log.warn(
                "Not checking API {api_index} of {module_id} ({host}:{port}, owner {owner}): "
                "{output}: {why}",
                api_index=target.api_index,
                module_id=module_id,
                host=target.host,
                port=target.port,
                owner=target.owner,
                output=output,
                why=why,
            )
            # Later, not now: this may run inside the registry's notification
            # of the change being followed, and a status change must not
            # overtake it.
            self.clock.callLater(0, self._report, target, ProbeResult(False, output, why))

    def _report(self, target: Target, result: ProbeResult) -> None:
        output = result.output
        detail = result.detail
        if not is_output(output):
            # Only the fixed vocabulary is ever published.
            output, detail = ERROR, f"{result.output!r} {detail}".strip()
        status = PASSING if result.passing else CRITICAL
        where = CheckTarget(target.host, target.port, target.spec)
        d = self.registry.set_status(target.module_id, target.api_index, where, status, output)

        def recorded(change: Change | None) -> None:
            if change is not None and detail:
                self.log.info(
                    "Check of API {api_index} of {module_id} ({address}:{port}): "
                    "{status}, {output} ({detail})",
                    api_index=target.api_index,
                    module_id=target.module_id,
                    address=target.connect_to,
                    port=target.port,
                    owner=target.owner,
                    status=status,
                    output=output,
                    detail=detail,
                )

        d.addCallback(recorded)
        d.addErrback(
            lambda f: self.log.failure(
                "Could not record the {status} check of {module_id}",
                f,
                status=status,
                module_id=target.module_id,
            )
        )


def _why(target: Target, failure: Failure) -> str:
    if isinstance(failure.value, AddressRefused):
        return f"{target.host!r} {failure.value.reason}"
    return f"{target.host!r} could not be resolved: {failure.getErrorMessage()}"

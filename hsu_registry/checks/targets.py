# -*- test-case-name: tests.test_check_targets -*-
"""
Where health checks may go, decided when an API is published.

L{CheckTargets.vet} reads every checked API's address strictly, resolves
host names once (off the reactor thread, bounded in time), pins the address
a name resolved to in the check (L{CheckSpec.ip}) so later checks never look
it up again, and refuses, as a 400 naming the API, any address a check of
the publishing identity may not reach (L{hsu_registry.checks.addresses}).
It also refuses a publish that would give the identity more checked APIs
than its limit (L{CheckLimitExceeded}, 403).

The same object is the health checker's policy
(L{hsu_registry.checks.service.HealthCheckService} judges every target again
before checking it, against the registration's owner) and keeps the count
of checked APIs per identity (L{CheckUsage}) that the limit needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from ipaddress import ip_address
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IReactorTime, IResolutionReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hsu_registry.checks.addresses import (
    Address,
    AddressRefused,
    Network,
    host_addresses,
    parse_address,
    refusal,
)
from hsu_registry.checks.limits import DEFAULT_CHECK_LIMITS, CheckLimitExceeded, CheckLimits
from hsu_registry.checks.spec import go_duration
from hsu_registry.errors import InvalidRequest
from hsu_registry.model import DEFAULT_CHECK_HOST, PublishRequest

__all__ = ["CheckTargets", "CheckUsage", "no_extra_networks"]

log = Logger()


def no_extra_networks(principal: str) -> Sequence[Network]:
    """The default policy: no identity's checks reach beyond this host."""
    return ()


class CheckUsage:
    """
    How many checked APIs each identity has registered, module by module:
    the health checker records what it follows, and L{CheckTargets.vet}
    reads it to enforce L{CheckLimits.max_checked_apis}.
    """

    def __init__(self) -> None:
        self._modules: dict[str, tuple[str, int]] = {}
        self._owners: dict[str, int] = {}

    def set(self, module_id: str, owner: str, count: int) -> None:
        """Record that C{module_id}, owned by C{owner}, has C{count} checked APIs."""
        self.discard(module_id)
        if count > 0:
            self._modules[module_id] = (owner, count)
            self._owners[owner] = self._owners.get(owner, 0) + count

    def discard(self, module_id: str) -> None:
        """Forget C{module_id} (unpublished, expired, or no checks left)."""
        previous = self._modules.pop(module_id, None)
        if previous is not None:
            owner, count = previous
            left = self._owners[owner] - count
            if left:
                self._owners[owner] = left
            else:
                del self._owners[owner]

    def of(self, owner: str) -> int:
        """C{owner}'s checked APIs, over all its modules."""
        return self._owners.get(owner, 0)

    def others(self, owner: str, module_id: str) -> int:
        """C{owner}'s checked APIs in modules other than C{module_id}."""
        mine = self._modules.get(module_id)
        return self.of(owner) - (mine[1] if mine is not None and mine[0] == owner else 0)


@implementer(IResolutionReceiver)
class _Collect:
    """Gathers a resolution's addresses; fires C{done} with them when complete."""

    def __init__(self) -> None:
        self.done: Deferred[list[Address]] = Deferred()
        self.addresses: list[Address] = []

    def resolutionBegan(self, resolutionInProgress: object) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        try:
            self.addresses.append(ip_address(address.host))
        except (AttributeError, ValueError):
            pass

    def resolutionComplete(self) -> None:
        if not self.done.called:
            self.done.callback(self.addresses)


class CheckTargets:
    """
    The addresses health checks may connect to, and the per-identity bounds
    on them.

    @param reactor: resolves host names (an C{IReactorPluggableNameResolver}:
        Twisted's default resolver runs C{getaddrinfo} in threads, so the
        reactor never blocks).
    @param extra_networks: the networks, beyond loopback and this host's own
        addresses, that checks of an identity (given its principal) may reach.
    @param clock: the timer bounding lookups; default: C{reactor}.
    @param limits: the per-identity bounds.
    @param local_addresses: reads this host's own addresses (at construction
        and on L{refresh}); default: the kernel's tables in C{/proc}.
    """

    def __init__(
        self,
        reactor: Any,
        extra_networks: Callable[[str], Sequence[Network]] = no_extra_networks,
        *,
        clock: IReactorTime | None = None,
        limits: CheckLimits = DEFAULT_CHECK_LIMITS,
        local_addresses: Callable[[], Iterable[Address]] = host_addresses,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self.extra_networks = extra_networks
        self.limits = limits
        self.usage = CheckUsage()
        self._local_addresses = local_addresses
        self.own_addresses: frozenset[Address] = frozenset(local_addresses())

    def refresh(self) -> frozenset[Address]:
        """
        Read this host's own addresses again (on SIGHUP, say): checks
        published from now on, and targets the checker judges again, see
        the new set.

        @return: the addresses now counted as this host's own.
        """
        addresses = frozenset(self._local_addresses())
        if addresses != self.own_addresses:
            log.info(
                "Health checks now count {count} addresses as this host's own: {addresses}",
                count=len(addresses),
                addresses=", ".join(sorted(str(a) for a in addresses)),
            )
        self.own_addresses = addresses
        return addresses

    def refusal(self, ip: Address, principal: str) -> str | None:
        """
        Why a check of C{principal}'s may not connect to C{ip}, or L{None}
        when it may (see L{hsu_registry.checks.addresses.refusal}).
        """
        return refusal(ip, principal, self.own_addresses, self.extra_networks(principal))

    def check_quota(self, module_id: str, principal: str, checked: int) -> None:
        """
        Refuse a publish of C{module_id} with C{checked} checked APIs when it
        would give C{principal} more than its limit (the module's current
        checks, being replaced, do not count).

        @raise CheckLimitExceeded: naming the limit.
        """
        limit = self.limits.max_checked_apis
        total = self.usage.others(principal, module_id) + checked
        if total > limit:
            raise CheckLimitExceeded(
                f"identity {principal or '(unknown)'} may have at most {limit} APIs with "
                f"health checks (the limit of checked APIs per identity); this publish "
                f"would make {total}",
                {
                    "moduleID": module_id,
                    "limit": "checkedAPIsPerIdentity",
                    "max": limit,
                    "requested": total,
                },
            )

    def vet(
        self, request: PublishRequest, principal: str
    ) -> PublishRequest | Deferred[PublishRequest]:
        """
        Check where the checks of C{request} would connect, for C{principal}.

        A request without checks is returned as it is, at once (the common
        publish pays nothing); one whose checked APIs all have IP addresses
        (or none: the registry's host, C{127.0.0.1}) is answered at once too.
        Host names are resolved, all at once, and a L{Deferred} fires with
        the request when they are; each checked API's C{check} then carries
        the address its checks connect to (L{CheckSpec.ip}) when that is not
        its address as published.

        @return: the request (checks pinned), or a L{Deferred} of it.
        @raise InvalidRequest: (or the Deferred fails with it) naming the
            first API whose address a check may not reach, and why.
        @raise CheckLimitExceeded: when C{principal} would have more checked
            APIs than its limit.
        """
        checked = [i for i, api in enumerate(request.apis) if api.check is not None]
        if not checked:
            return request
        self.check_quota(request.module_id, principal, len(checked))
        pins: dict[int, str] = {}
        names: dict[str, list[int]] = {}
        for i in checked:
            text = request.apis[i].address or DEFAULT_CHECK_HOST
            try:
                parsed = parse_address(text)
            except AddressRefused as e:
                raise _invalid(request, i, e.reason) from None
            if isinstance(parsed, str):
                names.setdefault(parsed, []).append(i)
                continue
            reason = self.refusal(parsed, principal)
            if reason is not None:
                raise _invalid(request, i, reason)
            if str(parsed) != text:
                pins[i] = str(parsed)
        if not names:
            return _pinned(request, pins)
        if len(names) > self.limits.max_names:
            raise InvalidRequest(
                f"apis name {len(names)} different hosts to check; at most "
                f"{self.limits.max_names} names per publish are resolved (give IP addresses)",
                {"moduleID": request.module_id},
            )
        lookups = [self.resolve(name, principal) for name in names]

        def resolved(results: list[tuple[bool, Any]]) -> PublishRequest:
            for indexes, (ok, value) in zip(names.values(), results, strict=True):
                if not ok:
                    raise _invalid(request, indexes[0], _reason(value, request.module_id))
                for i in indexes:
                    pins[i] = str(value)
            return _pinned(request, pins)

        return DeferredList(lookups, consumeErrors=True).addCallback(resolved)

    def resolve(self, name: str, principal: str) -> Deferred[Address]:
        """
        Resolve C{name} once, off the reactor thread, and judge every address
        it resolves to for C{principal}.

        @return: a L{Deferred} firing with the first address; it fails with
            L{AddressRefused} when the name does not resolve (in
            L{CheckLimits.resolve_timeout} seconds) or resolves to any
            address a check of C{principal}'s may not reach.
        """
        resolver = getattr(self._reactor, "nameResolver", None)
        if resolver is None:
            return fail(AddressRefused("cannot be resolved (the registry has no resolver)"))
        receiver = _Collect()
        try:
            resolver.resolveHostName(receiver, name, 0, None, "TCP")
        except Exception as e:
            log.failure("Resolving {name} for a health check failed", name=name)
            return fail(AddressRefused(f"could not be resolved ({type(e).__name__})"))
        done = receiver.done
        wait = self.limits.resolve_timeout

        def give_up() -> None:
            if not done.called:
                done.errback(AddressRefused(f"did not resolve within {go_duration(wait)}"))

        timer = self._clock.callLater(wait, give_up)

        def judge(addresses: list[Address]) -> Address:
            if timer.active():
                timer.cancel()
            unique = list(dict.fromkeys(addresses))
            if not unique:
                raise AddressRefused("does not resolve to any address")
            for ip in unique:
                reason = self.refusal(ip, principal)
                if reason is not None:
                    raise AddressRefused(f"resolves to {ip}, which {reason}")
            log.debug(
                "{name} resolves to {addresses}; health checks connect to {ip}",
                name=name,
                addresses=", ".join(str(a) for a in unique),
                ip=str(unique[0]),
            )
            return unique[0]

        return done.addCallback(judge)


def _invalid(request: PublishRequest, index: int, reason: str) -> InvalidRequest:
    where = f"apis[{index}].address"
    text = request.apis[index].address or DEFAULT_CHECK_HOST
    return InvalidRequest(
        f"{where} {text!r} {reason}; a health check may not connect there",
        {"moduleID": request.module_id, "field": where},
    )


def _reason(failure: Failure, module_id: str) -> str:
    if isinstance(failure.value, AddressRefused):
        return failure.value.reason
    log.failure("Resolving a name of {module_id} failed", failure, module_id=module_id)
    return "could not be resolved"


def _pinned(request: PublishRequest, pins: dict[int, str]) -> PublishRequest:
    """C{request} with each checked API's check pinned to C{pins}' address (or none)."""
    apis = tuple(
        api
        if api.check is None or api.check.ip == pins.get(i)
        else evolve(api, check=api.check.pinned(pins.get(i)))
        for i, api in enumerate(request.apis)
    )
    if all(new is old for new, old in zip(apis, request.apis, strict=True)):
        return request
    return evolve(request, apis=apis)

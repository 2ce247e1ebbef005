# -*- test-case-name: tests.test_registry -*-
"""
The registry: the in-memory truth about which module serves which APIs.

Every write flows one way: decide here, persist through the L{IStore}, and
only once the store has acknowledged it apply the change in memory, bump the
change index and tell the observers.  A failed persist leaves memory as it
was.  Mutations of one module are serialised, so each one decides on the state
its predecessor left.  Reads are answered from memory and never touch the
store; discovery refreshes a last-seen time kept beside the frozen records, and
an expiry heap ordered by time lets a cleanup pass look only at what may have
expired.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from functools import partial
from typing import TypeVar

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hsu_registry import gctune
from hsu_registry.errors import (
    Forbidden,
    ModuleNotFound,
    NotOwner,
    RegistryError,
    RegistryFull,
    StoreUnavailable,
)
from hsu_registry.gctune import Table
from hsu_registry.interfaces import IProcessMonitor, IRegistry, IStore
from hsu_registry.model import (
    STATUSES,
    UNKNOWN,
    UNKNOWN_OWNER,
    CheckTarget,
    ModuleAPI,
    PlainRegistration,
    PublishRequest,
    Registration,
)
from hsu_registry.processes.table import ProcessIdentity
from hsu_registry.security.identity import ANONYMOUS, Identity
from hsu_registry.security.limits import OwnerUsage, Quotas, RateLimiter
from hsu_registry.security.policy import Policy, default_policy

__all__ = ["Change", "ChangeKind", "HealthStatus", "Registry"]

T = TypeVar("T")


class ChangeKind(enum.Enum):
    """What a mutation did to a module's registration."""

    PUBLISHED = "published"
    UPDATED = "updated"
    UNPUBLISHED = "unpublished"
    EXPIRED = "expired"
    #: A health check changed the status of one of its APIs.
    STATUS = "status"


@frozen
class Change:
    """
    One mutation: its place in the change index, its kind, and the
    registration it produced (or removed).
    """

    index: int
    kind: ChangeKind
    module_id: str
    registration: Registration


@frozen
class HealthStatus:
    """The figures the health endpoint reports."""

    registered_modules: int
    total_apis: int
    uptime: float


Observer = Callable[[Change], object]


@implementer(IRegistry)
class Registry:
    """
    The registry logic over an L{IStore}, with time read from an injected clock.

    @param stale_after: seconds without a heartbeat after which a module is no
        longer discoverable.
    @param expire_after: seconds without a heartbeat after which L{expire}
        removes a module; not less than C{stale_after}.
    @param max_modules: the most registrations held at once.
    @param expire_batch: how many expired modules one reactor turn removes.
    @param discover_heartbeat: whether discovery refreshes a module's
        last-seen time, as in the original (on by default for compatibility).
    @param processes: what binds registrations to the processes that
        published them over a unix socket; L{None} binds none.  A bound
        registration lives exactly as long as its process: it never goes
        stale or expires while the process runs, and is removed as soon as
        the process exits.
    @param policy: who may publish and administer (see
        L{hsu_registry.security.policy}); by default anyone may publish.
        Whatever the policy, a registration belongs to the identity that
        created it: only that identity or an admin may publish it again,
        heartbeat or unpublish it (unless the policy is open).
    """

    log = Logger()

    def __init__(
        self,
        store: IStore,
        clock: IReactorTime,
        stale_after: float = 300.0,
        expire_after: float = 600.0,
        max_modules: int = 100_000,
        epoch: str | None = None,
        expire_batch: int = 100,
        discover_heartbeat: bool = True,
        processes: IProcessMonitor | None = None,
        policy: Policy | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        if expire_after < stale_after:
            raise ValueError("expire_after must not be less than stale_after")
        self._store = store
        self._clock = clock
        self.stale_after = stale_after
        self.expire_after = expire_after
        self.max_modules = max_modules
        self.expire_batch = expire_batch
        self.discover_heartbeat = discover_heartbeat
        # Who may do what (replaced as a whole on reload); ownership is
        # enforced here, on every write, unless the policy is open.
        self.policy = policy if policy is not None else default_policy()
        # Per-identity rates and quotas (admins are exempt): see
        # hsu_registry.security.limits.
        self.quotas = quotas if quotas is not None else Quotas()
        self.write_limiter = RateLimiter(
            self.quotas.write_rate, self.quotas.write_burst, "writes", self.quotas.max_tracked
        )
        self.read_limiter = RateLimiter(
            self.quotas.read_rate,
            self.quotas.read_burst,
            "expensive reads",
            self.quotas.max_tracked,
        )
        self.usage = OwnerUsage()
        self.index = 0
        self.epoch = epoch if epoch is not None else uuid.uuid4().hex
        self.started_at = clock.seconds()
        # Registrations as plain tuples of atomic values (see model.
        # PlainRegistration): untracked by the cyclic GC.
        self._modules: Table[str, PlainRegistration] = Table()
        self._last_seen: dict[str, float] = {}
        self._total_apis = 0
        # Service ID -> the modules serving it, as dict keys: O(1) to add and
        # remove however many modules share a service, and a dict of strings
        # to None is never tracked by the cyclic GC.
        self._by_service: Table[str, dict[str, None]] = Table()
        # Expiry heap of (last seen when pushed, token, module ID): one live
        # entry per module, found again by its token; refreshed lazily on pop.
        self._expiry: list[tuple[float, int, str]] = []
        self._expiry_token: dict[str, int] = {}
        self._tokens = itertools.count()
        # Heartbeats not yet handed to the store.
        self._touched: set[str] = set()
        # Per-module tail of the chain of pending mutations.
        self._tails: dict[str, Deferred[None]] = {}
        self._reserved = 0
        self._observers: list[Observer] = []
        # Process-bound registrations: module -> process, and process ->
        # its modules (one watch per process, however many modules).
        self._processes = processes
        self._bound: dict[str, ProcessIdentity] = {}
        self._by_process: dict[ProcessIdentity, dict[str, None]] = {}
        # Modules of exited processes waiting for removal, drained
        # expire_batch per reactor turn.
        self._exits: deque[tuple[str, ProcessIdentity]] = deque()
        # Modules whose expiry is being written to the store: health check
        # results for them are dropped (they are going).
        self._expiring: set[str] = set()

    # -- reads -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Registration]:
        return map(Registration.from_plain, list(self._modules.values()))

    @property
    def clock(self) -> IReactorTime:
        return self._clock

    def registrations(self) -> Iterator[tuple[Registration, float]]:
        """Every registration with its last-seen time (a snapshot)."""
        seen = self._last_seen
        for module_id, plain in list(self._modules.items()):
            yield Registration.from_plain(plain), seen[module_id]

    def providers(self, service_id: str) -> list[tuple[Registration, float]]:
        """The registrations with an API serving C{service_id}, and their last-seen times."""
        out = []
        for module_id in list(self._by_service.get(service_id, {})):
            plain = self._modules.get(module_id)
            if plain is not None:
                out.append((Registration.from_plain(plain), self._last_seen[module_id]))
        return out

    def get(self, module_id: str) -> Registration | None:
        plain = self._modules.get(module_id)
        return None if plain is None else Registration.from_plain(plain)

    def last_seen(self, module_id: str) -> float | None:
        """The last heartbeat time of C{module_id}, or L{None} when unknown."""
        return self._last_seen.get(module_id)

    def binding(self, module_id: str) -> ProcessIdentity | None:
        """The process C{module_id}'s registration is bound to, if any."""
        return self._bound.get(module_id)

    def is_stale(self, module_id: str, now: float) -> bool:
        """
        Whether C{module_id} is registered but not discoverable: not seen for
        C{stale_after} and not bound to a running process.
        """
        seen = self._last_seen.get(module_id)
        if seen is None or module_id in self._bound:
            return False
        return now - seen > self.stale_after

    @property
    def bound_processes(self) -> int:
        """How many distinct processes the bound registrations belong to."""
        return len(self._by_process)

    def discover(self, module_id: str) -> Registration:
        plain = self._modules.get(module_id)
        if plain is None:
            raise ModuleNotFound(module_id)
        now = self._clock.seconds()
        if now - self._last_seen[module_id] > self.stale_after and module_id not in self._bound:
            raise ModuleNotFound(module_id)
        if self.discover_heartbeat:
            self._last_seen[module_id] = now
            self._touched.add(module_id)
        return Registration.from_plain(plain)

    def heartbeat(
        self, module_id: str, process_id: int | None = None, identity: Identity = ANONYMOUS
    ) -> None:
        """
        Refresh C{module_id}'s last-seen time (its owner says it is alive);
        with C{process_id}, only for the owning process.  Batched to the store
        like every heartbeat.  From a unix-socket peer that is the owning
        process (or its child), it binds the registration to that process:
        how bindings come back after the registry restarted.

        @raise ModuleNotFound: when the module is not registered (it expired,
            or the registry restarted empty: publish again).
        @raise Forbidden: when C{identity} is not its owner (nor an admin).
        @raise NotOwner: when another process owns it.
        """
        plain = self._modules.get(module_id)
        if plain is None:
            raise ModuleNotFound(module_id)
        refused = self._write_refusal("heartbeat", module_id, identity, plain)
        if refused is not None:
            raise refused
        if process_id is not None and process_id != plain[1]:
            raise NotOwner(
                f"module {module_id!r} is registered by another process",
                {"moduleID": module_id, "processID": process_id, "registeredProcessID": plain[1]},
            )
        self._last_seen[module_id] = self._clock.seconds()
        self._touched.add(module_id)
        process = self._identify(identity, plain[1])
        if process is not None:
            self._rebind(module_id, process, plain[1])

    def health(self) -> HealthStatus:
        return HealthStatus(
            registered_modules=len(self._modules),
            total_apis=self._total_apis,
            uptime=self._clock.seconds() - self.started_at,
        )

    # -- observers -------------------------------------------------------

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        self._observers.append(observer)

        def unsubscribe() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return unsubscribe

    def _notify(self, change: Change) -> None:
        for observer in list(self._observers):
            try:
                observer(change)
            except Exception:
                self.log.failure(
                    "Change observer {observer!r} failed on index {index}",
                    observer=observer,
                    index=change.index,
                )

    def _record(self, kind: ChangeKind, registration: Registration) -> Change:
        self.index += 1
        change = Change(self.index, kind, registration.module_id, registration)
        self._notify(change)
        return change

    # -- start-up --------------------------------------------------------

    def load(self) -> Deferred[int]:
        def loaded(records: list) -> int:
            for record in records:
                registration = record.registration
                if registration.module_id in self._modules:
                    continue
                if registration.has_checks:
                    # Statuses are measured, not stored: unknown until checked.
                    registration = _with_apis(
                        registration, tuple(_unchecked(api) for api in registration.apis)
                    )
                self._insert(registration, record.last_seen)
            self.log.info("Loaded {count} registrations from the store", count=len(records))
            return len(records)

        return self._store.load().addCallback(loaded)

    # -- mutations -------------------------------------------------------

    def _serialised(self, module_id: str, operation: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Run C{operation} after every earlier mutation of C{module_id} has finished."""
        tail = self._tails.get(module_id)
        if tail is None:
            result: Deferred[T] = maybeDeferred(operation)
            if result.called:
                return result  # synchronous store: nothing to queue behind
        else:
            result = Deferred()

            def run(_: object) -> None:
                maybeDeferred(operation).chainDeferred(result)

            tail.addCallback(run)
        marker: Deferred[None] = Deferred()
        self._tails[module_id] = marker

        def finished(outcome: object) -> object:
            if self._tails.get(module_id) is marker:
                del self._tails[module_id]
            marker.callback(None)
            return outcome

        result.addBoth(finished)
        return result

    def _persist_failed(self, failure: Failure, action: str, module_id: str) -> Failure:
        """Log a store failure and turn it into the L{StoreUnavailable} the API answers."""
        if failure.check(RegistryError):
            return failure
        self.log.failure(
            "Store failed to {action} {module_id}; nothing changed",
            failure,
            action=action,
            module_id=module_id,
        )
        return Failure(
            StoreUnavailable(
                "the registry's store is unavailable; nothing was changed",
                {"moduleID": module_id},
            )
        )

    def publish(
        self, request: PublishRequest, identity: Identity = ANONYMOUS
    ) -> Deferred[Change | None]:
        return self._serialised(request.module_id, lambda: self._publish(request, identity))

    def spend(self, limiter: RateLimiter, identity: Identity) -> None:
        """
        Spend one of C{identity}'s requests from C{limiter} (admins are not
        limited).  The HTTP API spends before each write and expensive read:
        rates bound callers at the edge, not the host application's own
        calls.

        @raise TooManyRequests: when it has none left for now.
        """
        if not self.policy.open and not self.policy.is_admin(identity):
            limiter.take(identity.principal, self._clock.seconds())

    def _publish(self, request: PublishRequest, caller: Identity) -> Deferred[Change | None]:
        now = self._clock.seconds()
        existing = self._modules.get(request.module_id)
        refused = self._write_refusal(
            "publish",
            request.module_id,
            caller,
            existing,
            {sid for api in request.apis for sid in api.service_ids},
        )
        if refused is not None:
            return fail(refused)
        identity = self._identify(caller, request.process_id)
        if existing is None:
            if len(self._modules) + self._reserved >= self.max_modules:
                return fail(
                    RegistryFull(
                        f"the registry holds its maximum of {self.max_modules} modules",
                        {"maxModules": self.max_modules},
                    )
                )
            self._reserved += 1
        apis = request.apis
        if existing is not None and any(api.check is not None for api in apis):
            # Checked APIs published again keep the status their checks found.
            apis = _carry_statuses(apis, Registration.from_plain(existing).apis)
        owner = existing[5] if existing is not None else UNKNOWN_OWNER
        registration = Registration.create(
            module_id=request.module_id,
            process_id=request.process_id,
            apis=apis,
            registered_at=existing[2] if existing is not None else now,
            # An admin's publish keeps the owner; an unknown owner is claimed.
            owner=owner or caller.principal,
        )
        if existing is not None and existing[1:4] == registration.plain()[1:4] and owner:
            # The same content again, a module's periodic re-publish: a
            # heartbeat.  Nothing to persist now (last-seen times are flushed
            # in batches), no change to index or announce.
            self._last_seen[request.module_id] = now
            self._touched.add(request.module_id)
            self._rebind(request.module_id, identity, request.process_id)
            self.log.debug(
                "Refreshed module {module_id} (process {process_id})",
                module_id=request.module_id,
                process_id=request.process_id,
            )
            return succeed(None)

        if not self.policy.open and not self.policy.is_admin(caller):
            previous = Registration.from_plain(existing) if existing is not None else None
            exceeded = self.usage.refusal(self.quotas, registration, previous)
            if exceeded is not None:
                if existing is None:
                    self._reserved -= 1
                self.log.warn(
                    "Refused publish of module {module_id} by {identity}: {reason}",
                    module_id=request.module_id,
                    identity=caller.principal,
                    reason=exceeded.message,
                    audit=True,
                )
                return fail(exceeded)

        def release(outcome: object) -> object:
            if existing is None:
                self._reserved -= 1
            return outcome

        d = self._store.save(registration, now)
        d.addBoth(release)
        d.addErrback(self._persist_failed, "save", request.module_id)
        if existing is not None and not owner:
            d.addCallback(lambda _: self._claimed(request.module_id, registration.owner))
        return d.addCallback(lambda _: self._apply_publish(registration, now, identity))

    def _apply_publish(
        self, registration: Registration, now: float, identity: ProcessIdentity | None
    ) -> Change:
        module_id = registration.module_id
        previous = self._modules.get(module_id)
        if previous is None:
            self._insert(registration, now)
            kind = ChangeKind.PUBLISHED
        else:
            replaced = Registration.from_plain(previous)
            self._index_services(replaced, add=False)
            self._index_services(registration, add=True)
            self.usage.remove(replaced)
            self.usage.add(registration)
            self._modules[module_id] = registration.plain()
            self._total_apis += registration.api_count - previous[4]
            self._last_seen[module_id] = now
            gctune.replaced()
            kind = ChangeKind.UPDATED
        self._touched.discard(module_id)
        self._rebind(module_id, identity, registration.process_id, quiet=True)
        change = self._record(kind, registration)
        bound = self._bound.get(module_id)
        self.log.info(
            "{kind} module {module_id} (process {process_id}, {api_count} APIs, index {index}"
            ", owner {owner}{binding})",
            kind=kind.value.capitalize(),
            owner=registration.owner or "unknown",
            module_id=module_id,
            process_id=registration.process_id,
            api_count=registration.api_count,
            index=change.index,
            bound_pid=bound.pid if bound is not None else None,
            binding=", bound to the process" if bound is not None else "",
        )
        return change

    def _index_services(self, registration: Registration, add: bool) -> None:
        module_id = registration.module_id
        for service_id in {sid for api in registration.apis for sid in api.service_ids}:
            providers = self._by_service.get(service_id)
            if add:
                if providers is None:
                    self._by_service[service_id] = providers = {}
                providers[module_id] = None
            elif providers is not None:
                providers.pop(module_id, None)
                if not providers:
                    del self._by_service[service_id]

    def _insert(self, registration: Registration, last_seen: float) -> None:
        module_id = registration.module_id
        self._index_services(registration, add=True)
        self.usage.add(registration)
        self._modules[module_id] = registration.plain()
        self._last_seen[module_id] = last_seen
        self._total_apis += registration.api_count
        self._push_expiry(module_id, last_seen)

    def _push_expiry(self, module_id: str, seen: float) -> None:
        token = next(self._tokens)
        self._expiry_token[module_id] = token
        heapq.heappush(self._expiry, (seen, token, module_id))

    # -- health checks ---------------------------------------------------

    def set_status(
        self, module_id: str, api_index: int, target: CheckTarget, status: str, output: str = ""
    ) -> Deferred[Change | None]:
        """
        Record what a health check of API C{api_index} of C{module_id} found.
        A new status (with the check's C{output}, which answers show as
        C{checkOutput}) re-encodes the registration, bumps the change index and
        is announced as a C{status} change; the same status again, or a
        result for a check the module no longer has, changes nothing.
        Statuses live in memory only: after a restart they are unknown until
        checked again.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        return self._serialised(
            module_id,
            lambda: succeed(self._apply_status(module_id, api_index, target, status, output)),
        )

    def _apply_status(
        self, module_id: str, api_index: int, target: CheckTarget, status: str, output: str
    ) -> Change | None:
        plain = self._modules.get(module_id)
        if plain is None or module_id in self._expiring:
            return None
        current = Registration.from_plain(plain)
        apis = current.apis
        if api_index >= len(apis) or apis[api_index].check_target() != target:
            return None  # re-published meanwhile: a result for an old check or place
        before = apis[api_index].status
        if before == status:
            return None
        changed = list(apis)
        changed[api_index] = evolve(apis[api_index], status=status, output=output or None)
        registration = _with_apis(current, tuple(changed))
        self._modules[module_id] = registration.plain()
        gctune.replaced()
        change = self._record(ChangeKind.STATUS, registration)
        self.log.info(
            "API {api_index} of module {module_id} is {status} (was {before}): {output}"
            " (index {index})",
            api_index=api_index,
            module_id=module_id,
            status=status,
            before=before,
            output=output,
            index=change.index,
        )
        return change

    # -- process binding -------------------------------------------------

    def _identify(self, caller: Identity, process_id: int) -> ProcessIdentity | None:
        """The process to bind to: only one the kernel says the caller is (see monitor)."""
        if caller.pid is None or self._processes is None:
            return None
        return self._processes.identify(caller.pid, process_id, caller.uid)

    # -- ownership -------------------------------------------------------

    def _write_refusal(
        self,
        action: str,
        module_id: str,
        caller: Identity,
        existing: PlainRegistration | None,
        service_ids: set[str] | None = None,
    ) -> Forbidden | None:
        """
        Why C{caller} may not C{action} C{module_id} (a L{Forbidden} to raise,
        logged for the audit trail), or L{None}.  The owner is not named: the
        caller may not be allowed to know it.
        """
        policy = self.policy
        if policy.open:
            return None
        reason = None
        owner = existing[5] if existing is not None else UNKNOWN_OWNER
        if owner and owner != caller.principal and not policy.is_admin(caller):
            reason = (
                f"module {module_id!r} belongs to another identity: only its owner or an "
                f"admin may {action} it"
            )
        elif service_ids is not None or not owner:
            # Publishing needs a grant; so does touching a module nobody owns yet.
            reason = policy.publish_refusal(caller, module_id, service_ids or ())
        if reason is None:
            return None
        self.log.warn(
            "Refused {action} of module {module_id} by {identity}: {reason}",
            action=action,
            module_id=module_id,
            identity=caller.principal,
            reason=reason,
            audit=True,
        )
        return Forbidden(reason, {"moduleID": module_id, "identity": caller.principal})

    def _claimed(self, module_id: str, owner: str) -> None:
        self.log.info(
            "Module {module_id} now belongs to {owner} (its owner was not recorded)",
            module_id=module_id,
            owner=owner,
            audit=True,
        )

    def _rebind(
        self,
        module_id: str,
        identity: ProcessIdentity | None,
        process_id: int,
        quiet: bool = False,
    ) -> None:
        """
        Bind C{module_id} to C{identity} after a publish or heartbeat.  Without
        an identity (a publish over TCP, say) a binding stays only while the
        registration still names the bound process.
        """
        current = self._bound.get(module_id)
        if identity is None:
            if current is not None and current.pid != process_id:
                self._unbind(module_id)
            return
        if current == identity:
            return
        if current is not None:
            self._unbind(module_id)
        assert self._processes is not None
        self._bound[module_id] = identity
        modules = self._by_process.get(identity)
        if modules is None:
            self._by_process[identity] = modules = {}
            self._processes.watch(identity, self._process_exited)
        modules[module_id] = None
        if quiet:
            return  # the caller's own log line says so
        self.log.info(
            "Bound module {module_id} to process {pid} (started at tick {start_time})",
            module_id=module_id,
            pid=identity.pid,
            start_time=identity.start_time,
        )

    def _unbind(self, module_id: str) -> None:
        identity = self._bound.pop(module_id, None)
        if identity is None:
            return
        modules = self._by_process.get(identity)
        if modules is not None:
            modules.pop(module_id, None)
            if not modules:
                del self._by_process[identity]
                if self._processes is not None:
                    self._processes.unwatch(identity)

    def _process_exited(self, identity: ProcessIdentity) -> None:
        """
        Remove every registration bound to a process that has exited, at
        most C{expire_batch} per reactor turn: when thousands go at once
        (one process held them, or many processes died together) the reactor
        writes their watch events out between batches, so watchers keep up.
        """
        # Unbind at once: the monitor no longer watches this process, and
        # a late publish that binds to it again must watch it anew.
        modules = self._by_process.pop(identity, None)
        if not modules:
            return
        idle = not self._exits
        for module_id in modules:
            del self._bound[module_id]
            self._exits.append((module_id, identity))
        if idle:
            # Not at once: thousands of processes may exit in the same turn.
            self._clock.callLater(0, self._drain_exits)

    def _drain_exits(self) -> None:
        for _ in range(min(self.expire_batch, len(self._exits))):
            module_id, identity = self._exits.popleft()
            d = self._serialised(module_id, partial(self._expire_bound, module_id, identity))
            d.addErrback(lambda _: None)  # logged by _persist_failed
        if self._exits:
            self._clock.callLater(0, self._drain_exits)

    def _still_dead(self, module_id: str, identity: ProcessIdentity) -> bool:
        """Whether C{module_id} is still the exited process's (not taken over since)."""
        plain = self._modules.get(module_id)
        if plain is None or plain[1] != identity.pid:
            return False
        return self._bound.get(module_id) in (None, identity)

    def _expire_bound(self, module_id: str, identity: ProcessIdentity) -> Deferred[Change | None]:
        if not self._still_dead(module_id, identity):
            return succeed(None)  # removed, or published by another process, since

        def apply(_: object) -> Change | None:
            if not self._still_dead(module_id, identity):
                return None
            registration = self._remove(module_id)
            change = self._record(ChangeKind.EXPIRED, registration)
            self.log.info(
                "Expired module {module_id}: its process {pid} exited (index {index})",
                module_id=module_id,
                pid=identity.pid,
                index=change.index,
            )
            return change

        # On a store failure it stays, unbound: it ages out by time like any
        # unbound module.
        d = self._store.remove([module_id])
        d.addErrback(self._persist_failed, "expire", module_id)
        return d.addCallback(apply)

    def _remove(self, module_id: str) -> Registration:
        self._unbind(module_id)
        plain = self._modules.pop(module_id)
        del self._last_seen[module_id]
        del self._expiry_token[module_id]
        self._touched.discard(module_id)
        self._total_apis -= plain[4]
        registration = Registration.from_plain(plain)
        self._index_services(registration, add=False)
        self.usage.remove(registration)
        return registration

    def unpublish(
        self, module_id: str, process_id: int | None = None, identity: Identity = ANONYMOUS
    ) -> Deferred[Change | None]:
        return self._serialised(module_id, lambda: self._unpublish(module_id, process_id, identity))

    def _unpublish(
        self, module_id: str, process_id: int | None, caller: Identity
    ) -> Deferred[Change | None]:
        existing = self._modules.get(module_id)
        if existing is None:
            return succeed(None)
        refused = self._write_refusal("unpublish", module_id, caller, existing)
        if refused is not None:
            return fail(refused)
        if process_id is not None and process_id != existing[1]:
            self.log.warn(
                "Refused to unpublish {module_id}: process {process_id} does not own it"
                " (owner {owner})",
                module_id=module_id,
                process_id=process_id,
                owner=existing[1],
            )
            return fail(
                NotOwner(
                    f"module {module_id!r} is registered by another process",
                    {
                        "moduleID": module_id,
                        "processID": process_id,
                        "registeredProcessID": existing[1],
                    },
                )
            )

        def apply(_: object) -> Change:
            registration = self._remove(module_id)
            change = self._record(ChangeKind.UNPUBLISHED, registration)
            self.log.info(
                "Unpublished module {module_id} (process {process_id}, index {index}, by "
                "{identity})",
                module_id=module_id,
                process_id=registration.process_id,
                index=change.index,
                identity=caller.principal,
                owner=registration.owner,
            )
            return change

        d = self._store.remove([module_id])
        d.addErrback(self._persist_failed, "remove", module_id)
        d.addErrback(_still_registered, module_id)
        return d.addCallback(apply)

    def expire(self) -> Deferred[list[Change]]:
        """
        Remove the registrations not seen for C{expire_after}, C{expire_batch}
        at a time: between batches the reactor serves requests, so expiring
        tens of thousands of modules at once never stalls it.
        """
        self._see_bound()
        changes: list[Change] = []
        done: Deferred[list[Change]] = Deferred()

        def batch() -> None:
            now = self._clock.seconds()
            victims = self._pop_expired(now - self.expire_after, self.expire_batch)
            if not victims:
                done.callback(changes)
                return
            ids = [plain[0] for plain in victims]
            self._expiring.update(ids)

            def written(outcome: object) -> object:
                self._expiring.difference_update(ids)
                return outcome

            d = self._store.remove(ids)
            d.addBoth(written)
            d.addErrback(self._persist_failed, "expire", "stale modules")
            d.addCallback(lambda _: changes.extend(self._apply_expiry(victims, now)))
            if len(victims) < self.expire_batch:
                d.addCallbacks(lambda _: done.callback(changes), done.errback)
            else:
                d.addCallbacks(lambda _: self._clock.callLater(0, batch), done.errback)

        batch()
        return done

    def _pop_expired(self, cutoff: float, limit: int) -> list[PlainRegistration]:
        """Take up to C{limit} registrations last seen before C{cutoff} off the heap."""
        victims: list[PlainRegistration] = []
        busy: list[str] = []
        heap = self._expiry
        while heap and heap[0][0] < cutoff and len(victims) < limit:
            _, token, module_id = heapq.heappop(heap)
            if self._expiry_token.get(module_id) != token:
                continue  # the module was removed (and maybe published anew)
            seen = self._last_seen[module_id]
            if module_id in self._bound:
                # Alive while its process is: look again an expiry period on.
                self._push_expiry(module_id, cutoff + self.expire_after)
                gctune.replaced()
            elif seen >= cutoff:
                self._push_expiry(module_id, seen)  # refreshed since it was queued
                gctune.replaced()
            elif module_id in self._tails:
                busy.append(module_id)  # a mutation is in flight: look again next pass
            else:
                victims.append(self._modules[module_id])
        for module_id in busy:
            self._push_expiry(module_id, self._last_seen[module_id])
        return victims

    def _apply_expiry(self, victims: list[PlainRegistration], now: float) -> list[Change]:
        changes = []
        for plain in victims:
            module_id = plain[0]
            if self._modules.get(module_id) is not plain:
                # Published again while the store was removing it: it stays,
                # and goes back on the expiry heap.
                if module_id in self._modules:
                    self._push_expiry(module_id, self._last_seen[module_id])
                continue
            changes.append(self._record(ChangeKind.EXPIRED, self._remove(module_id)))
        if changes:
            # One event per batch: formatting a log line per module would cost
            # more than expiring it.
            self.log.info(
                "Expired {count} modules not seen for {expire_after}s: {module_ids} "
                "(indexes {first}-{last})",
                count=len(changes),
                expire_after=self.expire_after,
                module_ids=", ".join(c.module_id for c in changes),
                first=changes[0].index,
                last=changes[-1].index,
            )
        return changes

    def _see_bound(self) -> None:
        """
        Record every bound module as seen now (it is alive while its process
        is), for the next flush to store: a registry restarted from a durable
        store then does not find it stale before its owner's next heartbeat
        binds it again.  Once per cleanup pass: well inside C{stale_after},
        without rewriting every bound row at every flush.
        """
        if self._bound:
            now = self._clock.seconds()
            for module_id in self._bound:
                self._last_seen[module_id] = now
            self._touched.update(self._bound)

    def flush_heartbeats(self) -> Deferred[None]:
        """Hand the heartbeats recorded since the last flush to the store in one batch."""
        if not self._touched:
            return succeed(None)
        batch = {m: self._last_seen[m] for m in self._touched}
        self._touched.clear()  # the same set: it may be frozen (see gctune)
        return self._store.touch(batch)


def _still_registered(failure: Failure, module_id: str) -> Failure:
    """
    An unpublish the store could not record (a full or read-only disk) leaves
    the module registered, in memory as on disk: say exactly that.
    """
    error = failure.value
    if not isinstance(error, StoreUnavailable):
        return failure
    context = dict(error.context or {}, moduleID=module_id, stillRegistered=True)
    return Failure(
        StoreUnavailable(
            f"module {module_id!r} is still registered: the store could not record its "
            "removal, so nothing was changed; unpublish again once the store can write",
            context,
        )
    )


def _unchecked(api: ModuleAPI) -> ModuleAPI:
    return api if api.check is None else evolve(api, status=UNKNOWN, output=None)


def _with_apis(registration: Registration, apis: tuple[ModuleAPI, ...]) -> Registration:
    return Registration.create(
        registration.module_id,
        registration.process_id,
        apis,
        registration.registered_at,
        registration.owner,
    )


def _carry_statuses(
    apis: tuple[ModuleAPI, ...], previous: tuple[ModuleAPI, ...]
) -> tuple[ModuleAPI, ...]:
    """
    C{apis}, each checked one taking the status found before for the same
    check of the same place (whatever its metadata, protocol or services).
    """
    return tuple(
        evolve(api, status=previous[i].status, output=previous[i].output)
        if api.check is not None
        and i < len(previous)
        and previous[i].check_target() == api.check_target()
        else api
        for i, api in enumerate(apis)
    )

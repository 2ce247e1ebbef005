# -*- test-case-name: tests.test_registry,tests.test_store -*-
"""
The seams of hsu-registry: the registry that the HTTP API talks to, and the
store that persists what the registry decides.

Writes through a store always return Deferreds, so the registry never cares
whether the backend is memory, SQLite or a replicated engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from hsu_registry.security.identity import ANONYMOUS, Identity
from hsu_registry.security.limits import RateLimiter

if TYPE_CHECKING:
    from hsu_registry.model import CheckTarget, PublishRequest, Registration
    from hsu_registry.processes.table import ProcessIdentity
    from hsu_registry.registry import Change, HealthStatus
    from hsu_registry.stores import StoredRegistration

__all__ = ["IProcessMonitor", "IRegistry", "IStore"]


class IStore(Interface):
    """
    Durable storage for registrations.  The registry serves every read from
    memory; the store is written before a change is acknowledged and read
    once, on start.
    """

    def load() -> Deferred[list[StoredRegistration]]:
        """
        Read every stored registration.

        @return: a Deferred firing with a list of
            L{hsu_registry.stores.StoredRegistration}.
        """

    def save(registration: Registration, last_seen: float) -> Deferred[None]:
        """
        Persist a new or replaced registration.

        @return: a Deferred firing with L{None} once the change is durable;
            it fails with L{hsu_registry.errors.StoreUnavailable} when it is not.
        """

    def remove(module_ids: Iterable[str]) -> Deferred[None]:
        """
        Delete the registrations of the given module IDs (unknown IDs are
        ignored).

        @return: a Deferred firing with L{None} once the removal is durable.
        """

    def touch(last_seen: Mapping[str, float]) -> Deferred[None]:
        """
        Record heartbeat times, a mapping of module ID to last-seen time.
        Stores may batch these; losing some only moves expiry by that window.

        @return: a Deferred firing with L{None}.
        """

    def close() -> Deferred[None]:
        """
        Flush what is pending and release resources.

        @return: a Deferred firing with L{None}.
        """


class IProcessMonitor(Interface):
    """
    Knows which process a unix-socket peer is and calls back when a watched
    process exits: what process-bound registrations are built on.
    """

    def identify(peer: int, process_id: int, uid: int | None = None) -> ProcessIdentity | None:
        """
        @param peer: the PID of the connection's peer (from C{SO_PEERCRED}).
        @param uid: the peer's uid (from C{SO_PEERCRED}): a parent of another
            uid is never bound to.
        @param process_id: the process ID a module published.
        @return: the process to bind the registration to (the peer, or the
            peer's parent, when C{process_id} names it), or L{None}.
        """

    def alive(identity: ProcessIdentity) -> bool:
        """
        @return: whether that very process (PID and start time) is running.
        """

    def watch(identity: ProcessIdentity, on_exit: Callable[[ProcessIdentity], object]) -> None:
        """
        Call C{on_exit(identity)} once, from the reactor, when the process
        exits (or soon, when it is gone already).
        """

    def unwatch(identity: ProcessIdentity) -> None:
        """
        Stop watching C{identity}.
        """

    def close() -> None:
        """
        Stop watching every process.
        """


class IRegistry(Interface):
    """
    The registry: the in-memory truth about which module serves what.
    """

    index = Attribute("The change index: an int incremented by every mutation, never decreasing.")
    epoch = Attribute("A string, new for every registry instance (every daemon start).")
    clock = Attribute("The IReactorTime the registry reads time from.")
    stale_after = Attribute("Seconds without a heartbeat after which a module is not discoverable.")
    read_limiter = Attribute(
        "The per-identity RateLimiter of expensive reads (catalog, services, watch, "
        "blocking queries)."
    )
    write_limiter = Attribute("The per-identity RateLimiter of writes.")
    policy = Attribute(
        "The hsu_registry.security.policy.Policy deciding who may read, publish and "
        "administer; replaced as a whole when it is reloaded."
    )

    def registrations() -> Iterator[tuple[Registration, float]]:
        """
        @return: every registration with its last-seen time (a snapshot).
        """

    def providers(service_id: str) -> list[tuple[Registration, float]]:
        """
        @return: the registrations with an API serving C{service_id}, with
            their last-seen times.
        """

    def last_seen(module_id: str) -> float | None:
        """
        @return: the last heartbeat time of C{module_id}, or L{None}.
        """

    def load() -> Deferred[int]:
        """
        Fill the registry from its store.

        @return: a Deferred firing with the number of registrations loaded.
        """

    def binding(module_id: str) -> ProcessIdentity | None:
        """
        @return: the process C{module_id}'s registration is bound to, or
            L{None} when it lives by heartbeats alone.
        """

    def is_stale(module_id: str, now: float) -> bool:
        """
        @return: whether C{module_id} is registered but not discoverable
            at C{now} (not seen for C{stale_after}, not bound to a process).
        """

    def publish(request: PublishRequest, identity: Identity = ANONYMOUS) -> Deferred[Change | None]:
        """
        Create or replace a module's registration from a
        L{hsu_registry.model.PublishRequest}; counts as a heartbeat.  The same
        content again (same process, same APIs) is only a heartbeat: nothing
        is written, the change index does not move.

        @param identity: who sent it: a new registration belongs to it, and
            only it (or an admin) may change it.  When it is a unix-socket
            peer whose PID the published process ID names (or its parent's),
            the registration is bound to the process.
        @return: (failing with L{hsu_registry.errors.Forbidden} when the
            identity may not)

        @return: a Deferred firing with the L{hsu_registry.registry.Change},
            or L{None} for a heartbeat.
        """

    def spend(limiter: RateLimiter, identity: Identity) -> None:
        """
        Spend one of C{identity}'s requests from C{limiter}; admins are not
        limited.

        @raise hsu_registry.errors.TooManyRequests: when none is left for now.
        """

    def discover(module_id: str) -> Registration:
        """
        Look up a discoverable (not stale) registration and refresh its
        last-seen time: discovery is a heartbeat.

        @return: the L{hsu_registry.model.Registration} (synchronously).
        @raise hsu_registry.errors.ModuleNotFound: unknown or stale.
        """

    def set_status(
        module_id: str, api_index: int, target: CheckTarget, status: str, output: str = ""
    ) -> Deferred[Change | None]:
        """
        Record the result of a health check of one API: C{status} is
        C{passing} or C{critical}; a change of status is a C{status} change.

        @param target: the L{hsu_registry.model.CheckTarget} that was probed.
        @return: a Deferred firing with the L{Change}, or L{None} when
            nothing changed (same status, or the API no longer has that
            target, or the module is being removed).
        """

    def heartbeat(module_id: str, process_id: int | None, identity: Identity = ANONYMOUS) -> None:
        """
        Refresh a registration's last-seen time; with C{process_id}, only for
        its owner.  From a unix-socket peer that is the owner, it binds
        the registration to that process (as L{publish} does).

        @raise hsu_registry.errors.ModuleNotFound: unknown module.
        @raise hsu_registry.errors.Forbidden: C{identity} is not its owner.
        @raise hsu_registry.errors.NotOwner: another process owns it.
        """

    def get(module_id: str) -> Registration | None:
        """
        @return: the registration of C{module_id}, stale or not, or L{None};
            does not refresh it.
        """

    def unpublish(
        module_id: str, process_id: int | None, identity: Identity = ANONYMOUS
    ) -> Deferred[Change | None]:
        """
        Remove a registration, when C{identity} owns it (or is an admin).
        With a C{process_id} that is not L{None}, only when that process owns
        it.  Unknown modules are not an error.

        @return: a Deferred firing with the L{Change}, or L{None} when there
            was nothing to remove.
        @raise hsu_registry.errors.NotOwner: (as the Deferred's failure)
        """

    def expire() -> Deferred[list[Change]]:
        """
        Remove the registrations not seen for the expiry time.

        @return: a Deferred firing with the list of L{Change}s made.
        """

    def health() -> HealthStatus:
        """
        @return: a L{hsu_registry.registry.HealthStatus}.
        """

    def subscribe(observer: Callable[[Change], object]) -> Callable[[], None]:
        """
        Call C{observer(change)} after every mutation.

        @return: a callable that unsubscribes.
        """

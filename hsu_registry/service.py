# -*- test-case-name: tests.test_service -*-
"""
The daemon as a Twisted service tree, built from a L{RegistryConfig} and a
reactor: the store and registry first, the cleanup job next, the listeners
last, so that stopping takes the listeners down before what serves them.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from hsu_registry import __version__
from hsu_registry.checks.service import HealthCheckService
from hsu_registry.checks.targets import CheckTargets
from hsu_registry.config import RegistryConfig
from hsu_registry.endpoints import ListenerService, go_client_hint
from hsu_registry.gctune import freeze_long_lived
from hsu_registry.hangup import reopen_log_files
from hsu_registry.interfaces import IProcessMonitor, IStore
from hsu_registry.registry import Registry
from hsu_registry.security.identity import identity_of_principal
from hsu_registry.security.policy import (
    Network,
    Policy,
    PolicyError,
    default_policy,
    describe_change,
    load_policy,
    open_policy,
)
from hsu_registry.stores import parse_store_spec
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.drain import DrainService
from hsu_registry.web.site import RegistrySite, site_bounds

__all__ = [
    "CleanupService",
    "HeartbeatFlushService",
    "ProcessMonitorService",
    "RegistryService",
    "StoreService",
    "build_policy",
    "build_process_monitor",
    "build_store",
    "makeService",
]


def build_store(spec: str, reactor: Any = None) -> IStore:
    """
    The store named by a ``--store`` value (SQLite is imported only when used).

    @raise hsu_registry.errors.StartupFailure: for a database that cannot serve.
    """
    kind, path = parse_store_spec(spec)
    if kind == "sqlite":
        from hsu_registry.stores.sqlite import SQLiteStore, check_database

        assert path is not None
        # Before anything listens: a file that cannot serve stops the daemon
        # with one line (StoreError, a StartupFailure).
        check_database(path)
        return SQLiteStore(path, reactor)
    return MemoryStore()


class StoreService(Service):
    """
    Loads the registry from its store on start (before the listeners start,
    so no request sees a registry half loaded) and closes the store on stop.
    """

    name = "store"
    log = Logger()

    def __init__(self, registry: Registry, store: IStore) -> None:
        self.registry = registry
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.registry.load().addErrback(
            lambda f: self.log.failure("Could not load the registry from its store", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d = self.registry.flush_heartbeats()
        d.addBoth(lambda _: self.store.close())
        return d


class _PeriodicService(Service):
    """
    Runs L{run_once} every C{interval} seconds on C{clock}.  C{run_once}
    must never fail: a LoopingCall stops for good at the first failure.
    """

    def __init__(self, registry: Registry, interval: float, clock: IReactorTime) -> None:
        self.registry = registry
        self.interval = interval
        self.clock = clock
        self._call: LoopingCall | None = None
        self._loop: Deferred[LoopingCall] | None = None

    def run_once(self) -> Deferred[None]:
        raise NotImplementedError()

    def startService(self) -> None:
        super().startService()
        self._call = LoopingCall(self.run_once)
        self._call.clock = self.clock
        self._loop = self._call.start(self.interval, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        call, loop = self._call, self._loop
        self._call = self._loop = None
        if call is not None and call.running:
            call.stop()
        if loop is None:
            return succeed(None)
        return loop.addCallback(lambda _: None)


class CleanupService(_PeriodicService):
    """
    Every C{interval} seconds, expires modules not seen for the expiry time and
    hands the batched heartbeats to the store.  A failing pass is logged and
    the next one runs as usual.
    """

    name = "cleanup"
    log = Logger()

    def run_once(self) -> Deferred[None]:
        """One cleanup pass; never fails."""
        d = maybeDeferred(self.registry.expire)  # the registry logs what it removes

        def failed(failure: Failure) -> None:
            self.log.failure("Cleanup pass failed; the next one runs as usual", failure)

        flushed = d.addCallback(lambda _: self.registry.flush_heartbeats())
        return flushed.addErrback(failed)


class HeartbeatFlushService(_PeriodicService):
    """
    Every C{interval} seconds, hands the heartbeats recorded since the last
    flush to the store in one batch (a durable store writes them in one
    transaction), so discovery never writes to disk.  A failure is logged and
    the next flush runs as usual.
    """

    name = "heartbeat-flush"
    log = Logger()

    def run_once(self) -> Deferred[None]:
        """One flush; never fails."""
        d = maybeDeferred(self.registry.flush_heartbeats)
        return d.addErrback(
            lambda f: self.log.failure("Heartbeat flush failed; the next one runs as usual", f)
        )


def build_policy(spec: str | None) -> Policy:
    """
    The policy named by C{--policy}: the default, the original's open
    behaviour, or a file (read at start-up, before the reactor serves).

    @raise PolicyError: for a file that cannot be used.
    """
    if spec is None:
        return default_policy()
    if spec == "open":
        return open_policy()
    return load_policy(spec)


def build_process_monitor(config: RegistryConfig, reactor: Any) -> IProcessMonitor | None:
    """
    The process monitor behind process-bound registrations, or L{None} when
    they are off or the host has no C{/proc} to identify processes by.
    """
    if not config.process_binding or not os.path.isdir("/proc/self"):
        return None
    from hsu_registry.processes.monitor import ProcessMonitor

    return ProcessMonitor(reactor, poll_interval=config.process_poll_interval)


class ProcessMonitorService(Service):
    """Stops watching processes (closing every pidfd) when the daemon stops."""

    name = "process-monitor"

    def __init__(self, monitor: IProcessMonitor) -> None:
        self.monitor = monitor

    def stopService(self) -> None:
        super().stopService()
        self.monitor.close()


class RegistryService(MultiService):
    """
    The whole daemon: store, registry, cleanup and one listener per endpoint,
    all sharing one L{RegistrySite}.

    Embedders add it to their own service tree, or mount L{resource} under
    their own Site (with C{endpoints=()} it listens nowhere itself).
    """

    log = Logger()

    def __init__(self, config: RegistryConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.store = build_store(config.store, reactor)
        self.processes = build_process_monitor(config, reactor)
        self.registry = Registry(
            self.store,
            policy=build_policy(config.policy),
            quotas=config.quotas,
            clock=reactor,
            stale_after=config.stale_after,
            expire_after=config.expire_after,
            max_modules=config.max_modules,
            discover_heartbeat=config.discover_heartbeat,
            processes=self.processes,
        )
        # Where health checks may connect (loopback, this host, and the
        # networks the policy grants the owner), shared by the publish path,
        # which vets each checked API, and the checker.
        self.check_targets = CheckTargets(
            reactor,
            extra_networks=self._check_networks,
            limits=config.check_limits,
        )
        self.api = RegistryAPI(
            self.registry,
            config.limits,
            changelog=ChangeLog(self.registry, reactor, limits=config.watch_limits),
            targets=self.check_targets,
        )
        self.site = RegistrySite(
            self.api.resource(),
            max_body_size=config.max_body_size,
            access_log=config.access_log,
            reactor=reactor,
            # Connection limits, deadlines and the body budget; the default
            # limits leave room for the pidfds of process-bound registrations.
            **site_bounds(config, process_binding=self.processes is not None),
        )
        StoreService(self.registry, self.store).setServiceParent(self)
        CleanupService(self.registry, config.cleanup_interval, reactor).setServiceParent(self)
        HeartbeatFlushService(self.registry, config.flush_interval, reactor).setServiceParent(self)
        if self.processes is not None:
            ProcessMonitorService(self.processes).setServiceParent(self)
        self.checks = HealthCheckService(
            self.registry, reactor, config.check_concurrency, targets=self.check_targets
        )
        self.checks.setServiceParent(self)
        # Stopped right after the listeners: answers what was received.
        DrainService(self.site, reactor, config.drain_timeout).setServiceParent(self)
        self.listeners: list[ListenerService] = []
        for number, description in enumerate(config.endpoints):
            listener = ListenerService(reactor, description, self.site)  # type: ignore[arg-type]
            listener.setName(f"listener-{number}")
            listener.setServiceParent(self)
            self.listeners.append(listener)

    _announced = False

    def _announce(self) -> None:
        """Log the daemon's version and settings once, as its first log line."""
        if self._announced:
            return
        self._announced = True
        self.log.info(
            "hsu-registry {version} starting: store {store}, endpoints {endpoints}",
            version=__version__,
            store=self.config.store,
            endpoints=", ".join(self.config.endpoints) or "(none: mounted by the host)",
        )
        hint = go_client_hint(
            path for path in (listener.parsed.unix_path for listener in self.listeners) if path
        )
        if hint is not None:
            self.log.info("{hint}", hint=hint)

    def privilegedStartService(self) -> None:
        self._announce()
        super().privilegedStartService()

    def startService(self) -> None:
        self._announce()
        policy = self.registry.policy
        if policy.open:
            self.log.warn(
                "--policy=open: any caller may change or remove any registration "
                "(the original's behaviour); registrations have no owners"
            )
        else:
            self.log.info("Policy: {policy}", policy=policy.describe())
        super().startService()
        if self.config.freeze_gc:
            freeze_long_lived()

    def stopService(self) -> Deferred[None]:
        """
        Stop in the reverse order of the tree, each part once the one after
        it has stopped (MultiService would stop them all at once): the
        listeners, then the drain (requests already received are answered
        while the store still writes), then the checks and jobs, and the store
        last.
        """
        # End every watch stream and answer every blocking query first:
        # stopping the listeners does not close the connections they hold.
        self.api.watchers.close()
        self.api.changelog.close()
        Service.stopService(self)

        async def stop_in_order() -> None:
            for child in reversed(list(self)):
                try:
                    await maybeDeferred(child.stopService)
                except Exception:
                    self.log.failure("Stopping {service} failed", service=child.name)
            # The listeners are down: end the connections they accepted, so
            # no kept-alive client goes on talking to a stopped registry.
            self.site.close_connections()
            self.api.refusals.stop()  # the refusals still counted, logged

        return Deferred.fromCoroutine(stop_in_order())

    def reload(self) -> list[str]:
        """
        What SIGHUP does: reopen the log files (after logrotate moved them)
        and reload what can be reloaded, and log it.  Nothing else of the
        configuration is reloadable yet.

        @return: the log files reopened.
        """
        reopened = reopen_log_files()
        self.log.info(
            "Reloaded on SIGHUP: {what}",
            what=f"reopened {', '.join(reopened)}" if reopened else "no log file to reopen",
            reopened=reopened,
        )
        self.reload_policy()
        # The host's addresses may have changed, and so may the grants:
        # judge every check target again.
        self.check_targets.refresh()
        self.checks.recheck()
        return reopened

    def _check_networks(self, principal: str) -> tuple[Network, ...]:
        """The networks beyond loopback and this host that C{principal}'s checks may reach."""
        return self.registry.policy.check_networks(identity_of_principal(principal))

    def reload_policy(self) -> None:
        """
        Read the policy file again; a bad file keeps the policy in force and
        says why.  The default and the open policy have no file to reload.
        """
        spec = self.config.policy
        if spec is None or spec == "open":
            return
        before = self.registry.policy
        try:
            after = load_policy(spec)
        except PolicyError as e:
            self.log.error(
                "Kept the policy in force ({policy}): {error}",
                policy=before.describe(),
                error=str(e),
            )
            return
        self.registry.policy = after
        self.log.info(
            "Reloaded the policy {path}: {changes}",
            path=spec,
            changes=describe_change(before, after),
        )

    def resource(self) -> IResource:
        """The API as a resource, for mounting under a host application's Site."""
        return self.api.resource()


def makeService(config: RegistryConfig, reactor: Any = None) -> RegistryService:
    """
    Build the daemon's service tree.  The global reactor is used only when
    none is given.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return RegistryService(config, reactor)

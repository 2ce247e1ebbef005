# -*- test-case-name: tests.test_publishing -*-
"""
L{PublishingService}: keeps a module's APIs registered for the module's whole
life.

It publishes on start, sends a heartbeat every heartbeat interval (well
inside the registry's stale time, so the registration never goes stale; a
registry that restarted empty answers "module not found", and gets a full
publish at once), retries with capped exponential backoff
and jitter while the registry is down, and unpublishes on stop within a
bounded time so shutdown never hangs on an unreachable registry.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hsu_registry.client.errors import ModuleNotFound, RegistryRejected
from hsu_registry.client.model import RemoteAPI

__all__ = ["PublishingService"]


class _Client(Protocol):
    """What the service needs of a client (L{RegistryClient} provides it)."""

    def publish_apis(
        self, remote_apis: Iterable[RemoteAPI], process_id: int | None = None
    ) -> Deferred[None]: ...

    def unpublish(self, module_id: str, process_id: int | None = None) -> Deferred[None]: ...


class PublishingService(Service):
    """
    A Twisted service that keeps C{remote_apis} published.

    @param client: a L{hsu_registry.client.RegistryClient}.
    @param heartbeat_interval: seconds between re-publications; keep it well
        under the registry's C{--stale-after} (5 minutes by default).
    @param clock: default: the global reactor.
    @param process_id: the owner recorded by the registry; default this process.
    @param retry_initial: the first retry delay, doubled after each failure...
    @param retry_max: ...up to this (default: the heartbeat interval, at most 60s).
    @param stop_timeout: the longest L{stopService} waits for the unpublish.

    @ivar state: C{"stopped"}, C{"publishing"} (first attempt under way),
        C{"registered"} or C{"retrying"}.
    """

    log = Logger()

    def __init__(
        self,
        client: _Client,
        remote_apis: Iterable[RemoteAPI],
        heartbeat_interval: float = 60.0,
        clock: IReactorTime | None = None,
        process_id: int | None = None,
        retry_initial: float = 1.0,
        retry_max: float | None = None,
        stop_timeout: float = 5.0,
        jitter: random.Random | None = None,
    ) -> None:
        if heartbeat_interval <= 0 or retry_initial <= 0 or stop_timeout <= 0:
            raise ValueError("intervals and timeouts must be positive")
        self.client = client
        self.remote_apis = tuple(remote_apis)
        self.heartbeat_interval = heartbeat_interval
        self._clock = clock
        self.process_id = os.getpid() if process_id is None else process_id
        self.retry_initial = retry_initial
        self.retry_max = retry_max if retry_max is not None else min(heartbeat_interval, 60.0)
        self.stop_timeout = stop_timeout
        self._jitter = jitter or random.Random()
        self.state = "stopped"
        self.failures = 0
        self._next: IDelayedCall | None = None
        self._inflight: Deferred[None] | None = None
        self._waiting: list[Deferred[None]] = []

    @property
    def clock(self) -> IReactorTime:
        if self._clock is None:
            from twisted.internet import reactor

            self._clock = reactor
        assert self._clock is not None
        return self._clock

    @property
    def module_ids(self) -> list[str]:
        return [remote.module_id for remote in self.remote_apis]

    def when_registered(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once the registry has acknowledged the
        registration (at once if it already has), so a module can wait to be
        discoverable before announcing itself ready; it fails with
        L{CancelledError} if the service stops first, and cancelling it
        stops only the wait.
        """
        if self.state == "registered":
            return succeed(None)

        def forget(d: Deferred[None]) -> None:
            if d in self._waiting:
                self._waiting.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._waiting.append(d)
        return d

    # -- life cycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.state = "publishing"
        self.failures = 0
        self._publish()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        if self._inflight is not None:
            self._inflight.cancel()
        self.state = "stopped"
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(CancelledError("the publishing service stopped"))
        if not self.remote_apis:
            return succeed(None)
        calls = [self.client.unpublish(module_id, self.process_id) for module_id in self.module_ids]
        done: Deferred[Any] = DeferredList(calls, consumeErrors=True)
        timed_out: list[bool] = []

        def on_timeout(result: Any, timeout: float) -> Any:
            timed_out.append(True)
            return result

        done.addTimeout(self.stop_timeout, self.clock, onTimeoutCancel=on_timeout)

        def report(results: Any) -> None:
            if timed_out:
                self.log.warn(
                    "Gave up unpublishing {modules} after {timeout}s; the registry "
                    "will expire them",
                    modules=", ".join(self.module_ids),
                    timeout=self.stop_timeout,
                )
                return
            failed = [
                (module_id, result)
                for module_id, (ok, result) in zip(self.module_ids, results, strict=True)
                if not ok
            ]
            for module_id, failure in failed:
                self.log.warn(
                    "Could not unpublish {module_id} on stop: {error}",
                    module_id=module_id,
                    error=failure.getErrorMessage(),
                )
            if not failed:
                self.log.info(
                    "Unpublished {modules} (process {process_id})",
                    modules=", ".join(self.module_ids),
                    process_id=self.process_id,
                )

        done.addCallback(report)
        done.addErrback(lambda f: self.log.failure("Unpublishing on stop failed", f))
        return done

    # -- publishing --------------------------------------------------------

    def _schedule(self, delay: float, action: Callable[[], None] | None = None) -> None:
        if self.running:
            self._next = self.clock.callLater(delay, action or self._publish)

    def _beat(self) -> None:
        """
        A heartbeat for every module between publishes (C{PUT
        /api/v1/heartbeat}); a registry that no longer knows a module (it
        restarted empty) gets a full publish at once.  A client without
        heartbeats re-publishes instead.
        """
        self._next = None
        heartbeat = getattr(self.client, "heartbeat", None)
        if heartbeat is None:
            self._publish()
            return
        beats = [heartbeat(module_id, self.process_id) for module_id in self.module_ids]
        d: Deferred[Any] = DeferredList(beats, consumeErrors=True, fireOnOneErrback=False)
        self._inflight = d

        def beaten(results: list[tuple[bool, Any]]) -> None:
            if self._inflight is d:
                self._inflight = None
            if not self.running:
                return
            failures = [result for ok, result in results if not ok]
            if any(f.check(ModuleNotFound) for f in failures):
                self.log.warn(
                    "The registry no longer knows {modules}; publishing again",
                    modules=", ".join(self.module_ids),
                )
                self._publish()
            elif failures:
                self._failed(failures[0])
            else:
                self._schedule(self.heartbeat_interval, self._beat)

        d.addCallback(beaten)

    def _publish(self) -> None:
        self._next = None
        d = self.client.publish_apis(self.remote_apis, self.process_id)
        self._inflight = d
        d.addCallbacks(self._published, self._failed)

        def clear(_: object) -> None:
            if self._inflight is d:
                self._inflight = None

        d.addBoth(clear)

    def _published(self, _: object) -> None:
        if not self.running:
            return
        if self.state != "registered":
            self.log.info(
                "Registered {modules} (process {process_id}); heartbeat every {interval}s",
                modules=", ".join(self.module_ids),
                process_id=self.process_id,
                interval=self.heartbeat_interval,
            )
        self.state = "registered"
        self.failures = 0
        self._schedule(self.heartbeat_interval, self._beat)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def retry_delay(self, failures: int) -> float:
        """The delay before retry number C{failures}: capped doubling, halved by jitter at most."""
        capped = min(self.retry_max, self.retry_initial * 2 ** min(failures - 1, 32))
        return capped * (0.5 + 0.5 * self._jitter.random())

    def _failed(self, failure: Failure) -> None:
        if not self.running or failure.check(CancelledError):
            return
        self.failures += 1
        delay = self.retry_delay(self.failures)
        if failure.check(RegistryRejected):
            self.log.error(
                "The registry refused {modules}: {error}; retrying in {delay:.1f}s",
                modules=", ".join(self.module_ids),
                error=failure.getErrorMessage(),
                delay=delay,
            )
        elif self.state != "retrying" or self.failures == 1:
            self.log.warn(
                "Registry unavailable for {modules}: {error}; retrying in {delay:.1f}s",
                modules=", ".join(self.module_ids),
                error=failure.getErrorMessage(),
                delay=delay,
            )
        else:
            self.log.debug(
                "Retry {failures} failed: {error}; next in {delay:.1f}s",
                failures=self.failures,
                error=failure.getErrorMessage(),
                delay=delay,
            )
        self.state = "retrying"
        self._schedule(delay)

"""
Tests for L{hsu_registry.client.publishing.PublishingService}: heartbeat,
backoff with jitter, re-registration and a bounded stop, driven by a
L{task.Clock} and a fake client; and one run against a real registry.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hsu_registry.client import (
    ModuleNotFound,
    RegistryClient,
    RegistryRejected,
    RegistryUnavailable,
    RemoteAPI,
    RemoteModuleAPI,
)
from hsu_registry.client.publishing import PublishingService
from hsu_registry.config import RegistryConfig
from hsu_registry.service import makeService

ECHO = RemoteAPI("echo", [RemoteModuleAPI("service1", 50051, "grpc")])
WEB = RemoteAPI("web", [RemoteModuleAPI("http", 8080, "http")])


class FakeRegistry:
    """A client whose registry is a dict, and which can be down or hang."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.modules: dict[str, int] = {}
        self.down = False
        self.refuse = False
        self.hang_unpublish = False
        self.publishes: list[float] = []
        self.unpublished: list[tuple[str, int | None]] = []

    def publish_apis(
        self, remote_apis: Iterable[RemoteAPI], process_id: int | None = None
    ) -> Deferred[None]:
        self.publishes.append(self.clock.seconds())
        if self.down:
            return fail(RegistryUnavailable("registry at fake is unavailable: connection refused"))
        if self.refuse:
            return fail(RegistryRejected("apis[0].protocol is too long", 400))
        for remote in remote_apis:
            self.modules[remote.module_id] = process_id or 0
        return succeed(None)

    def unpublish(self, module_id: str, process_id: int | None = None) -> Deferred[None]:
        if self.hang_unpublish:
            return Deferred()
        self.unpublished.append((module_id, process_id))
        self.modules.pop(module_id, None)
        return succeed(None)


class HeartbeatingRegistry(FakeRegistry):
    """A fake client that also offers heartbeats."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.beats: list[tuple[str, int | None]] = []

    def heartbeat(self, module_id: str, process_id: int | None = None) -> Deferred[None]:
        if self.down:
            return fail(RegistryUnavailable("registry at fake is unavailable"))
        if module_id not in self.modules:
            return fail(ModuleNotFound(module_id))
        self.beats.append((module_id, process_id))
        return succeed(None)


class HeartbeatServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = HeartbeatingRegistry(self.clock)
        self.service = PublishingService(
            self.registry,
            [ECHO, WEB],
            heartbeat_interval=60,
            clock=self.clock,
            process_id=9,
            jitter=random.Random(3),
        )

    def test_heartbeats_between_publishes(self) -> None:
        """After the first publish it sends heartbeats, not publishes."""
        self.service.startService()
        self.clock.pump([60, 60])
        self.assertEqual(self.registry.publishes, [0])
        self.assertEqual(len(self.registry.beats), 4)
        self.assertEqual(self.registry.beats[0], ("echo", 9))

    def test_registry_forgot(self) -> None:
        """When the registry no longer knows a module, it publishes again at once."""
        self.service.startService()
        self.registry.modules.clear()  # restarted empty
        self.clock.advance(60)
        self.assertEqual(self.registry.publishes, [0, 60])
        self.assertEqual(set(self.registry.modules), {"echo", "web"})
        self.clock.advance(60)
        self.assertEqual(len(self.registry.beats), 2)

    def test_heartbeat_while_down_backs_off(self) -> None:
        """A failed heartbeat goes into the usual backoff, then publishes."""
        self.service.startService()
        self.registry.down = True
        self.clock.advance(60)
        self.assertEqual(self.service.state, "retrying")
        self.registry.down = False
        self.clock.advance(self.service.retry_max)
        self.assertEqual(self.service.state, "registered")


class PublishingServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = FakeRegistry(self.clock)
        self.service = PublishingService(
            self.registry,
            [ECHO, WEB],
            heartbeat_interval=60,
            clock=self.clock,
            process_id=4321,
            jitter=random.Random(7),
        )

    def test_publishes_on_start_and_every_heartbeat(self) -> None:
        """It publishes at once, then every heartbeat interval."""
        self.service.startService()
        self.assertEqual(self.registry.modules, {"echo": 4321, "web": 4321})
        self.assertEqual(self.service.state, "registered")
        self.clock.pump([60] * 3)
        self.assertEqual(self.registry.publishes, [0, 60, 120, 180])

    def test_backoff_capped_with_jitter(self) -> None:
        """While the registry is down it retries with doubling, capped, jittered delays."""
        self.registry.down = True
        self.service.startService()
        for _ in range(10):
            self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
        times = self.registry.publishes
        delays = [b - a for a, b in itertools.pairwise(times)]
        self.assertEqual(len(delays), 10)
        for n, delay in enumerate(delays, start=1):
            nominal = min(60.0, 2.0 ** (n - 1))
            self.assertGreaterEqual(delay, nominal / 2)
            self.assertLessEqual(delay, nominal)
        self.assertGreater(len(set(delays)), 5, "jitter should spread the delays")
        self.assertEqual(self.service.state, "retrying")

    def test_recovers_when_registry_comes_back(self) -> None:
        """After the registry returns, it registers and goes back to the heartbeat."""
        self.registry.down = True
        with capturedLogs() as events:
            self.service.startService()
            self.clock.pump([1] * 10)
            self.registry.down = False
            self.clock.pump([1] * 40)
        self.assertEqual(self.service.state, "registered")
        self.assertEqual(self.service.failures, 0)
        self.assertIn("echo", self.registry.modules)
        formats = [e["log_format"] for e in events]
        self.assertEqual(sum("Registry unavailable" in f for f in formats), 1)
        self.assertEqual(sum(f.startswith("Registered") for f in formats), 1)

    def test_reregisters_after_registry_restart(self) -> None:
        """A registry that restarts empty gets the registration back at the next heartbeat."""
        self.service.startService()
        self.registry.modules.clear()
        self.clock.advance(60)
        self.assertEqual(set(self.registry.modules), {"echo", "web"})

    def test_refusal_is_logged_as_error(self) -> None:
        """A 4xx refusal is logged as an error with the server's message, and retried."""
        self.registry.refuse = True
        with capturedLogs() as events:
            self.service.startService()
        errors = [e for e in events if "refused" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertIn("protocol is too long", errors[0]["error"])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_when_registered(self) -> None:
        """
        C{when_registered} waits through retries for the first acknowledged
        publish, and answers at once once registered.
        """
        self.registry.down = True
        self.service.startService()
        waiting = self.service.when_registered()
        self.clock.pump([1] * 5)
        self.assertNoResult(waiting)
        self.registry.down = False
        self.clock.pump([1] * 40)
        self.assertIsNone(self.successResultOf(waiting))
        self.assertIsNone(self.successResultOf(self.service.when_registered()))

    def test_when_registered_fails_on_stop(self) -> None:
        """A wait still pending when the service stops fails with CancelledError."""
        self.registry.down = True
        self.service.startService()
        waiting = self.service.when_registered()
        self.successResultOf(self.service.stopService())
        self.failureResultOf(waiting, CancelledError)

    def test_when_registered_cancelled(self) -> None:
        """Cancelling a wait ends only the wait: the service goes on and registers."""
        self.registry.down = True
        self.service.startService()
        waiting = self.service.when_registered()
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.registry.down = False
        self.clock.pump([1] * 40)
        self.assertEqual(self.service.state, "registered")

    def test_stop_unpublishes_with_process_id(self) -> None:
        """Stopping unpublishes every module with its process ID and cancels the heartbeat."""
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.registry.unpublished, [("echo", 4321), ("web", 4321)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.service.state, "stopped")

    def test_stop_is_bounded(self) -> None:
        """When the registry never answers, stop still finishes after stop_timeout."""
        self.service.startService()
        self.registry.hang_unpublish = True
        with capturedLogs() as events:
            d = self.service.stopService()
            self.assertNoResult(d)
            self.clock.advance(5)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(any("Gave up unpublishing" in e["log_format"] for e in events))

    def test_stop_while_retrying(self) -> None:
        """Stopping while retrying cancels the retry."""
        self.registry.down = True
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_with_publish_in_flight(self) -> None:
        """An in-flight publish is cancelled on stop and does not reschedule."""
        pending: Deferred[None] = Deferred()
        self.registry.publish_apis = lambda apis, pid=None: pending  # type: ignore[method-assign,assignment,misc]
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.assertTrue(pending.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.service.state, "stopped")

    def test_bad_parameters(self) -> None:
        self.assertRaises(
            ValueError, PublishingService, self.registry, [ECHO], heartbeat_interval=0
        )


class RealRegistryTests(TestCase):
    """The service keeps a module registered with a real registry over TCP."""

    async def test_publish_and_unpublish(self) -> None:
        server = makeService(RegistryConfig(endpoints=("tcp:0:interface=127.0.0.1",)), reactor)
        server.startService()
        self.addCleanup(server.stopService)
        port = server.listeners[0].port
        assert port is not None
        client = RegistryClient(f"tcp://127.0.0.1:{port.getHost().port}", reactor)  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        service = PublishingService(client, [ECHO], heartbeat_interval=30)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        # The publish and the lookup travel on separate connections: the
        # lookup must wait for the acknowledged publish, not race it.
        await service.when_registered()
        apis = await client.find_module_apis("echo")
        self.assertEqual(apis, list(ECHO.apis))
        await service.stopService()
        self.assertIsNone(server.registry.get("echo"))

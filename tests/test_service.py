"""
Tests for L{hsu_registry.service}: the cleanup job on a L{task.Clock}, and
the service tree listening on real TCP ports and unix sockets in process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent

from hsu_registry.config import RegistryConfig
from hsu_registry.registry import Registry
from hsu_registry.service import CleanupService, HeartbeatFlushService, makeService
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.testing import ControllableStore

from .helpers import SEED_PUBLISH, publish_request


class CleanupServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock, stale_after=60, expire_after=120)
        self.service = CleanupService(self.registry, 30, self.clock)

    def test_expires_on_schedule(self) -> None:
        """Every interval, modules not seen for expire-after are removed, and it is logged."""
        self.successResultOf(self.registry.publish(publish_request("old")))
        self.service.startService()
        self.clock.advance(90)
        self.successResultOf(self.registry.publish(publish_request("young")))
        with capturedLogs() as events:
            self.clock.pump([30, 30])  # t = 150: "old" was last seen at 0
        self.assertIsNone(self.registry.get("old"))
        self.assertIsNotNone(self.registry.get("young"))
        expired = [e for e in events if e.get("log_format", "").startswith("Expired")]
        self.assertEqual([(e["count"], e["module_ids"]) for e in expired], [(1, "old")])
        self.successResultOf(self.service.stopService())

    def test_survives_a_failing_pass(self) -> None:
        """A pass that fails is logged, and the next pass still runs."""
        calls: list[int] = []

        def expire() -> Deferred[list[object]]:
            calls.append(1)
            if len(calls) == 1:
                return fail(RuntimeError("disk on fire"))
            return succeed([])

        self.registry.expire = expire  # type: ignore[method-assign,assignment]
        self.service.startService()
        self.clock.advance(30)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(len(calls), 3)
        self.successResultOf(self.service.stopService())

    def test_survives_a_raising_pass(self) -> None:
        """A pass that raises synchronously does not stop the loop either."""

        def expire() -> None:
            raise ValueError("bug")

        self.registry.expire = expire  # type: ignore[method-assign,assignment]
        self.service.startService()
        for _ in range(3):
            self.clock.advance(30)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 3)
        self.successResultOf(self.service.stopService())

    def test_stop(self) -> None:
        """After stopService no more passes run."""
        self.service.startService()
        self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HeartbeatFlushServiceTests(SynchronousTestCase):
    def test_flushes_on_interval(self) -> None:
        """Heartbeats reach the store in one batch per interval, not one write each."""
        clock = Clock()
        store = ControllableStore()
        registry = Registry(store, clock)
        self.successResultOf(registry.publish(publish_request("echo")))
        service = HeartbeatFlushService(registry, 5, clock)
        service.startService()
        touched: list[dict[str, float]] = []
        store.touch = lambda batch: touched.append(dict(batch)) or succeed(None)  # type: ignore[method-assign,func-returns-value,assignment]
        for _ in range(3):
            clock.advance(1)
            registry.discover("echo")
        self.assertEqual(touched, [])
        clock.advance(2)
        self.assertEqual(touched, [{"echo": 3.0}])
        clock.advance(5)
        self.assertEqual(len(touched), 1)  # nothing new: no write
        self.successResultOf(service.stopService())

    def test_survives_a_failing_flush(self) -> None:
        """A failing flush is logged and the next one still runs."""
        clock = Clock()
        registry = Registry(ControllableStore(), clock)
        calls: list[int] = []

        def flush() -> Deferred[None]:
            calls.append(1)
            return fail(OSError("disk gone"))

        registry.flush_heartbeats = flush  # type: ignore[method-assign]
        service = HeartbeatFlushService(registry, 5, clock)
        service.startService()
        clock.pump([5, 5, 5])
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 3)
        self.successResultOf(service.stopService())


class ListeningTests(TestCase):
    """The service tree on real sockets."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="hsu")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.socket_path = os.path.join(self.directory, "run", "registry.sock")

    async def start(self, *endpoints: str) -> object:
        service = makeService(RegistryConfig(endpoints=endpoints), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def test_tcp_and_unix_share_one_registry(self) -> None:
        """A module published over TCP is discovered over the unix socket."""
        service = await self.start("tcp:0:interface=127.0.0.1", f"unix:{self.socket_path}")
        port = service.listeners[0].port.getHost().port  # type: ignore[attr-defined]
        tcp = HTTPClient(Agent(reactor))
        response = await tcp.post(
            f"http://127.0.0.1:{port}/api/v1/publish", data=json.dumps(SEED_PUBLISH).encode()
        )
        self.assertEqual(response.code, 200)
        await response.content()
        unix = HTTPClient(Agent.usingEndpointFactory(reactor, _UNIXFactory(self.socket_path)))
        response = await unix.get("http://localhost/api/v1/discover/test")
        self.assertEqual(json.loads(await response.content())["moduleID"], "test")

    async def test_unix_socket_mode_and_removal(self) -> None:
        """The socket directory is created, the socket is 0600, and it is removed on stop."""
        service = await self.start(f"unix:{self.socket_path}")
        mode = stat.S_IMODE(os.stat(self.socket_path).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.socket_path)).st_mode), 0o700)
        await service.stopService()  # type: ignore[attr-defined]
        self.assertFalse(os.path.exists(self.socket_path))

    async def test_explicit_mode(self) -> None:
        """An explicit mode is honoured."""
        await self.start(f"unix:{self.socket_path}:mode=660")
        self.assertEqual(stat.S_IMODE(os.stat(self.socket_path).st_mode), 0o660)

    async def test_stale_socket_replaced(self) -> None:
        """A socket file nobody answers on (left by a crash) is removed and replaced."""
        os.makedirs(os.path.dirname(self.socket_path))
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(self.socket_path)
        dead.close()
        await self.start(f"unix:{self.socket_path}")
        self.assertTrue(stat.S_ISSOCK(os.stat(self.socket_path).st_mode))

    async def test_live_socket_refused(self) -> None:
        """When a live server answers on the socket, start-up fails and leaves it alone."""
        os.makedirs(os.path.dirname(self.socket_path))
        live = socket.socket(socket.AF_UNIX)
        live.bind(self.socket_path)
        live.listen(1)
        self.addCleanup(live.close)
        service = makeService(RegistryConfig(endpoints=(f"unix:{self.socket_path}",)), reactor)
        error = self.assertRaises(CannotListenError, service.startService)
        self.assertIn("answering on this socket", str(error))
        self.assertTrue(os.path.exists(self.socket_path))
        try:
            await service.stopService()
        except Exception:
            pass

    async def test_regular_file_refused(self) -> None:
        """A regular file at the socket path is never deleted."""
        os.makedirs(os.path.dirname(self.socket_path))
        with open(self.socket_path, "w") as f:
            f.write("precious")
        service = makeService(RegistryConfig(endpoints=(f"unix:{self.socket_path}",)), reactor)
        self.assertRaises(CannotListenError, service.startService)
        with open(self.socket_path) as f:
            self.assertEqual(f.read(), "precious")
        try:
            await service.stopService()
        except Exception:
            pass

    async def test_non_loopback_warning(self) -> None:
        """A TCP endpoint beyond loopback logs a warning that the API is unauthenticated."""
        with capturedLogs() as events:
            await self.start("tcp:0:interface=0.0.0.0")
        warnings = [e for e in events if "no authentication" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    async def test_loopback_no_warning(self) -> None:
        """A loopback TCP endpoint logs no such warning."""
        with capturedLogs() as events:
            await self.start("tcp:0:interface=127.0.0.1")
        self.assertEqual([e for e in events if "no authentication" in e.get("log_format", "")], [])


class _UNIXFactory:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: object) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, self.path)

"""
Tests for the twistd plugin and L{hsu_registry.tap}, without sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from hsu_registry import tap
from hsu_registry.checks.service import HealthCheckService
from hsu_registry.config import RegistryConfig
from hsu_registry.service import (
    CleanupService,
    HeartbeatFlushService,
    ProcessMonitorService,
    RegistryService,
    StoreService,
    makeService,
)
from hsu_registry.web.drain import DrainService


class PluginTests(SynchronousTestCase):
    def test_discoverable(self) -> None:
        """twistd finds an IServiceMaker plugin named hsu-registry pointing at hsu_registry.tap."""
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "hsu-registry"]
        self.assertEqual(len(makers), 1)
        maker = makers[0]
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertTrue(verifyObject(IPlugin, maker))
        self.assertIs(maker.options, tap.Options)

    def test_plugin_import_is_light(self) -> None:
        """Importing the plugin, the package or its clients installs no reactor and no Klein."""
        code = (
            "import sys\n"
            "import hsu_registry\n"
            "import hsu_registry.client\n"
            "from twisted.plugins import hsu_registry_plugin\n"
            "from twisted.plugin import getPlugins, IPlugin\n"
            "list(getPlugins(IPlugin))\n"
            "assert 'twisted.internet.reactor' not in sys.modules, 'reactor installed'\n"
            "assert 'klein' not in sys.modules, 'klein imported'\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class MakeServiceTests(SynchronousTestCase):
    def test_tap_make_service(self) -> None:
        """tap.makeService builds the service tree from parsed options."""
        options = tap.Options()
        options.parseOptions(["--endpoint=tcp:0:interface=127.0.0.1", "--cleanup-interval=5s"])
        service = tap.makeService(options)
        self.assertIsInstance(service, RegistryService)

    def test_wiring_and_order(self) -> None:
        """Store first, cleanup next, the drain, one listener per endpoint last, one Site."""
        options = tap.Options()
        options.parseOptions(
            ["--endpoint=tcp:0:interface=127.0.0.1", "--endpoint=unix:/tmp/hsu-x.sock"]
        )
        service = makeService(options.config, MemoryReactorClock())
        children = list(service)
        self.assertIsInstance(children[0], StoreService)
        self.assertIsInstance(children[1], CleanupService)
        self.assertIsInstance(children[2], HeartbeatFlushService)
        self.assertEqual(children[2].interval, 5.0)
        self.assertIsInstance(children[3], ProcessMonitorService)
        self.assertIs(children[3].monitor, service.registry._processes)
        self.assertIsInstance(children[4], HealthCheckService)
        self.assertEqual(children[4].concurrency, 32)
        # The drain stops right after the listeners (before the store).
        self.assertIsInstance(children[5], DrainService)
        self.assertEqual(children[5].timeout, 10.0)
        children = [children[0], children[1], *children[6:]]
        self.assertEqual([c.name for c in children[2:]], ["listener-0", "listener-1"])
        self.assertIs(children[2].factory, children[3].factory)
        self.assertIs(children[2].factory, service.site)
        self.assertEqual(children[1].interval, 60.0)
        self.assertEqual(service.getServiceNamed("cleanup"), children[1])
        # A unix endpoint without a mode gets 0600; both get a deep backlog.
        self.assertEqual(children[3].description, "unix:/tmp/hsu-x.sock:mode=600:backlog=1024")
        self.assertEqual(children[2].description, "tcp:0:interface=127.0.0.1:backlog=1024")

    def test_listens_on_given_reactor(self) -> None:
        """Starting the service listens through the injected reactor."""
        reactor = MemoryReactorClock()
        options = tap.Options()
        options.parseOptions(["--endpoint=tcp:17999:interface=127.0.0.1"])
        service = makeService(options.config, reactor)
        service.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        port, factory, backlog, interface = reactor.tcpServers[0]
        self.assertEqual((port, backlog, interface), (17999, 1024, "127.0.0.1"))
        self.assertIs(factory, service.site)
        self.successResultOf(service.stopService())


class EmbeddingTests(SynchronousTestCase):
    """An application embeds the registry with its own reactor, clock and Site."""

    def test_mount_under_host_site_with_own_clock(self) -> None:
        """With no endpoints, the service listens nowhere; its resource serves under a
        host path, and its cleanup runs on the host's clock."""
        clock = MemoryReactorClock()
        application = MultiService()
        service = makeService(
            RegistryConfig(endpoints=(), stale_after=60, expire_after=60, cleanup_interval=10),
            clock,
        )
        service.setServiceParent(application)
        application.startService()
        self.assertEqual(clock.tcpServers, [])
        root = Resource()
        root.putChild(b"registry", service.resource())
        treq: Any = StubTreq(root)
        body = {"moduleID": "embedded", "apis": []}
        response = self.successResultOf(
            treq.post("http://app/registry/api/v1/publish", data=json.dumps(body).encode())
        )
        self.assertEqual(response.code, 200)
        self.assertIsNotNone(service.registry.get("embedded"))
        clock.advance(61)
        clock.advance(10)
        self.assertIsNone(service.registry.get("embedded"))
        self.successResultOf(application.stopService())

    def test_discover_heartbeat_both_ways(self) -> None:
        """
        With the default (--discover-heartbeat) lookups keep a silent module
        discoverable; with --no-discover-heartbeat it goes stale after
        --stale-after however often it is looked up.
        """
        for flag, alive in (("--discover-heartbeat", True), ("--no-discover-heartbeat", False)):
            options = tap.Options()
            options.parseOptions(["--stale-after=60s", "--expire-after=10m", flag])
            clock = MemoryReactorClock()
            service = makeService(attrs.evolve(options.config, endpoints=()), clock)
            service.startService()
            treq: Any = StubTreq(service.resource())
            body = {"moduleID": "quiet", "apis": []}
            response = self.successResultOf(
                treq.post("http://r/api/v1/publish", data=json.dumps(body).encode())
            )
            self.assertEqual(response.code, 200)
            codes = []
            for _ in range(3):
                clock.advance(40)
                response = self.successResultOf(treq.get("http://r/api/v1/discover/quiet"))
                codes.append(response.code)
            self.assertEqual(codes, [200, 200, 200] if alive else [200, 404, 404], flag)
            self.successResultOf(service.stopService())

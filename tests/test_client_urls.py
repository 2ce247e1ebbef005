"""
Tests for L{hsu_registry.client.urls}: registry URLs with a base path, for a
registry mounted under a host application's Site, in both clients.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hsu_registry.client import BlockingRegistryClient, RegistryClient, parse_registry_url
from hsu_registry.client.model import RemoteAPI, RemoteModuleAPI
from hsu_registry.client.protocol import health_call
from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.web.api import RegistryAPI


class ParseTests(SynchronousTestCase):
    def test_base_path(self) -> None:
        """An http:// or tcp:// URL may carry the path the API is mounted under."""
        for url in ("http://127.0.0.1:18080/registry", "http://127.0.0.1:18080/registry/"):
            address = parse_registry_url(url)
            self.assertEqual(address.prefix, "/registry")
            self.assertEqual(address.base, b"http://127.0.0.1:18080/registry")
            self.assertEqual(address.target("/api/v1/health"), "/registry/api/v1/health")
        nested = parse_registry_url("tcp://[::1]:1/a/b")
        self.assertEqual(nested.base, b"http://[::1]:1/a/b")

    def test_no_base_path(self) -> None:
        """Without a path (or with "/") requests go to the root, as before."""
        for url in ("tcp://127.0.0.1:17951", "http://127.0.0.1:17951/"):
            address = parse_registry_url(url)
            self.assertEqual(address.prefix, "")
            self.assertEqual(address.target("/api/v1/health"), "/api/v1/health")

    def test_environment(self) -> None:
        """C{$HSU_REGISTRY_URL} takes a base path too."""
        address = parse_registry_url(None, {"HSU_REGISTRY_URL": "http://127.0.0.1:18080/registry"})
        self.assertEqual(address.prefix, "/registry")


class HealthVersionTests(SynchronousTestCase):
    def test_version(self) -> None:
        """The daemon's version in the health answer reaches the clients; the original has none."""
        seed = b'{"status":"healthy","registeredModules":0,"totalAPIs":0,"uptime":"1s"}'
        self.assertIsNone(health_call().interpret(200, seed).version)
        ours = seed[:-1] + b',"version":"0.1.0"}'
        self.assertEqual(health_call().interpret(200, ours).version, "0.1.0")


class MountedRegistryTests(TestCase):
    """Both clients reach a registry mounted under C{/registry} of a host Site."""

    def setUp(self) -> None:
        self.registry = Registry(MemoryStore(), Clock())
        root = Resource()
        root.putChild(b"registry", RegistryAPI(self.registry).resource())
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/registry"

    async def test_asynchronous_client(self) -> None:
        client = RegistryClient(self.url, reactor)
        self.addCleanup(client.close)
        await client.publish_apis(
            [RemoteAPI("mounted", [RemoteModuleAPI(["svc"], 50051, "grpc")])], process_id=0
        )
        apis = await client.find_module_apis("mounted")
        self.assertEqual(apis[0].server_port, 50051)
        catalog = await client.catalog()
        self.assertIn("mounted", catalog.modules)

    def test_blocking_client(self) -> Deferred[None]:
        from twisted.internet.threads import deferToThread

        def go() -> int:
            client = BlockingRegistryClient(self.url)
            client.publish_apis(
                [RemoteAPI("mounted", [RemoteModuleAPI(["svc"], 50052, "grpc")])], process_id=0
            )
            return client.find_module_apis("mounted")[0].server_port

        d = deferToThread(go)
        return d.addCallback(self.assertEqual, 50052)

"""
Tests for L{hsu_registry.client}: both clients against a real in-process
registry on a real TCP port and a real unix socket, and their error paths
(refused, missing socket, hanging server, 4xx and 5xx answers).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hsu_registry.client import (
    BlockingRegistryClient,
    ModuleNotFound,
    RegistryClient,
    RegistryError,
    RegistryRejected,
    RegistryUnavailable,
    RemoteAPI,
    RemoteModuleAPI,
)
from hsu_registry.config import RegistryConfig
from hsu_registry.service import makeService

from .helpers import refusing_port

ECHO = RemoteAPI(
    "echo",
    [
        RemoteModuleAPI(["service1", "service2"], 50051, "grpc"),
        RemoteModuleAPI("web", 8080, "http", address="10.0.0.7", metadata={"Version": "2"}),
    ],
)


def _short_tempdir(case: SynchronousTestCase) -> str:
    # AF_UNIX paths are limited to 108 bytes: trial's temp dirs can be longer.
    directory = tempfile.mkdtemp(prefix="hsu")
    case.addCleanup(shutil.rmtree, directory, True)
    return directory


class RegistryServerMixin:
    """Starts a real registry on TCP and on a unix socket for each test."""

    def start_registry(self, case: TestCase, **config: Any) -> None:
        directory = _short_tempdir(case)
        self.socket_path = os.path.join(directory, "registry.sock")
        self.service = makeService(
            RegistryConfig(
                endpoints=("tcp:0:interface=127.0.0.1", f"unix:{self.socket_path}"), **config
            ),
            reactor,
        )
        # The tests set statuses themselves: the daemon's own checks of the
        # (closed) ports they publish would race them, so they never fire.
        self.service.checks.clock = Clock()
        self.service.startService()
        case.addCleanup(self.service.stopService)
        port = self.service.listeners[0].port
        assert port is not None
        self.tcp_url = f"tcp://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        self.unix_url = f"unix://{self.socket_path}"
        self.connections = 0
        build = self.service.site.buildProtocol

        def counting(addr: Any) -> Any:
            self.connections += 1
            return build(addr)

        self.service.site.buildProtocol = counting  # type: ignore[method-assign]


class AsyncClientTests(RegistryServerMixin, TestCase):
    """L{RegistryClient} on the reactor, over TCP and the unix socket."""

    def setUp(self) -> None:
        self.start_registry(self, max_body_size=4096)

    def client(self, url: str, timeout: float = 5.0) -> RegistryClient:
        client = RegistryClient(url, reactor, timeout=timeout)
        self.addCleanup(client.close)
        return client

    async def round_trip(self, url: str) -> None:
        client = self.client(url)
        await client.publish_apis([ECHO], process_id=42)
        self.assertEqual(await client.find_module_apis("echo"), list(ECHO.apis))
        health = await client.health()
        self.assertEqual(
            (health.status, health.registered_modules, health.total_apis), ("healthy", 1, 2)
        )
        registration = self.service.registry.get("echo")
        assert registration is not None
        self.assertEqual(registration.process_id, 42)
        with self.assertRaises(RegistryRejected) as caught:
            await client.unpublish("echo", process_id=43)
        self.assertEqual(caught.exception.status, 409)
        self.assertIn("another process", caught.exception.message)
        await client.unpublish("echo", process_id=42)
        with self.assertRaises(ModuleNotFound) as missing:
            await client.find_module_apis("echo")
        self.assertEqual(missing.exception.module_id, "echo")
        self.assertEqual(self.connections, 1, "requests should share one persistent connection")

    async def test_tcp(self) -> None:
        """Publish, discover, health and unpublish over TCP on one connection."""
        await self.round_trip(self.tcp_url)

    async def test_heartbeat(self) -> None:
        """heartbeat() refreshes a module; an unknown one fails with ModuleNotFound."""
        client = self.client(self.unix_url)
        await client.publish_apis([ECHO], process_id=5)
        await client.heartbeat("echo", 5)
        with self.assertRaises(ModuleNotFound):
            await client.heartbeat("ghost")
        with self.assertRaises(RegistryRejected) as refused:
            await client.heartbeat("echo", 6)
        self.assertEqual(refused.exception.status, 409)

    async def test_unix(self) -> None:
        """The same over the unix socket."""
        await self.round_trip(self.unix_url)

    async def test_checks_and_passing(self) -> None:
        """
        APIs published with a check come back with it (normalized) and their
        status; C{passing=True} asks for the passing (or unchecked) ones only.
        """
        checked = RemoteAPI(
            "web",
            [
                RemoteModuleAPI("s", 1, "http", check={"tcp": True}),
                RemoteModuleAPI("s", 2, "http", check={"http": "/healthz", "interval": "30s"}),
                RemoteModuleAPI("s", 3, "http"),
            ],
        )
        client = self.client(self.unix_url)
        await client.publish_apis([checked])
        found = await client.find_module_apis("web")
        self.assertEqual([api.status for api in found], ["unknown", "unknown", None])
        self.assertEqual(
            dict(found[1].check or {}), {"http": "/healthz", "interval": "30s", "timeout": "1s"}
        )
        registration = self.service.registry.get("web")
        assert registration is not None
        first, second = (api.check_target() for api in registration.apis[:2])
        assert first is not None and second is not None
        registry = self.service.registry
        await registry.set_status("web", 0, first, "passing", "up")
        await registry.set_status("web", 1, second, "critical")
        passing = await client.find_module_apis("web", passing=True)
        self.assertEqual(
            [(api.server_port, api.status) for api in passing], [(1, "passing"), (3, None)]
        )
        self.assertEqual([api.check_output for api in passing], ["up", None])
        blocking = BlockingRegistryClient(self.unix_url)
        self.addCleanup(blocking.close)
        ports = await deferToThread(
            lambda: [api.server_port for api in blocking.find_module_apis("web", passing=True)]
        )
        self.assertEqual(ports, [1, 3])
        self.assertRaises(ValueError, RemoteModuleAPI, "s", 1, "http", check={"tcp": False})

    async def test_catalog_and_services(self) -> None:
        """
        list_modules() reads the catalog and find_service_providers() a
        service's providers, with their APIs, process, times and state.
        """
        client = self.client(self.tcp_url)
        self.assertEqual(await client.list_modules(), [])
        other = RemoteAPI("other", [RemoteModuleAPI("service1", 1, "http", check={"tcp": True})])
        await client.publish_apis([ECHO], process_id=42)
        await client.publish_apis([other], process_id=0)
        echo, second = await client.list_modules()
        self.assertEqual(
            (echo.module_id, echo.apis, echo.process_id, echo.state, echo.reason),
            ("echo", ECHO.apis, 42, "ready", None),
        )
        self.assertEqual((echo.process_bound, echo.bound_pid), (False, None))
        self.assertEqual(echo.registered_at.tzinfo, datetime.timezone.utc)
        self.assertLessEqual(echo.registered_at, echo.last_seen)
        self.assertEqual((second.module_id, second.apis[0].status), ("other", "unknown"))
        providers = await client.find_service_providers("service1")
        self.assertEqual(
            [
                (p.module_id, p.process_id, p.state, [a.server_port for a in p.apis])
                for p in providers
            ],
            [("echo", 42, "ready", [50051]), ("other", 0, "ready", [1])],
        )
        passing = await client.find_service_providers("service1", passing=True)
        self.assertEqual([p.module_id for p in passing], ["echo"])
        self.assertEqual(await client.find_service_providers("nobody"), [])
        self.assertRaises(ValueError, client.find_service_providers, "a/b")

    async def test_http_scheme(self) -> None:
        """http://host:port is the same as tcp://host:port."""
        client = self.client(self.tcp_url.replace("tcp://", "http://"))
        self.assertEqual((await client.health()).status, "healthy")

    async def test_default_process_id(self) -> None:
        """Without a process ID, publish registers this process."""
        await self.client(self.tcp_url).publish_apis([ECHO])
        registration = self.service.registry.get("echo")
        assert registration is not None
        self.assertEqual(registration.process_id, os.getpid())

    async def test_several_modules(self) -> None:
        """publish_apis sends one request per module."""
        modules = [RemoteAPI(f"m{i}", [RemoteModuleAPI("s", 1000 + i, "http")]) for i in range(3)]
        await self.client(self.unix_url).publish_apis(modules)
        self.assertEqual(len(self.service.registry), 3)

    async def test_odd_module_id(self) -> None:
        """Module IDs needing percent-encoding round-trip."""
        odd = RemoteAPI("ünï?cøde#%&+", [RemoteModuleAPI("s", 1, "http")])
        client = self.client(self.tcp_url)
        await client.publish_apis([odd])
        self.assertEqual(len(await client.find_module_apis(odd.module_id)), 1)
        await client.unpublish(odd.module_id)
        self.assertEqual(len(self.service.registry), 0)

    async def test_rejected_with_server_message(self) -> None:
        """A 4xx answer fails with RegistryRejected carrying the server's status and message."""
        big = RemoteAPI("big", [RemoteModuleAPI("s", 1, "http", metadata={"k": "v" * 1000})] * 8)
        with self.assertRaises(RegistryRejected) as caught:
            await self.client(self.tcp_url).publish_apis([big])
        self.assertEqual(caught.exception.status, 413)
        self.assertIn("larger than the limit", caught.exception.message)

    async def test_refused(self) -> None:
        """A closed port fails with RegistryUnavailable."""
        with self.assertRaises(RegistryUnavailable) as caught:
            await self.client(f"tcp://127.0.0.1:{refusing_port(self)}").health()
        self.assertIn("unavailable", str(caught.exception))

    async def test_missing_socket(self) -> None:
        """A unix socket that does not exist fails with RegistryUnavailable."""
        with self.assertRaises(RegistryUnavailable):
            await self.client(self.unix_url + ".missing").health()


class HangingServerTests(SynchronousTestCase):
    """The timeout holds even when the server accepts the connection and never answers."""

    def test_async_timeout(self) -> None:
        clock = MemoryReactorClock()
        client = RegistryClient("tcp://127.0.0.1:17951", clock, timeout=2.0)
        d = client.health()
        # Accept the connection and never answer.
        host, port, factory, _, _ = clock.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 17951))
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"GET /api/v1/health", transport.value())
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        failure = self.failureResultOf(d, RegistryUnavailable)
        self.assertIn("no answer within 2s", failure.getErrorMessage())

    def test_async_connect_timeout(self) -> None:
        """A connection attempt that never completes times out too."""
        clock = MemoryReactorClock()
        client = RegistryClient("tcp://127.0.0.1:17951", clock, timeout=1.0)
        d = client.health()
        clock.advance(1.1)
        self.failureResultOf(d, RegistryUnavailable)


class _Silent(Protocol):
    """Accepts and never answers."""


class BlockingClientTests(RegistryServerMixin, TestCase):
    """L{BlockingRegistryClient} in worker threads, against the same real server."""

    def setUp(self) -> None:
        self.start_registry(self)

    def in_thread(self, function: Any, *args: Any) -> Deferred[Any]:
        return deferToThread(function, *args)

    def round_trip(self, url: str) -> list[Any]:
        client = BlockingRegistryClient(url)
        try:
            client.publish_apis([ECHO], process_id=42)
            found = client.find_module_apis("echo")
            health = client.health()
            errors: list[Any] = []
            try:
                client.unpublish("echo", process_id=1)
            except RegistryRejected as e:
                errors.append(e.status)
            client.unpublish("echo", process_id=42)
            try:
                client.find_module_apis("echo")
            except ModuleNotFound as e:
                errors.append(e.module_id)
            return [found, health.registered_modules, health.uptime_seconds >= 0, errors]
        finally:
            client.close()

    async def test_tcp(self) -> None:
        """Publish, discover, health and unpublish over TCP on one connection."""
        result = await self.in_thread(self.round_trip, self.tcp_url)
        self.assertEqual(result, [list(ECHO.apis), 1, True, [409, "echo"]])
        self.assertEqual(self.connections, 1)

    async def test_unix(self) -> None:
        """The same over the unix socket."""
        result = await self.in_thread(self.round_trip, self.unix_url)
        self.assertEqual(result, [list(ECHO.apis), 1, True, [409, "echo"]])

    async def test_catalog_and_services(self) -> None:
        """list_modules() and find_service_providers() work on the blocking client too."""
        client = BlockingRegistryClient(self.unix_url)
        self.addCleanup(client.close)
        await self.in_thread(client.publish_apis, [ECHO], 7)
        (echo,) = await self.in_thread(client.list_modules)
        self.assertEqual((echo.module_id, echo.apis, echo.process_id), ("echo", ECHO.apis, 7))
        self.assertEqual(echo.state, "ready")
        (provider,) = await self.in_thread(client.find_service_providers, "web", True)
        self.assertEqual(
            (provider.module_id, provider.process_id, provider.apis), ("echo", 7, ECHO.apis[1:])
        )
        self.assertEqual(await self.in_thread(client.find_service_providers, "nobody"), [])

    async def test_shared_between_threads(self) -> None:
        """One client may be used from several threads at once."""
        client = BlockingRegistryClient(self.tcp_url)

        def work(n: int) -> int:
            module = RemoteAPI(f"t{n}", [RemoteModuleAPI("s", 1000 + n, "http")])
            for _ in range(5):
                client.publish_apis([module])
                client.find_module_apis(module.module_id)
            return n

        results = await Deferred.fromCoroutine(_gather([self.in_thread(work, n) for n in range(4)]))
        self.assertEqual(sorted(results), [0, 1, 2, 3])
        self.assertEqual(len(self.service.registry), 4)

    async def test_reconnects_after_server_closes(self) -> None:
        """A kept-alive connection the server closed is replaced transparently."""
        client = BlockingRegistryClient(self.tcp_url)
        await self.in_thread(client.health)
        # Drop every server-side connection, as an idle timeout would.
        channels = _open_channels(self.service.site)
        self.assertEqual(len(channels), 1)
        for protocol in channels:
            protocol.transport.loseConnection()
        health = await self.in_thread(client.health)
        self.assertEqual(health.status, "healthy")
        self.assertEqual(self.connections, 2)
        await self.in_thread(client.close)

    async def test_refused(self) -> None:
        """A closed port raises RegistryUnavailable."""
        client = BlockingRegistryClient(f"tcp://127.0.0.1:{refusing_port(self)}")
        error = await self.in_thread(_error_of, client.health)
        self.assertIsInstance(error, RegistryUnavailable)
        self.assertIn("connection refused", str(error))

    async def test_missing_socket(self) -> None:
        """A missing unix socket raises RegistryUnavailable."""
        client = BlockingRegistryClient(self.unix_url + ".missing")
        error = await self.in_thread(_error_of, client.health)
        self.assertIsInstance(error, RegistryUnavailable)
        self.assertIn("socket does not exist", str(error))

    async def test_hanging_server(self) -> None:
        """A server that accepts and never answers raises RegistryUnavailable at the timeout.

        The blocking client's timeout is a socket timeout, so this one waits for
        real: 50 ms."""
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = BlockingRegistryClient(f"tcp://127.0.0.1:{port.getHost().port}", timeout=0.05)
        error = await self.in_thread(_error_of, client.health)
        self.assertIsInstance(error, RegistryUnavailable)
        self.assertIn("no answer within 0.05s", str(error))


class _Canned(Resource):
    """Answers every request with a fixed status and body."""

    isLeaf = True

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.status, self.body = status, body

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"connection", b"close")
        return self.body


class AnswerTests(TestCase):
    """How each kind of answer maps to a result or a typed error, for both clients."""

    CASES = [
        (500, b'{"success":false,"error":"internal error"}', RegistryUnavailable, "internal error"),
        (503, b'{"success":false,"error":"store down"}', RegistryUnavailable, "store down"),
        (418, b'{"success":false,"error":"teapot"}', RegistryRejected, "teapot"),
        (400, b"<html>nope</html>", RegistryRejected, "HTTP 400"),
        (
            404,
            b'{"success":false,"error":"no such endpoint"}',
            RegistryRejected,
            "no such endpoint",
        ),
        (200, b"not json", RegistryUnavailable, "not JSON"),
        (200, b'{"moduleID":"x"}', RegistryUnavailable, "malformed"),
        (502, b"", RegistryUnavailable, "HTTP 502"),
    ]

    async def test_answers(self) -> None:
        for status, body, error_type, fragment in self.CASES:
            port = reactor.listenTCP(0, Site(_Canned(status, body)), interface="127.0.0.1")
            url = f"tcp://127.0.0.1:{port.getHost().port}"
            try:
                client = RegistryClient(url, reactor)
                try:
                    with self.assertRaises(error_type) as caught:
                        await client.find_module_apis("x")
                    self.assertIn(fragment, str(caught.exception))
                finally:
                    await client.close()
                blocking = BlockingRegistryClient(url)
                error = await deferToThread(_error_of, blocking.find_module_apis, "x")
                self.assertIsInstance(error, error_type, (status, body))
                self.assertIn(fragment, str(error))
                await deferToThread(blocking.close)
            finally:
                await port.stopListening()

    async def test_malformed_lookups(self) -> None:
        """A catalog or service answer unlike the registry's fails with RegistryUnavailable."""
        body = b'{"modules": [{"moduleID": 1}], "providers": [{"moduleID": "m"}]}'
        port = reactor.listenTCP(0, Site(_Canned(200, body)), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"tcp://127.0.0.1:{port.getHost().port}"
        client = RegistryClient(url, reactor)
        self.addCleanup(client.close)
        with self.assertRaises(RegistryUnavailable) as caught:
            await client.list_modules()
        self.assertIn("modules answer is malformed", str(caught.exception))
        blocking = BlockingRegistryClient(url)
        error = await deferToThread(_error_of, blocking.find_service_providers, "s")
        self.assertIsInstance(error, RegistryUnavailable)
        self.assertIn("services answer is malformed", str(error))
        await deferToThread(blocking.close)


class ConstructionTests(SynchronousTestCase):
    def test_bad_urls(self) -> None:
        """A malformed URL or unknown scheme raises ValueError at construction."""
        for url in (
            "ftp://x:1",
            "tcp://host",
            "tcp://:80",
            "unix://relative",
            "",
            "tcp://h:0",
            "tcp://h:99999",
            "http://h:1/path?query=1",
            "http://h:1/path#fragment",
            "http://user@h:1/path",
            "http://h:1/caf\u00e9",
        ):
            self.assertRaises(ValueError, BlockingRegistryClient, url)
            self.assertRaises(ValueError, RegistryClient, url, MemoryReactorClock())

    def test_bad_timeouts(self) -> None:
        """A timeout that is not a sensible number of seconds is refused at construction."""
        for timeout in (0, -1, float("nan"), float("inf"), 1e300):
            self.assertRaises(ValueError, BlockingRegistryClient, "tcp://h:1", timeout)
            self.assertRaises(
                ValueError, RegistryClient, "tcp://h:1", MemoryReactorClock(), timeout
            )

    def test_unaddressable_module_ids(self) -> None:
        """Module IDs no registry could hold raise ValueError before any request."""
        client = BlockingRegistryClient("tcp://127.0.0.1:1")
        for module_id in ("a\udcff", "a/b", "", ".."):
            self.assertRaises(ValueError, client.find_module_apis, module_id)
            self.assertRaises(ValueError, client.unpublish, module_id)

    def test_environment_default(self) -> None:
        """With no URL: $HSU_REGISTRY_URL, else tcp://127.0.0.1:17951."""
        self.patch(os, "environ", {"HSU_REGISTRY_URL": "unix:///run/hsu/registry.sock"})
        self.assertEqual(BlockingRegistryClient().address.path, "/run/hsu/registry.sock")
        self.patch(os, "environ", {})
        client = BlockingRegistryClient()
        self.assertEqual((client.address.host, client.address.port), ("127.0.0.1", 17951))

    def test_records_validated(self) -> None:
        """RemoteAPI and RemoteModuleAPI refuse what the server would refuse."""
        self.assertRaises(ValueError, RemoteModuleAPI, [], 80, "http")
        self.assertRaises(ValueError, RemoteModuleAPI, ["s"], 0, "http")
        self.assertRaises(ValueError, RemoteModuleAPI, ["s"], True, "http")
        self.assertRaises(ValueError, RemoteModuleAPI, ["s"], 80, "")
        self.assertRaises(ValueError, RemoteModuleAPI, ["a/b"], 80, "http")
        self.assertRaises(ValueError, RemoteModuleAPI, ["s"], 80, "http", metadata={"k": 1})
        self.assertRaises(ValueError, RemoteAPI, "a/b", [])
        self.assertRaises(ValueError, RemoteAPI, "", [])
        api = RemoteModuleAPI(["s"], 80, "http", metadata={"a": "b"})
        self.assertEqual(api.metadata, {"a": "b"})
        self.assertEqual(hash(api), hash(RemoteModuleAPI(["s"], 80, "http", metadata={"a": "c"})))


def _error_of(function: Any, *args: Any) -> RegistryError | None:
    try:
        function(*args)
    except RegistryError as e:
        return e
    return None


async def _gather(ds: list[Deferred[Any]]) -> list[Any]:
    return [await d for d in ds]


def _open_channels(site: Any) -> list[Any]:
    # The site does not keep its channels; find them through the reactor's readers.
    return [
        reader.protocol
        for reader in reactor.getReaders()  # type: ignore[attr-defined]
        if getattr(getattr(reader, "protocol", None), "site", None) is site
    ]

"""
Tests for issue 13, "bounded under abuse": each row of the issue as a
regression test (it failed before the change).

 - Memory in bytes, not items: the replay buffer, each watcher's lag and each
   registration are bounded in bytes; an event is encoded once and shared.
 - Memory comes back: closed streams let their buffers go without waiting
   for a full collection.
 - The reactor never stalls: replays are written as the client reads, a
   change is written to watchers in batches across reactor turns, large
   catalog answers are built in slices and shared per change.
 - Watch streams and held queries are bounded in number, in all and per
   peer, with a JSON 429/503 naming the limit.

Most run on a L{task.Clock} over in-memory transports; those about socket
buffers and descriptors run over real loopback sockets.
"""

from __future__ import annotations

import gc
import json
import random
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hsu_registry.model import (
    CRITICAL,
    PASSING,
    UNKNOWN,
    Limits,
    ModuleAPI,
    PublishRequest,
    Registration,
    encode_json,
)
from hsu_registry.registry import Registry
from hsu_registry.security.identity import Identity
from hsu_registry.security.policy import open_policy
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.site import RegistrySite

from .helpers import publish_body

# -- helpers ---------------------------------------------------------------------


def big_api(size: int, port: int = 50051, service: str = "big") -> ModuleAPI:
    """An API whose metadata makes its registration about C{size} bytes."""
    values = max(1, size // 1030)
    return ModuleAPI(
        service_ids=(service,),
        server_port=port,
        protocol="grpc",
        metadata=tuple((f"k{i:04d}", "v" * 1000) for i in range(values)),
    )


def big_request(module_id: str, size: int, salt: int = 0) -> PublishRequest:
    """
    A publish of about C{size} bytes (given to the registry directly: the
    HTTP API's registration limit does not apply).
    """
    return PublishRequest(module_id, 1, (big_api(size, port=1000 + salt % 60000),))


class BufferedTransport(StringTransport):
    """
    An in-memory transport that, like Twisted's, pauses its producer once
    more than C{limit} bytes are buffered, and resumes it when the client
    has read them all (L{read}).
    """

    def __init__(self, limit: int = 16 * 1024) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.limit = limit
        self.full = False
        self.received = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        self._check()

    def writeSequence(self, seq: Any) -> None:
        super().writeSequence(seq)
        self._check()

    def _check(self) -> None:
        if self.producer is not None and not self.full and len(self.value()) > self.limit:
            self.full = True
            self.producer.pauseProducing()

    def buffered(self) -> int:
        return len(self.value())

    def read(self) -> bytes:
        """The client reads what is buffered; the producer is resumed."""
        data = self.value()
        self.received += data
        self.clear()
        if self.full and self.producer is not None:
            self.full = False
            self.producer.resumeProducing()
        return data


class Client:
    """One connection to the site, over a L{BufferedTransport}."""

    def __init__(self, site: RegistrySite, limit: int = 16 * 1024) -> None:
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = BufferedTransport(limit)
        self.channel.makeConnection(self.transport)

    def get(self, path: str, headers: dict[str, str] | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: r\r\n{extra}\r\n".encode())

    def post(self, path: str, body: bytes) -> None:
        self.channel.dataReceived(
            f"POST {path} HTTP/1.1\r\nHost: r\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def everything(self) -> bytes:
        return self.transport.received + self.transport.value()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        head, _, body = self.everything().partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = dechunk(body)
        return int(lines[0].split()[1]), headers, body

    def events(self) -> list[tuple[str, str]]:
        """The SSE events received so far: (id, event)."""
        out = []
        for block in self.response()[2].decode().split("\n\n"):
            fields = dict(
                line.partition(": ")[::2]
                for line in block.split("\n")
                if line and not line.startswith(":")
            )
            if "event" in fields:
                out.append((fields["id"], fields["event"]))
        return out


def dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        if not size_line:
            break
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        data = rest[size + 2 :]
    return b"".join(out)


class Counting:
    """
    Counts the registrations a registry hands out (get, providers,
    registrations) or is asked the last-seen time of.
    """

    def __init__(self, registry: Registry) -> None:
        self.count = 0
        get, providers, registrations, last_seen = (
            registry.get,
            registry.providers,
            registry.registrations,
            registry.last_seen,
        )

        def counted_last_seen(module_id: str) -> float | None:
            self.count += 1
            return last_seen(module_id)

        def counted_get(module_id: str) -> Registration | None:
            self.count += 1
            return get(module_id)

        def counted_providers(service_id: str) -> list[tuple[Registration, float]]:
            found = providers(service_id)
            self.count += len(found)
            return found

        def counted_registrations() -> Iterator[tuple[Registration, float]]:
            for item in registrations():
                self.count += 1
                yield item

        registry.get = counted_get  # type: ignore[method-assign]
        registry.providers = counted_providers  # type: ignore[method-assign]
        registry.registrations = counted_registrations  # type: ignore[method-assign]
        registry.last_seen = counted_last_seen  # type: ignore[method-assign]

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def run_turns(clock: Clock, each: Callable[[], None] = lambda: None) -> int:
    """
    Run the clock's due calls one reactor turn at a time (a call made by
    one runs in the next turn), calling C{each} after every call; how many
    ran.
    """
    ran = 0
    while clock.calls and clock.calls[0].getTime() <= clock.seconds():
        call = clock.calls.pop(0)
        call.called = 1
        call.func(*call.args, **call.kw)
        ran += 1
        each()
    return ran


class Deployment(SynchronousTestCase):
    """A registry, change log and API on a clock, with the open policy."""

    modules = 0

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(MemoryStore(), self.clock, max_modules=10**6, policy=open_policy())
        self.changelog = ChangeLog(self.registry, self.clock, jitter=random.Random(0))
        self.api = RegistryAPI(
            self.registry,
            changelog=self.changelog,
            clock=self.clock,
            identify=lambda request: Identity("uid", "1000", uid=1000),
        )
        self.site = RegistrySite(self.api.resource(), reactor=self.clock)
        for i in range(self.modules):
            self.small(f"m{i}")

    def small(self, module_id: str, *services: str) -> None:
        request = PublishRequest(module_id, 7, (ModuleAPI(services or ("shared",), 50051, "grpc"),))
        self.successResultOf(self.registry.publish(request))

    def client(self, limit: int = 16 * 1024) -> Client:
        return Client(self.site, limit)


# -- row 1: one module republished 1 000 times ---------------------------------------


class ReplayBufferBytesTests(Deployment):
    def test_republished_module_bounded_in_bytes(self) -> None:
        """
        One module published again and again with a large registration
        keeps at most the replay buffer's byte budget (16 MiB by default),
        not 4 096 times the registration.
        """
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.small("first")
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(150):
            self.successResultOf(self.registry.publish(big_request("big", 200_000, i)))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        # 150 x 200 kB = 30 MB before; the budget and the registry's own copy now.
        self.assertLess(grown, 16 * 1024 * 1024 + 2 * 200_000 + 1024 * 1024)

    def test_registration_size_limit(self) -> None:
        """A publish whose registration is over the limit is a JSON 413 naming it."""
        api = RegistryAPI(
            self.registry,
            Limits(max_registration_size=4096),
            changelog=self.changelog,
            clock=self.clock,
        )
        site = RegistrySite(api.resource(), reactor=self.clock)
        client = Client(site)
        metadata = {f"k{i}": "v" * 100 for i in range(50)}
        apis = [{"serviceIDs": ["s"], "serverPort": 1, "protocol": "grpc", "metadata": metadata}]
        client.post("/api/v1/publish", publish_body("big", apis=apis))
        status, _, body = client.response()
        answer = json.loads(body)
        self.assertEqual(status, 413)
        self.assertEqual(answer["context"]["maxRegistrationSize"], 4096)
        self.assertGreater(answer["context"]["size"], 4096)
        self.assertIsNone(self.registry.get("big"))
        ok = Client(site)
        ok.post("/api/v1/publish", publish_body("small"))
        self.assertEqual(ok.response()[0], 200)


# -- row 2: one large event, many watchers that do not read ----------------------------


class SharedEventTests(Deployment):
    def test_one_encoding_for_every_watcher(self) -> None:
        """
        Every stream writes the very same bytes object of an event (the
        change log's), never a copy of its own, and a large event goes out
        in slices as each transport takes it: what a watcher that does not
        read holds is about its transport's buffer, not the event.
        """
        written: list[list[bytes]] = []
        clients = [self.client() for _ in range(20)]
        for client in clients:
            client.get("/api/v1/watch")
            seen: list[bytes] = []
            written.append(seen)
            original = client.transport.writeSequence

            def record(seq: Any, seen: list[bytes] = seen, original: Any = original) -> None:
                seen.extend(seq)
                original(seq)

            client.transport.writeSequence = record  # type: ignore[method-assign]
        small = PublishRequest("small", 1, (ModuleAPI(("s",), 1, "grpc"),))
        self.successResultOf(self.registry.publish(small))
        self.clock.advance(0)
        event = self.changelog.entry(self.registry.index)
        assert event is not None
        for seen in written:
            self.assertTrue(any(part is event.event() for part in seen))
        self.successResultOf(self.registry.publish(big_request("big", 1_000_000)))
        self.clock.advance(0)
        for client in clients:
            # Paused by its transport after about its buffer's worth.
            self.assertLess(client.transport.buffered(), 16 * 1024 + 16 * 1024)

    def test_slow_watcher_disconnected_by_bytes(self) -> None:
        """A watcher that falls behind by more bytes than its budget is disconnected."""
        self.api.watchers.queue_bytes = 300_000
        slow, fast = self.client(), self.client()
        slow.get("/api/v1/watch")
        fast.get("/api/v1/watch")
        slow.channel.pauseProducing()  # its transport is full

        def publish(name: str) -> None:
            self.successResultOf(self.registry.publish(big_request(name, 200_000)))
            for _ in range(100):
                fast.transport.read()
                self.clock.advance(0)

        publish("a")
        self.assertFalse(slow.transport.disconnecting)
        publish("b")
        self.assertTrue(slow.transport.disconnecting)
        self.assertEqual([e for _, e in fast.events()], ["hello", "published", "published"])
        self.assertEqual(len(self.api.watchers.streams), 1)


# -- row 3: replay of 300 large events, not read -------------------------------------


class ReplayTests(Deployment):
    def test_replay_written_as_the_client_reads(self) -> None:
        """
        A replay of 300 events of 20 kB is not written at once: the opening
        writes about the transport's buffer, each read lets the next part
        out, and the client ends up with every event once, in order.
        """
        for i in range(300):
            self.successResultOf(self.registry.publish(big_request(f"m{i}", 20_000)))
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        client = self.client()
        client.get("/api/v1/watch", {"Last-Event-ID": "0", "X-HSU-Epoch": self.registry.epoch})
        # Before: the whole replay, encoded and joined (about 6 MB, twice).
        self.assertLess(client.transport.buffered(), 64 * 1024)
        self.assertLess(tracemalloc.get_traced_memory()[0] - before, 1024 * 1024)
        self.clock.advance(0)
        self.assertLess(client.transport.buffered(), 64 * 1024)
        for _ in range(2000):
            client.transport.read()
            self.clock.advance(0)
            if self.api.watchers.streams and client.transport.buffered() == 0:
                stream = next(iter(self.api.watchers.streams))
                if stream.cursor == self.registry.index:
                    break
        events = client.events()
        self.assertEqual(events[0], ("0", "hello"))
        self.assertEqual([int(i) for i, _ in events[1:]], list(range(1, 301)))

    def test_replay_work_per_turn_is_bounded(self) -> None:
        """
        However fast the transport takes it, a replay is written a bounded
        amount per reactor turn, so other requests are served in between.
        """
        for i in range(200):
            self.successResultOf(self.registry.publish(big_request(f"m{i}", 20_000)))
        client = self.client(limit=10**9)  # a transport that never says it is full
        client.get("/api/v1/watch", {"Last-Event-ID": "0"})
        sizes = [client.transport.buffered()]

        def measure() -> None:
            sizes.append(client.transport.buffered() - sum(sizes))

        run_turns(self.clock, measure)
        self.assertLess(max(sizes), 1024 * 1024)
        self.assertEqual(len(client.events()), 201)


# -- row 4: closed connections ---------------------------------------------------------


class LoopbackTestCase(TestCase):
    """A registry served over loopback TCP by the real reactor."""

    def setUp(self) -> None:
        self.registry = Registry(MemoryStore(), reactor, max_modules=10**6, policy=open_policy())
        self.changelog = ChangeLog(self.registry, reactor)
        self.api = RegistryAPI(self.registry, changelog=self.changelog, clock=reactor)
        self.site = RegistrySite(self.api.resource(), reactor=reactor)
        self.channels: list[Any] = []
        build = self.site.buildProtocol

        def keep(addr: Any) -> Any:
            channel = build(addr)
            self.channels.append(channel)
            return channel

        self.site.buildProtocol = keep  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        # Accepted sockets inherit a small send buffer: what the kernel does
        # not take stays in the daemon's memory.
        self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.sockets: list[socket.socket] = []
        self.addCleanup(self.close_all)

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        for channel in self.channels:
            if channel.transport is not None and not channel.transport.disconnected:
                channel.transport.abortConnection()

    def watch(self, headers: str = "") -> socket.socket:
        """A watcher that never reads, with a small receive buffer."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", self.port.getHost().port))
        sock.sendall(f"GET /api/v1/watch HTTP/1.1\r\nHost: r\r\n{headers}\r\n".encode())
        self.sockets.append(sock)
        return sock

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"{what}: not within {timeout} s")
            await deferLater(reactor, 0.01, lambda: None)

    async def settled(self) -> None:
        """Wait until the daemon's buffers stop changing (the kernel took what it takes)."""
        last, same = -1, 0
        while same < 10:
            now = self.buffered()
            same = same + 1 if now == last else 0
            last = now
            await deferLater(reactor, 0.02, lambda: None)

    def buffered(self) -> int:
        """The bytes the daemon's connections hold, waiting for their clients."""
        total = 0
        for channel in self.channels:
            transport = channel.transport
            if transport is not None:
                total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        return total


class LargeEventOverSocketsTests(LoopbackTestCase):
    async def test_large_event_to_watchers_that_do_not_read(self) -> None:
        """
        One 1 MB event to 20 watchers that do not read: each connection holds
        about its buffer (16 kB and a slice), not a copy of the event (the
        event is shared; before, each held the rest of its own 1 MB copy).
        """
        for _ in range(20):
            self.watch()
        await self.until(lambda: len(self.api.watchers.streams) == 20, "watchers open")
        self.successResultOf(self.registry.publish(big_request("big", 1_000_000)))
        await self.settled()
        self.assertLess(self.buffered(), 20 * 40 * 1024)


class ClosedConnectionTests(LoopbackTestCase):
    async def test_memory_and_descriptors_come_back(self) -> None:
        """
        Replays that were not read, from connections that lived long enough
        to reach the collector's oldest generation, then closed: every
        descriptor is closed and the memory is let go soon after, without a
        full collection triggered by other traffic.
        """
        for i in range(40):
            self.successResultOf(self.registry.publish(big_request(f"m{i}", 50_000)))
        reclaimer = getattr(self.api.watchers, "reclaimer", None)
        if reclaimer is not None:
            reclaimer.delay = 0.0
            reclaimer.threshold = 1
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before = 0
        for cycle in range(4):
            if cycle == 1:
                # After a first cycle (which encodes the events once, for good).
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
            for _ in range(5):
                self.watch(f"Last-Event-ID: 0\r\nX-HSU-Epoch: {self.registry.epoch}\r\n")
            await self.until(lambda: len(self.api.watchers.streams) == 5, "replays open")
            await self.settled()
            gc.collect()  # they are old now: only a full collection would free them
            for sock in self.sockets:
                sock.close()
            self.sockets = []
            await self.until(lambda: not self.api.watchers.streams, "streams closed")
            await self.until(
                lambda: all(c.transport is None or c.transport.disconnected for c in self.channels),
                "descriptors closed",
            )
            for _ in range(5):
                await deferLater(reactor, 0.01, lambda: None)
            if cycle:
                held = tracemalloc.get_traced_memory()[0] - before
                # Before: 5 x 2 MB of replay per cycle, until a full collection.
                self.assertLess(held, 0.2 * before + 512 * 1024, f"cycle {cycle}")


# -- row 5: 10 000 watchers, publish p99 ---------------------------------------------


class FanOutTests(Deployment):
    def test_publish_writes_to_a_bounded_batch(self) -> None:
        """
        A publish writes its event to at most a batch of watchers in its own
        reactor turn (256); the others get it in the next turns, so the
        publish's answer waits no longer with 2 000 watchers than with 200.
        """
        clients = [self.client() for _ in range(600)]
        for client in clients:
            client.get("/api/v1/watch")
            client.transport.read()
        self.small("a")
        reached = sum(1 for c in clients if c.transport.buffered())
        self.assertLessEqual(reached, 256)
        turns = run_turns(self.clock)
        self.assertGreaterEqual(turns, 2)
        self.assertTrue(all(c.transport.buffered() for c in clients))

    def test_changes_of_one_turn_coalesce(self) -> None:
        """
        A hundred changes in one turn (an expiry batch) cost each watcher
        one write in a later turn, not a hundred passes over every watcher.
        """
        clients = [self.client() for _ in range(300)]
        for client in clients:
            client.get("/api/v1/watch")
            client.transport.read()
        writes = [0]
        for client in clients:
            original = client.transport.writeSequence

            def counted(seq: Any, original: Any = original) -> None:
                writes[0] += 1
                original(seq)

            client.transport.writeSequence = counted  # type: ignore[method-assign]
        for i in range(100):
            self.small(f"x{i}")
        self.assertLessEqual(writes[0], 256)
        self.clock.advance(0)
        # A few writes each (events are written a few kB at a time), not 100.
        self.assertLess(writes[0], 300 * 10)
        for _ in range(10):
            for client in clients:
                client.transport.read()
            self.clock.advance(0)
        self.assertEqual({len(client.events()) for client in clients}, {101})


# -- row 6: 100 000 modules, services and catalog ---------------------------------------


class LargeCatalogTests(Deployment):
    modules = 5000

    def test_services_built_in_slices(self) -> None:
        """
        A service with 5 000 providers is answered after a few turns, each
        looking at no more than 1 000 registrations; a health request sent
        meanwhile is answered at once.
        """
        counting = Counting(self.registry)
        slow = self.client()
        slow.get("/api/v1/services/shared")
        per_turn = [counting.take()]
        self.assertLessEqual(per_turn[0], 1000)
        health = self.client()
        health.get("/api/v1/health")
        self.assertEqual(health.response()[0], 200)
        run_turns(self.clock, lambda: per_turn.append(counting.take()))
        self.assertLessEqual(max(per_turn), 1000)
        self.assertEqual(sum(per_turn), 5000)
        for _ in range(100):
            slow.transport.read()
            self.clock.advance(0)
        status, headers, body = slow.response()
        self.assertEqual((status, headers["x-hsu-index"]), (200, "5000"))
        self.assertEqual(len(json.loads(body)["providers"]), 5000)

    def test_modules_built_in_slices(self) -> None:
        """The catalog of 5 000 modules is built 1 000 at most per turn."""
        counting = Counting(self.registry)
        client = self.client()
        client.get("/api/v1/modules")
        per_turn = [counting.take()]
        run_turns(self.clock, lambda: per_turn.append(counting.take()))
        self.assertLessEqual(max(per_turn), 1000)
        for _ in range(200):
            client.transport.read()
            self.clock.advance(0)
        self.assertEqual(len(json.loads(client.response()[2])["modules"]), 5000)

    def test_removed_while_built(self) -> None:
        """A module removed while the catalog is being built is left out, not an error."""
        client = self.client()
        client.get("/api/v1/modules")
        self.successResultOf(self.registry.unpublish("m4999"))
        for _ in range(200):
            client.transport.read()
            self.clock.advance(0)
        status, headers, body = client.response()
        modules = [m["moduleID"] for m in json.loads(body)["modules"]]
        self.assertEqual((status, headers["x-hsu-index"]), (200, "5000"))
        self.assertEqual(len(modules), 4999)
        self.assertNotIn("m4999", modules)

    def test_repeated_lookups_share_one_answer(self) -> None:
        """
        Clients looping on the same lookup get the answer built once per
        change index (and second): the second lookup looks at nothing.
        """
        counting = Counting(self.registry)
        first = self.client()
        first.get("/api/v1/services/shared")
        self.clock.advance(0)
        self.assertEqual(counting.take(), 5000)
        again = self.client()
        again.get("/api/v1/services/shared")
        self.clock.advance(0)
        self.assertEqual(counting.take(), 0)
        self.assertEqual(again.transport.value()[:15], b"HTTP/1.1 200 OK")

    def test_held_queries_woken_together_share_one_build(self) -> None:
        """
        Twenty held C{?index=} queries on a service, woken by one publish,
        are answered from one build of the answer, not twenty.
        """
        clients = [self.client() for _ in range(20)]
        for client in clients:
            client.get("/api/v1/services/shared?index=5000&wait=60s")
        self.assertEqual(self.changelog.held, 20)
        counting = Counting(self.registry)
        self.small("late")
        self.clock.advance(0.01)
        for _ in range(10):
            self.clock.advance(0)
        self.assertLessEqual(counting.take(), 5001 + 20)
        for client in clients:
            for _ in range(100):
                client.transport.read()
                self.clock.advance(0)
            status, headers, body = client.response()
            self.assertEqual((status, headers["x-hsu-index"]), (200, "5001"))
            self.assertEqual(len(json.loads(body)["providers"]), 5001)
        self.assertEqual(self.changelog.held, 0)

    def test_waiting_requests_answered_in_batches(self) -> None:
        """
        Requests that waited for the same build are answered (each starts
        writing it) 64 per turn, not all in the turn the build ends.
        """
        clients = [self.client() for _ in range(150)]
        for client in clients:
            client.get("/api/v1/services/shared")
        answered = [0]
        steps: list[int] = []

        def count() -> None:
            now = sum(1 for c in clients if c.transport.value())
            steps.append(now - answered[0])
            answered[0] = now

        run_turns(self.clock, count)
        self.assertEqual(answered[0], 150)
        self.assertLessEqual(max(steps), 64)

    def test_large_answer_written_as_the_client_reads(self) -> None:
        """A large answer is written in slices as the client reads, not copied whole."""
        client = self.client()
        client.get("/api/v1/modules")
        self.clock.advance(0)
        self.assertLess(client.transport.buffered(), 128 * 1024)
        for _ in range(200):
            client.transport.read()
            self.clock.advance(0)
        _, headers, body = client.response()
        self.assertEqual(int(headers["content-length"]), len(body))


class ServiceAnswerTests(Deployment):
    def reference(self, service_id: str, passing: bool) -> bytes:
        """The answer as it was built before (decoding every API)."""
        now = self.clock.seconds()
        providers = []
        for registration, _ in self.registry.providers(service_id):
            apis = [
                api.to_json()
                for api in registration.apis
                if service_id in api.service_ids and (api.passing or not passing)
            ]
            if apis:
                stale = self.registry.is_stale(registration.module_id, now)
                providers.append(
                    {
                        "moduleID": registration.module_id,
                        "processID": registration.process_id,
                        "apis": apis,
                        "state": "stale" if stale else "ready",
                    }
                )
        return encode_json({"serviceID": service_id, "providers": providers})

    def test_same_answer_as_before(self) -> None:
        """The services answer is byte for byte what it was, with and without ?passing."""
        from hsu_registry.checks.spec import CheckSpec

        check = CheckSpec("tcp", None, 10.0, 1.0)
        apis = [
            ModuleAPI(("s", "t"), 1, "grpc", "10.0.0.1", (("a", "b\u00e9"), ("c", '"q"'))),
            ModuleAPI(("t",), 2, "http", check=check, status=PASSING),
            ModuleAPI(("s",), 3, "http", check=check, status=CRITICAL),
            ModuleAPI(("s",), 4, "http", check=check, status=UNKNOWN),
        ]
        self.successResultOf(self.registry.publish(PublishRequest("multi", 5, tuple(apis))))
        self.successResultOf(self.registry.publish(PublishRequest("one", 6, (apis[2],))))
        self.successResultOf(self.registry.publish(PublishRequest('m\u00fc\\"x', 7, (apis[0],))))
        self.clock.advance(400)
        self.small("fresh", "s")
        for service_id in ("s", "t", "none"):
            for passing in (False, True):
                client = self.client()
                client.get(f"/api/v1/services/{service_id}{'?passing=1' if passing else ''}")
                self.clock.advance(0)
                self.assertEqual(
                    client.response()[2], self.reference(service_id, passing), service_id
                )


# -- limits on watchers and held queries ------------------------------------------------


class LimitTests(Deployment):
    def test_watchers_per_peer(self) -> None:
        """Past its share of watch streams a peer gets a JSON 429 naming the limit."""
        self.api.watchers.max_watchers_per_peer = 2
        for _ in range(2):
            self.client().get("/api/v1/watch")
        refused = self.client()
        refused.get("/api/v1/watch")
        status, headers, body = refused.response()
        answer = json.loads(body)
        self.assertEqual(status, 429)
        self.assertEqual(answer["context"]["limit"], "max-watchers-per-peer")
        self.assertEqual(answer["context"]["peer"], "uid:1000")
        self.assertIn("retry-after", headers)

    def test_watchers_in_all(self) -> None:
        """Past the daemon's total, a JSON 503."""
        self.api.watchers.max_watchers = 1
        self.client().get("/api/v1/watch")
        refused = self.client()
        refused.get("/api/v1/watch")
        status, _, body = refused.response()
        self.assertEqual((status, json.loads(body)["context"]["limit"]), (503, "max-watchers"))

    def test_closed_streams_free_their_share(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.api.watchers.max_watchers_per_peer = 1
        first = self.client()
        first.get("/api/v1/watch")
        first.channel.connectionLost(Failure(ConnectionDone()))
        again = self.client()
        again.get("/api/v1/watch")
        self.assertEqual(again.response()[0], 200)

    def test_held_queries_per_peer_and_in_all(self) -> None:
        """Held blocking queries are bounded per peer (429) and in all (503)."""
        from hsu_registry.watch import WatchLimits

        self.small("a")
        self.changelog.limits = WatchLimits(max_held_per_peer=2, max_held=3)
        for _ in range(2):
            self.client().get("/api/v1/modules?index=1&wait=30s")
        refused = self.client()
        refused.get("/api/v1/modules?index=1&wait=30s")
        status, _, body = refused.response()
        self.assertEqual(
            (status, json.loads(body)["context"]["limit"]), (429, "max-held-queries-per-peer")
        )
        # Not held (the index passed): not counted, not refused.
        passed = self.client()
        passed.get("/api/v1/modules?index=0&wait=30s")
        self.assertEqual(passed.response()[0], 200)
        self.api.identify_connection = lambda request: Identity("uid", "2", uid=2)
        self.client().get("/api/v1/modules?index=1&wait=30s")
        full = self.client()
        full.get("/api/v1/modules?index=1&wait=30s")
        status, _, body = full.response()
        self.assertEqual((status, json.loads(body)["context"]["limit"]), (503, "max-held-queries"))
        self.small("b")
        self.clock.advance(0.01)
        self.assertEqual(self.changelog.held, 0)


class ReclaimerTests(SynchronousTestCase):
    def test_reclaims_once_past_the_threshold(self) -> None:
        """
        Once enough buffers were let go, one pass a moment later collects the
        cycles and returns free memory to the system (malloc_trim on glibc);
        below the threshold nothing is scheduled.
        """
        from hsu_registry.web.watch import Reclaimer

        clock = Clock()
        reclaimer = Reclaimer(clock, threshold=100, delay=1.0)
        trims: list[int] = []

        def trim(pad: int) -> int:
            trims.append(pad)
            return 1

        reclaimer._trim = trim
        reclaimer.released(60)
        self.assertEqual(clock.getDelayedCalls(), [])
        reclaimer.released(60)
        reclaimer.released(60)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.rightNow += 1.0
        states: list[list[int]] = []
        # Collected in one turn, returned to the system in the next.
        run_turns(clock, lambda: states.append(list(trims)))
        self.assertEqual((states, reclaimer.pending), ([[], [0]], 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_collects_only_when_something_waits_for_it(self) -> None:
        """
        The collector runs only when some of the closed connections are still
        there (held in a reference cycle); else the pass only returns memory.
        """
        from twisted.logger import capturedLogs

        from hsu_registry.web.watch import Reclaimer

        class Witness:
            pass

        clock = Clock()
        reclaimer = Reclaimer(clock, threshold=1, delay=0)
        reclaimer._trim = lambda pad: 1
        gone, kept = Witness(), Witness()
        with capturedLogs() as events:
            reclaimer.released(10, gone)
            del gone
            clock.advance(0)
            reclaimer.released(10, kept)
            clock.advance(0)
        self.assertEqual([e["found"] is None for e in events], [True, False])
        self.assertEqual([e["waiting"] for e in events], [0, 1])

    def test_no_long_collection(self) -> None:
        """
        With more connections to walk than C{max_collect}, the pass leaves
        them to Python's own collector (and says so) rather than keep the
        reactor busy for long.
        """
        from twisted.logger import capturedLogs

        from hsu_registry.web.watch import Reclaimer

        class Witness:
            pass

        clock = Clock()
        reclaimer = Reclaimer(clock, threshold=1, delay=0, open_streams=lambda: 5000)
        reclaimer._trim = lambda pad: 1
        kept = Witness()
        with capturedLogs() as events:
            reclaimer.released(10, kept)
            clock.advance(0)
        self.assertIn("left to Python's own", events[0]["log_format"])
        self.assertEqual((events[1]["found"], events[1]["waiting"]), (None, 1))

    def test_closed_streams_are_counted(self) -> None:
        """Closing many streams (paused ones count more) schedules a reclaiming pass."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        clock = Clock()
        registry = Registry(MemoryStore(), clock, policy=open_policy())
        api = RegistryAPI(registry, clock=clock)
        site = RegistrySite(api.resource(), reactor=clock)
        api.watchers.reclaimer.threshold = 1024 * 1024
        clients = [Client(site) for _ in range(40)]
        for client in clients:
            client.get("/api/v1/watch")
            client.channel.pauseProducing()
        for client in clients:
            client.channel.connectionLost(Failure(ConnectionDone()))
        self.assertGreaterEqual(api.watchers.reclaimer.pending, 40 * 16 * 1024)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(1.0)
        clock.advance(0)
        self.assertEqual(api.watchers.reclaimer.pending, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

"""
Tests for the watch API and the catalog: SSE streams, replay and resync,
slow watchers, blocking queries and waits, driven through an in-memory
transport and a L{task.Clock}.
"""

from __future__ import annotations

import json
import random
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.site import RegistrySite

from .helpers import publish_request


class Connection:
    """One client connection to the site, over a StringTransport."""

    def __init__(self, site: RegistrySite) -> None:
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def get(self, path: str, headers: dict[str, str] | None = None) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: r\r\n{extra}\r\n".encode())

    @property
    def raw(self) -> bytes:
        return self.transport.value()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        head, _, body = self.raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = _dechunk(body)
        return int(lines[0].split()[1]), headers, body

    def events(self) -> list[tuple[str, str, Any]]:
        """The SSE events received so far: (id, event, data)."""
        out = []
        for block in self.response()[2].decode().split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line and not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
            if "event" in fields:
                out.append((fields["id"], fields["event"], json.loads(fields["data"])))
        return out


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        if not size_line:
            break
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


class WatchTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(MemoryStore(), self.clock, stale_after=300, expire_after=600)
        self.changelog = ChangeLog(
            self.registry, self.clock, size=8, max_wait=60, jitter=random.Random(0)
        )
        self.api = RegistryAPI(self.registry, changelog=self.changelog, clock=self.clock)
        self.api.watchers.queue_limit = 5
        self.site = RegistrySite(self.api.resource(), reactor=self.clock)

    def publish(self, name: str, apis: int = 1, service: str | None = None) -> None:
        request = publish_request(name, apis=apis)
        self.successResultOf(self.registry.publish(request))

    def connect(self) -> Connection:
        return Connection(self.site)


class StreamTests(WatchTestCase):
    def test_events_as_they_come(self) -> None:
        """A stream says hello, then one event per change with the index as its id."""
        watcher = self.connect()
        watcher.get("/api/v1/watch")
        status, headers, _ = watcher.response()
        self.assertEqual((status, headers["content-type"]), (200, "text/event-stream"))
        self.publish("a")
        self.publish("a", apis=2)
        self.successResultOf(self.registry.unpublish("a"))
        self.publish("b")
        self.clock.advance(601)
        self.successResultOf(self.registry.expire())
        events = [(i, e, d.get("moduleID")) for i, e, d in watcher.events()]
        self.assertEqual(
            events,
            [
                ("0", "hello", None),
                ("1", "published", "a"),
                ("2", "updated", "a"),
                ("3", "unpublished", "a"),
                ("4", "published", "b"),
                ("5", "expired", "b"),
            ],
        )
        hello = watcher.events()[0][2]
        self.assertEqual(hello["epoch"], self.registry.epoch)
        self.assertEqual(watcher.events()[2][2]["apis"][1]["serverPort"], 50052)

    def test_replay_after_reconnect(self) -> None:
        """A client reconnecting with Last-Event-ID gets exactly what it missed."""
        for name in "abc":
            self.publish(name)
        watcher = self.connect()
        watcher.get("/api/v1/watch", {"Last-Event-ID": "1", "X-HSU-Epoch": self.registry.epoch})
        self.assertEqual(
            [(i, e) for i, e, _ in watcher.events()],
            [("1", "hello"), ("2", "published"), ("3", "published")],
        )

    def test_resync_when_buffer_passed(self) -> None:
        """When the missed changes are no longer buffered, an explicit resync event is sent."""
        for i in range(12):
            self.publish(f"m{i}")
        watcher = self.connect()
        watcher.get("/api/v1/watch", {"Last-Event-ID": "2"})
        events = watcher.events()
        self.assertEqual([(i, e) for i, e, _ in events], [("12", "resync")])

    def test_resync_after_restart(self) -> None:
        """An epoch from another daemon start means resync, whatever the index."""
        self.publish("a")
        watcher = self.connect()
        watcher.get("/api/v1/watch?index=1&epoch=someotherepoch")
        self.assertEqual([e for _, e, _ in watcher.events()], ["resync"])

    def test_keepalive_and_idle_timeout(self) -> None:
        """Idle streams get keep-alive comments and are not cut by the idle timeout."""
        watcher = self.connect()
        watcher.get("/api/v1/watch")
        self.clock.pump([15] * 8)
        self.assertFalse(watcher.transport.disconnecting)
        self.assertEqual(watcher.raw.count(b": keep-alive"), 8)

    def test_slow_watcher_disconnected(self) -> None:
        """A watcher that does not read is disconnected past its queue limit; others are fine."""
        slow, fast = self.connect(), self.connect()
        slow.get("/api/v1/watch")
        fast.get("/api/v1/watch")
        slow.channel.pauseProducing()  # its socket buffer is full
        for i in range(5):
            self.publish(f"m{i}")
        self.assertFalse(slow.transport.disconnecting)
        self.publish("m5")
        self.assertTrue(slow.transport.disconnected)
        self.clock.advance(0)  # changes after the first of a turn go out in the next batch
        self.assertEqual(len(fast.events()), 7)
        self.assertEqual(len(self.api.watchers.streams), 1)

    def test_disconnect_cleans_up(self) -> None:
        """A client that goes away leaves nothing behind: no stream, no timer."""
        watcher = self.connect()
        watcher.get("/api/v1/watch")
        watcher.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.api.watchers.streams, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shutdown_ends_streams(self) -> None:
        """Closing the hub (daemon stop) finishes every stream."""
        watcher = self.connect()
        watcher.get("/api/v1/watch")
        self.api.watchers.close()
        self.assertTrue(watcher.raw.endswith(b"0\r\n\r\n"))
        self.assertEqual(self.api.watchers.streams, set())

    def test_bad_last_event_id(self) -> None:
        """A Last-Event-ID that is not an index is a JSON 400."""
        watcher = self.connect()
        watcher.get("/api/v1/watch", {"Last-Event-ID": "yesterday"})
        status, _, body = watcher.response()
        self.assertEqual(status, 400)
        self.assertFalse(json.loads(body)["success"])


class BlockingQueryTests(WatchTestCase):
    def test_index_headers(self) -> None:
        """Discover and catalog answers carry the change index and the epoch."""
        self.publish("a")
        client = self.connect()
        client.get("/api/v1/discover/a")
        _, headers, _ = client.response()
        self.assertEqual(
            (headers["x-hsu-index"], headers["x-hsu-epoch"]), ("1", self.registry.epoch)
        )

    def test_held_until_change(self) -> None:
        """?index=N holds the answer until the index passes N, then answers the new state."""
        self.publish("a")
        client = self.connect()
        client.get("/api/v1/modules?index=1&wait=30s")
        self.assertEqual(client.raw, b"")
        self.clock.advance(10)
        self.publish("b")
        self.clock.advance(0.002)
        status, headers, body = client.response()
        self.assertEqual((status, headers["x-hsu-index"]), (200, "2"))
        self.assertEqual([m["moduleID"] for m in json.loads(body)["modules"]], ["a", "b"])

    def test_held_until_wait_ends(self) -> None:
        """With no change, the current state is answered when the wait ends."""
        self.publish("a")
        client = self.connect()
        client.get("/api/v1/modules/a?index=1&wait=30s")
        self.clock.advance(29)
        self.assertEqual(client.raw, b"")
        self.clock.advance(30 / 16 + 1)
        self.assertEqual(client.response()[0], 200)

    def test_old_index_answers_at_once(self) -> None:
        self.publish("a")
        self.publish("b")
        client = self.connect()
        client.get("/api/v1/modules?index=1&wait=30s")
        self.assertEqual(client.response()[0], 200)

    def test_cancelled_by_client(self) -> None:
        """A client that leaves a blocking query leaves no waiter and no timer."""
        client = self.connect()
        client.get("/api/v1/modules?index=0&wait=30s")
        self.assertEqual(self.changelog.waiting, 1)
        client.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.changelog.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_for_a_dependency(self) -> None:
        """discover?wait= for a module not there yet answers when it appears."""
        client = self.connect()
        client.get("/api/v1/discover/late?wait=30s")
        self.assertEqual(client.raw, b"")
        self.publish("other")
        self.clock.advance(0.002)
        self.assertEqual(client.raw, b"")
        self.publish("late")
        self.clock.advance(0.002)
        status, _, body = client.response()
        self.assertEqual((status, json.loads(body)["moduleID"]), (200, "late"))

    def test_wait_for_a_dependency_times_out(self) -> None:
        """...and 404 when the wait ends without it."""
        client = self.connect()
        client.get("/api/v1/discover/late?wait=5s")
        self.clock.advance(6)
        status, _, body = client.response()
        self.assertEqual((status, json.loads(body)["error"]), (404, "module not found"))

    def test_shutdown_answers_held_queries(self) -> None:
        """Stopping the daemon answers held queries with what there is, not a cut connection."""
        client = self.connect()
        client.get("/api/v1/modules?index=0&wait=30s")
        self.changelog.close()
        self.assertEqual(client.response()[0], 200)

    def test_one_catalog_per_change(self) -> None:
        """Queries woken by one change share one encoded catalog."""
        self.publish("a")
        clients = [self.connect() for _ in range(3)]
        for client in clients:
            client.get("/api/v1/modules?index=1&wait=30s")
        builds = self.api.answers.builds
        self.publish("b")
        self.clock.advance(0.002)
        self.assertEqual([c.response()[0] for c in clients], [200, 200, 200])
        self.assertEqual(self.api.answers.builds, builds + 1)

    def test_bad_wait(self) -> None:
        client = self.connect()
        client.get("/api/v1/modules?index=0&wait=forever")
        self.assertEqual(client.response()[0], 400)


class CatalogTests(WatchTestCase):
    def test_modules(self) -> None:
        """The catalog lists every registration with its times and state."""
        self.publish("a")
        self.clock.advance(400)
        self.publish("b")
        client = self.connect()
        client.get("/api/v1/modules")
        modules = {m["moduleID"]: m for m in json.loads(client.response()[2])["modules"]}
        self.assertEqual(modules["b"]["state"], "ready")
        self.assertEqual(modules["a"]["state"], "stale")
        self.assertIn("not seen since", modules["a"]["reason"])
        self.assertEqual(modules["a"]["processID"], 1234)
        self.assertTrue(modules["a"]["registeredAt"].endswith("Z"))

    def test_one_module(self) -> None:
        self.publish("a", apis=2)
        client = self.connect()
        client.get("/api/v1/modules/a")
        entry = json.loads(client.response()[2])
        self.assertEqual((entry["moduleID"], len(entry["apis"]), entry["state"]), ("a", 2, "ready"))
        missing = self.connect()
        missing.get("/api/v1/modules/nope")
        self.assertEqual(missing.response()[0], 404)

    def test_services(self) -> None:
        """A service lookup lists every module and API that serves it."""
        self.publish("a", apis=2)  # service0, service1
        self.publish("b", apis=1)  # service0
        client = self.connect()
        client.get("/api/v1/services/service0")
        body = json.loads(client.response()[2])
        self.assertEqual(body["serviceID"], "service0")
        self.assertEqual(sorted(p["moduleID"] for p in body["providers"]), ["a", "b"])
        self.assertEqual(len(body["providers"][0]["apis"]), 1)
        self.successResultOf(self.registry.unpublish("a"))
        again = self.connect()
        again.get("/api/v1/services/service1")
        self.assertEqual(json.loads(again.response()[2])["providers"], [])

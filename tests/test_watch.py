"""
Tests for L{hsu_registry.watch}: the change buffer's replay/resync boundary
and blocking queries, on a L{task.Clock}.
"""

from __future__ import annotations

import json
import random
import weakref
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.model import ModuleAPI, PublishRequest
from hsu_registry.registry import ChangeKind, Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog, WatchLimitReached, WatchLimits

from .helpers import publish_request


class ChangeLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock)
        self.log = ChangeLog(
            self.registry, self.clock, size=5, max_wait=60, jitter=random.Random(1)
        )

    def publish(self, name: str, apis: int = 1) -> None:
        self.successResultOf(self.registry.publish(publish_request(name, apis=apis)))

    def test_since_replays_missed_changes(self) -> None:
        """Changes after an index still in the buffer are replayed in order."""
        for i in range(3):
            self.publish(f"m{i}")
        self.assertEqual([c.index for c in self.log.since(1) or []], [2, 3])
        self.assertEqual(self.log.since(3), [])
        self.assertEqual([c.module_id for c in self.log.since(0) or []], ["m0", "m1", "m2"])

    def test_resync_boundary(self) -> None:
        """Past the buffer's reach, since() says resynchronise; right at its edge it replays."""
        for i in range(8):
            self.publish(f"m{i}")
        # The buffer holds indexes 4..8.
        self.assertEqual([c.index for c in self.log.since(3) or []], [4, 5, 6, 7, 8])
        self.assertIsNone(self.log.since(2))
        self.assertIsNone(self.log.since(0))

    def test_future_index_means_resync(self) -> None:
        """An index beyond the current one (from before a restart) asks for a resync."""
        self.publish("m")
        self.assertIsNone(self.log.since(99))

    def test_wait_fires_on_change(self) -> None:
        """A blocking query fires as soon as the index passes the one it saw."""
        self.publish("a")
        d = self.log.wait(1, 30)
        self.assertNoResult(d)
        self.publish("b")
        self.assertNoResult(d)  # answered in the next reactor turn, not inside the publish
        self.clock.advance(0.002)
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(self.log.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_times_out_with_jitter(self) -> None:
        """A quiet wait ends after the requested time, stretched by at most 1/16."""
        d = self.log.wait(0, 16)
        self.clock.advance(15.99)
        self.assertNoResult(d)
        self.clock.advance(1.01)
        self.assertEqual(self.successResultOf(d), 0)

    def test_wait_is_bounded(self) -> None:
        """No query waits longer than max_wait (plus jitter)."""
        d = self.log.wait(0, 10_000)
        self.clock.advance(60 * 17 / 16 + 0.01)
        self.successResultOf(d)

    def test_index_already_passed(self) -> None:
        """Waiting on an old index answers at once; so does an index from another epoch."""
        self.publish("a")
        self.publish("b")
        self.assertEqual(self.successResultOf(self.log.wait(1, 30)), 2)
        self.assertEqual(self.successResultOf(self.log.wait(50, 30)), 2)

    def test_cancel_forgets(self) -> None:
        """A client that goes away cancels its wait: no waiter, no timer left."""
        d = self.log.wait(0, 30)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.log.waiting, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_many_waiters_one_change(self) -> None:
        """One change wakes every waiter at once."""
        waits = [self.log.wait(0, 30) for _ in range(1000)]
        self.publish("a")
        self.clock.advance(0.002)
        self.assertEqual({self.successResultOf(d) for d in waits}, {1})

    def test_subscribers_see_every_change(self) -> None:
        """Registry observers (watch streams) see every change; unsubscribing stops them."""
        seen: list[ChangeKind] = []
        stop = self.registry.subscribe(lambda change: seen.append(change.kind))
        self.publish("a")
        self.publish("a", apis=2)
        stop()
        self.successResultOf(self.registry.unpublish("a"))
        self.assertEqual(seen, [ChangeKind.PUBLISHED, ChangeKind.UPDATED])

    def test_streams_before_queries(self) -> None:
        """
        Registry observers (watch streams) hear of a change before blocking
        queries are answered, and one that fails does not keep them waiting.
        """
        order: list[str] = []

        def failing(change: object) -> None:
            raise RuntimeError("a broken stream")

        self.registry.subscribe(failing)
        self.registry.subscribe(lambda change: order.append("stream"))
        self.log.wait(0, 30).addCallback(lambda _: order.append("query"))
        self.publish("a")
        self.clock.advance(0.002)
        self.assertEqual(order, ["stream", "query"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_close_answers_waiters(self) -> None:
        """Stopping the daemon answers every waiting query at once."""
        d = self.log.wait(0, 30)
        self.log.close()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ChangeLogBytesTests(SynchronousTestCase):
    """The replay buffer counted in bytes (issue 13), beside its count bound."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock)
        self.log = ChangeLog(self.registry, self.clock, size=100, max_bytes=5000)

    def publish(self, name: str, size: int, salt: int = 0) -> None:
        metadata = tuple((f"k{i}", "v" * 90) for i in range(size // 100))
        request = PublishRequest(name, 1, (ModuleAPI(("s",), 1 + salt, "grpc", None, metadata),))
        self.successResultOf(self.registry.publish(request))

    def test_bytes_bound(self) -> None:
        """The oldest changes go once the buffer holds more bytes than its budget."""
        for i in range(20):
            self.publish("big", 1000, i)
        self.assertLessEqual(self.log.kept_bytes, 5000)
        self.assertGreater(self.log.kept, 1)
        self.assertLess(self.log.kept, 20)
        first = self.log.first
        self.assertEqual(first, 21 - self.log.kept)
        self.assertIsNone(self.log.since(first - 2))
        self.assertEqual([c.index for c in self.log.since(first - 1) or []], list(range(first, 21)))
        kept = self.log.since(first - 1) or []
        self.assertEqual(self.log.kept_bytes, sum(c.size for c in kept))

    def test_newest_always_kept(self) -> None:
        """A change larger than the whole budget is still kept, alone."""
        self.publish("a", 100)
        self.publish("huge", 20_000)
        self.assertEqual(self.log.kept, 1)
        self.assertEqual([c.module_id for c in self.log.since(1) or []], ["huge"])

    def test_positions(self) -> None:
        """How far behind a change is, in bytes, from the changes' sizes."""
        for i in range(3):
            self.publish(f"m{i}", 500)
        sizes = [c.size for c in self.log.since(0) or []]
        self.assertEqual(self.log.position(3), self.log.logged_bytes)
        self.assertEqual(self.log.position(0), 0)
        self.assertEqual(self.log.position(1), sizes[0])
        self.assertEqual(self.log.logged_bytes, sum(sizes))

    def test_encoded_once_and_registration_let_go(self) -> None:
        """
        A change's event is encoded once; from then on the buffer holds the
        event, not the change and its registration.
        """
        held: list[weakref.ref[Any]] = []
        self.registry.subscribe(lambda change: held.append(weakref.ref(change.registration)))
        self.publish("m", 500)
        entry = self.log.entry(1)
        assert entry is not None
        self.assertIsNotNone(held[0]())  # not encoded yet: the change is kept
        event = entry.event()
        self.assertIs(entry.event(), event)
        self.assertIsNone(held[0]())
        self.assertTrue(event.startswith(b"id: 1\nevent: published\ndata: {"))
        self.assertTrue(event.endswith(b"}\n\n"))
        data = json.loads(event.split(b"data: ", 1)[1])
        self.assertEqual((data["moduleID"], data["index"]), ("m", 1))
        self.assertEqual(data["epoch"], self.registry.epoch)

    def test_held_query_limits(self) -> None:
        """admit() counts held queries per peer and in all; release is once only."""
        self.log.limits = WatchLimits(max_held=3, max_held_per_peer=2)
        first = self.log.admit("a")
        self.log.admit("a")
        error = self.assertRaises(WatchLimitReached, self.log.admit, "a")
        self.assertEqual(
            (error.status, error.context),
            (429, {"limit": "max-held-queries-per-peer", "max": 2, "peer": "a"}),
        )
        self.log.admit("b")
        error = self.assertRaises(WatchLimitReached, self.log.admit, "c")
        self.assertEqual(error.status, 503)
        first()
        first()
        self.assertEqual(self.log.held, 2)
        self.log.admit("a")

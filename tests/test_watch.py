"""
Tests for L{hsu_registry.watch}: the change buffer's replay/resync boundary
and blocking queries, on a L{task.Clock}.
"""

from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.registry import ChangeKind, Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog

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

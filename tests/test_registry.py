"""
Tests for L{hsu_registry.registry}: the registry logic, driven by a
L{task.Clock}, over the memory store and a controllable store.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from hsu_registry.errors import ModuleNotFound, NotOwner, RegistryFull, StoreUnavailable
from hsu_registry.interfaces import IRegistry
from hsu_registry.registry import Change, ChangeKind, Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.testing import ControllableStore

from .helpers import publish_request


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = ControllableStore()
        self.registry = Registry(
            self.store, self.clock, stale_after=300, expire_after=600, max_modules=3
        )
        self.changes: list[Change] = []
        self.registry.subscribe(self.changes.append)

    def publish(self, *args: Any, **kwargs: Any) -> Change:
        """Publish a change (not a heartbeat) and return it."""
        change = self.successResultOf(self.registry.publish(publish_request(*args, **kwargs)))
        assert change is not None, "expected a change, got a heartbeat"
        return change

    def changed(self, d: Deferred[Change | None]) -> Change:
        change = self.successResultOf(d)
        assert change is not None
        return change

    def test_interface(self) -> None:
        """The registry provides L{IRegistry}."""
        self.assertTrue(verifyObject(IRegistry, self.registry))

    def test_publish_then_discover(self) -> None:
        """A published module is discoverable with its APIs."""
        change = self.publish("echo", apis=2)
        self.assertEqual((change.index, change.kind), (1, ChangeKind.PUBLISHED))
        found = self.registry.discover("echo")
        self.assertEqual(found.process_id, 1234)
        self.assertEqual(len(found.apis), 2)
        self.assertEqual(self.store.writes, 1)

    def test_discover_unknown(self) -> None:
        """Discovering an unknown module raises L{ModuleNotFound}."""
        self.assertRaises(ModuleNotFound, self.registry.discover, "nope")

    def test_republish_keeps_registration_time(self) -> None:
        """Re-publishing replaces the APIs and process, keeps the first registration time."""
        self.publish("echo", apis=1)
        first = self.registry.get("echo")
        self.clock.advance(30)
        change = self.publish("echo", process_id=99, apis=3)
        self.assertEqual(change.kind, ChangeKind.UPDATED)
        now = self.registry.get("echo")
        assert first is not None and now is not None
        self.assertEqual(now.registered_at, first.registered_at)
        self.assertEqual((now.process_id, len(now.apis)), (99, 3))
        self.assertEqual(self.registry.health().total_apis, 3)

    def test_change_index_increments_on_every_mutation(self) -> None:
        """Publish, update, unpublish and expiry each take the next index."""
        self.publish("a")
        self.publish("a", apis=2)
        self.successResultOf(self.registry.unpublish("a"))
        self.publish("b")
        self.clock.advance(601)
        self.successResultOf(self.registry.expire())
        self.assertEqual(
            [(c.index, c.kind, c.module_id) for c in self.changes],
            [
                (1, ChangeKind.PUBLISHED, "a"),
                (2, ChangeKind.UPDATED, "a"),
                (3, ChangeKind.UNPUBLISHED, "a"),
                (4, ChangeKind.PUBLISHED, "b"),
                (5, ChangeKind.EXPIRED, "b"),
            ],
        )
        self.assertEqual(self.registry.index, 5)

    def test_epoch_differs_between_instances(self) -> None:
        """Each registry instance has its own epoch, so clients can tell a restart."""
        other = Registry(MemoryStore(), self.clock)
        self.assertNotEqual(self.registry.epoch, other.epoch)

    def test_unpublish_unknown_is_not_an_error(self) -> None:
        """Unpublishing a module that is not there succeeds with no change."""
        self.assertIsNone(self.successResultOf(self.registry.unpublish("ghost")))
        self.assertEqual(self.registry.index, 0)
        self.assertEqual(self.store.writes, 0)

    def test_unpublish_by_owner(self) -> None:
        """Unpublish with the owner's process ID removes the module."""
        self.publish("echo", process_id=7)
        change = self.successResultOf(self.registry.unpublish("echo", 7))
        assert change is not None
        self.assertEqual(change.kind, ChangeKind.UNPUBLISHED)
        self.assertIsNone(self.registry.get("echo"))

    def test_unpublish_by_other_process_refused(self) -> None:
        """Unpublish with another process ID fails with L{NotOwner} and changes nothing."""
        self.publish("echo", process_id=7)
        failure = self.failureResultOf(self.registry.unpublish("echo", 8), NotOwner)
        self.assertEqual(failure.value.context["registeredProcessID"], 7)
        self.assertIsNotNone(self.registry.get("echo"))
        self.assertEqual(self.registry.index, 1)

    def test_identical_republish_is_a_heartbeat(self) -> None:
        """The same content again refreshes the module and changes nothing else."""
        self.publish("echo")
        writes = self.store.writes
        self.clock.advance(250)
        self.assertIsNone(self.successResultOf(self.registry.publish(publish_request("echo"))))
        self.assertEqual((self.registry.index, len(self.changes)), (1, 1))
        self.assertEqual(self.store.writes, writes)
        self.assertEqual(self.registry.last_seen("echo"), self.clock.seconds())
        self.clock.advance(250)
        self.registry.discover("echo")  # not stale: the re-publish refreshed it
        self.successResultOf(self.registry.flush_heartbeats())
        self.assertEqual(self.successResultOf(self.store.load())[0].last_seen, self.clock.seconds())

    def test_republish_from_another_process_is_a_change(self) -> None:
        """Same APIs from another process is a change: the owner changed."""
        self.publish("echo", process_id=1)
        self.assertEqual(self.publish("echo", process_id=2).kind, ChangeKind.UPDATED)

    def test_stale_module_not_discoverable(self) -> None:
        """A module not seen for more than stale_after is not found."""
        self.publish("echo")
        self.clock.advance(300)
        self.registry.discover("echo")  # exactly at the limit: still there, refreshed
        self.clock.advance(300.5)
        self.assertRaises(ModuleNotFound, self.registry.discover, "echo")
        self.assertIsNotNone(self.registry.get("echo"))

    def test_discovery_is_a_heartbeat(self) -> None:
        """Discovering a module refreshes it, so it neither goes stale nor expires."""
        self.publish("echo")
        for _ in range(10):
            self.clock.advance(200)
            self.registry.discover("echo")
            self.assertEqual(self.successResultOf(self.registry.expire()), [])
        self.assertEqual(self.registry.last_seen("echo"), self.clock.seconds())

    def test_expire_removes_only_old_modules(self) -> None:
        """The cleanup removes modules not seen for expire_after and keeps the rest."""
        self.publish("old")
        self.clock.advance(400)
        self.publish("young")
        self.clock.advance(200.5)
        changes = self.successResultOf(self.registry.expire())
        self.assertEqual([(c.kind, c.module_id) for c in changes], [(ChangeKind.EXPIRED, "old")])
        self.assertIsNone(self.registry.get("old"))
        self.assertIsNotNone(self.registry.get("young"))
        self.assertEqual(self.registry.health().registered_modules, 1)

    def test_expire_in_batches(self) -> None:
        """Many expired modules are removed a batch per reactor turn, in order of age."""
        registry = Registry(
            MemoryStore(), self.clock, stale_after=300, expire_after=600, expire_batch=100
        )
        changes: list[Change] = []
        registry.subscribe(changes.append)
        for i in range(250):
            self.successResultOf(registry.publish(publish_request(f"m{i}")))
            self.clock.advance(0.001)
        self.clock.advance(601)
        d = registry.expire()
        self.assertNoResult(d)
        self.assertEqual(len(registry), 150)  # the first batch went at once
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the next waits a turn
        self.clock.advance(0)
        expired = self.successResultOf(d)
        self.assertEqual(len(expired), 250)
        self.assertEqual(len(registry), 0)
        self.assertEqual([c.module_id for c in expired[:3]], ["m0", "m1", "m2"])

    def test_expire_after_republish_uses_new_time(self) -> None:
        """A module unpublished and published anew is judged by its new time."""
        self.publish("echo")
        self.clock.advance(500)
        self.successResultOf(self.registry.unpublish("echo"))
        self.publish("echo")
        self.clock.advance(200)
        self.assertEqual(self.successResultOf(self.registry.expire()), [])
        self.clock.advance(401)
        self.assertEqual(len(self.successResultOf(self.registry.expire())), 1)

    def test_health(self) -> None:
        """Health counts modules, APIs and uptime from the clock."""
        self.publish("a", apis=2)
        self.publish("b", apis=3)
        self.clock.advance(9015)
        health = self.registry.health()
        self.assertEqual((health.registered_modules, health.total_apis), (2, 5))
        self.assertEqual(health.uptime, 9015)

    def test_max_modules(self) -> None:
        """Publishing a new module past max_modules fails; updates still work."""
        for name in "abc":
            self.publish(name)
        self.failureResultOf(self.registry.publish(publish_request("d")), RegistryFull)
        self.publish("a", apis=2)
        self.assertIsNone(self.registry.get("d"))

    def test_store_failure_changes_nothing(self) -> None:
        """When the store fails, the publish fails and memory, index and observers are unchanged."""
        self.publish("echo", apis=1)
        self.store.failing = True
        self.failureResultOf(
            self.registry.publish(publish_request("echo", apis=3)), StoreUnavailable
        )
        self.failureResultOf(self.registry.publish(publish_request("new")), StoreUnavailable)
        self.failureResultOf(self.registry.unpublish("echo"), StoreUnavailable)
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(self.registry.index, 1)
        found = self.registry.get("echo")
        assert found is not None
        self.assertEqual(len(found.apis), 1)
        self.assertIsNone(self.registry.get("new"))

    def test_unexpected_store_error_becomes_store_unavailable(self) -> None:
        """Any store exception is reported as L{StoreUnavailable} and logged."""
        self.store.failing = True
        self.store.failure_type = OSError
        self.failureResultOf(self.registry.publish(publish_request("x")), StoreUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_nothing_applied_before_store_acknowledges(self) -> None:
        """A publish is visible only once the store has acknowledged it."""
        self.store.holding = True
        d = self.registry.publish(publish_request("echo"))
        self.assertNoResult(d)
        self.assertIsNone(self.registry.get("echo"))
        self.store.release()
        self.assertEqual(self.changed(d).kind, ChangeKind.PUBLISHED)
        self.assertIsNotNone(self.registry.get("echo"))

    def test_mutations_of_one_module_are_serialised(self) -> None:
        """A second mutation of a module waits for the first and decides on its outcome."""
        self.store.holding = True
        first = self.registry.publish(publish_request("echo", process_id=1))
        second = self.registry.unpublish("echo", 1)
        third = self.registry.publish(publish_request("echo", process_id=2))
        self.assertEqual(self.store.pending, 1)
        self.store.release()  # publish 1 applied, unpublish starts
        self.store.release()  # unpublish applied, publish 2 starts
        self.store.release()
        self.assertEqual(self.changed(first).kind, ChangeKind.PUBLISHED)
        change = self.successResultOf(second)
        assert change is not None
        self.assertEqual(change.kind, ChangeKind.UNPUBLISHED)
        self.assertEqual(self.changed(third).kind, ChangeKind.PUBLISHED)
        self.assertEqual([c.index for c in self.changes], [1, 2, 3])

    def test_full_counts_pending_creations(self) -> None:
        """Creations still waiting for the store count against max_modules."""
        self.store.holding = True
        pending = [self.registry.publish(publish_request(n)) for n in "abc"]
        self.failureResultOf(self.registry.publish(publish_request("d")), RegistryFull)
        self.store.release()
        for d in pending:
            self.successResultOf(d)

    def test_expire_skips_modules_with_mutation_in_flight(self) -> None:
        """A module being re-published is not expired under the publish's feet."""
        self.publish("echo")
        self.clock.advance(601)
        self.store.holding = True
        d = self.registry.publish(publish_request("echo", apis=2))
        self.assertEqual(self.successResultOf(self.registry.expire()), [])
        self.store.release()
        self.assertEqual(self.changed(d).kind, ChangeKind.UPDATED)
        self.assertIsNotNone(self.registry.get("echo"))

    def test_observer_failure_is_logged_not_raised(self) -> None:
        """A failing observer does not break the mutation or other observers."""

        def broken(change: Change) -> None:
            raise ZeroDivisionError()

        unsubscribe_broken = self.registry.subscribe(broken)
        seen: list[Change] = []
        unsubscribe = self.registry.subscribe(seen.append)
        self.publish("echo")
        self.assertEqual(len(seen), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        unsubscribe()
        unsubscribe_broken()
        self.publish("echo", apis=2)
        self.assertEqual(len(seen), 1)
        self.assertEqual(self.flushLoggedErrors(ZeroDivisionError), [])

    def test_load_restores_store_contents(self) -> None:
        """A registry loads registrations and last-seen times from its store on start."""
        self.publish("a")
        self.clock.advance(100)
        self.registry.discover("a")
        self.successResultOf(self.registry.flush_heartbeats())
        fresh = Registry(self.store, self.clock, stale_after=300, expire_after=600)
        self.assertEqual(self.successResultOf(fresh.load()), 1)
        self.assertEqual(fresh.last_seen("a"), self.clock.seconds())
        self.clock.advance(601)
        self.assertEqual(len(self.successResultOf(fresh.expire())), 1)

    def test_expire_after_not_less_than_stale_after(self) -> None:
        """A registry whose expiry is shorter than its staleness is refused."""
        self.assertRaises(ValueError, Registry, MemoryStore(), self.clock, 600, 300)

    def test_expiry_heap_stays_bounded(self) -> None:
        """Heartbeats do not grow the expiry structure: one entry per module."""
        for name in "abc":
            self.publish(name)
        for _ in range(100):
            self.clock.advance(250)
            for name in "abc":
                self.registry.discover(name)
            self.successResultOf(self.registry.expire())
        self.assertLessEqual(len(self.registry._expiry), 3)


class HeartbeatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock, stale_after=300, expire_after=600)
        self.successResultOf(self.registry.publish(publish_request("echo", process_id=7)))

    def test_refreshes(self) -> None:
        """A heartbeat from the owner keeps the module fresh without discovery."""
        for _ in range(5):
            self.clock.advance(250)
            self.registry.heartbeat("echo", 7)
        self.registry.discover("echo")
        self.assertEqual(self.registry.index, 1)  # not a change

    def test_unknown_and_not_owner(self) -> None:
        """Unknown modules and other processes are refused."""
        self.assertRaises(ModuleNotFound, self.registry.heartbeat, "nope", None)
        error = self.assertRaises(NotOwner, self.registry.heartbeat, "echo", 8)
        self.assertEqual(error.context["registeredProcessID"], 7)

    def test_discovery_heartbeat_can_be_off(self) -> None:
        """With discover_heartbeat off, lookups do not keep a silent module alive."""
        registry = Registry(MemoryStore(), self.clock, discover_heartbeat=False)
        self.successResultOf(registry.publish(publish_request("echo")))
        for _ in range(2):
            self.clock.advance(150)
            registry.discover("echo")
        self.clock.advance(150)
        self.assertRaises(ModuleNotFound, registry.discover, "echo")  # 450 s after publishing

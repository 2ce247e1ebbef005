"""
Tests for L{hsu_registry.gctune} and the records' shape that the garbage
collector relies on.
"""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry import gctune
from hsu_registry.config import RegistryConfig
from hsu_registry.registry import Registry
from hsu_registry.service import makeService
from hsu_registry.stores.memory import MemoryStore

from .helpers import publish_request


class TableTests(SynchronousTestCase):
    def test_stays_tracked(self) -> None:
        """A Table of untracked values stays tracked through a collection (a dict would not)."""
        table: gctune.Table[str, float] = gctune.Table(a=1.0)
        plain = {"a": 1.0}
        gc.collect()
        self.assertTrue(gc.is_tracked(table))
        self.assertFalse(gc.is_tracked(plain))


class RegistryShapeTests(SynchronousTestCase):
    def test_registrations_untracked(self) -> None:
        """What the registry and the memory store hold for a module is untracked by the GC."""
        registry = Registry(MemoryStore(), Clock())
        self.successResultOf(registry.publish(publish_request("echo", apis=3)))
        gc.collect()
        self.assertFalse(gc.is_tracked(registry._modules["echo"]))
        self.assertFalse(gc.is_tracked(registry._store._records["echo"]))
        self.assertFalse(gc.is_tracked(registry._last_seen))
        self.assertFalse(gc.is_tracked(registry._expiry[0]))

    def test_store_and_registry_share_the_body(self) -> None:
        """The memory store and the registry share the encoded answer, not copies."""
        registry = Registry(MemoryStore(), Clock())
        self.successResultOf(registry.publish(publish_request("echo", apis=2)))
        self.assertIs(registry._modules["echo"][3], registry._store._records["echo"][3])

    def test_identical_republish_keeps_the_tuples(self) -> None:
        """Re-publishing the same content allocates no new stored tuple."""
        clock = Clock()
        registry = Registry(MemoryStore(), clock)
        self.successResultOf(registry.publish(publish_request("echo", apis=2)))
        stored, kept = registry._modules["echo"], registry._store._records["echo"]
        clock.advance(10)
        self.successResultOf(registry.publish(publish_request("echo", apis=2)))
        self.assertIs(registry._modules["echo"], stored)
        self.assertIs(registry._store._records["echo"], kept)
        self.assertEqual(registry.last_seen("echo"), 10)
        self.successResultOf(registry.publish(publish_request("echo", apis=3)))
        self.assertIsNot(registry._modules["echo"], stored)

    def test_replacements_trigger_young_collections(self) -> None:
        """Every thousandth replacement collects the youngest generation."""
        collected: list[int] = []
        self.patch(gctune.gc, "collect", lambda generation=2: collected.append(generation))
        self.patch(gctune, "_replacements", 0)
        for _ in range(2500):
            gctune.replaced()
        self.assertEqual(collected, [0, 0])

    def test_service_index(self) -> None:
        """The service index follows publishes and removals and stays untracked by the GC."""
        registry = Registry(MemoryStore(), Clock())
        for name in ("a", "b", "c"):
            self.successResultOf(registry.publish(publish_request(name, apis=2)))
        self.successResultOf(registry.unpublish("b"))
        providers = [r.module_id for r, _ in registry.providers("service0")]
        self.assertEqual(providers, ["a", "c"])
        self.successResultOf(registry.publish(publish_request("a", apis=1)))  # drops service1
        self.assertEqual([r.module_id for r, _ in registry.providers("service1")], ["c"])
        gc.collect()
        self.assertFalse(gc.is_tracked(registry._by_service["service0"]))

    def test_plain_round_trip(self) -> None:
        """A registration survives the trip to plain tuples and back unchanged."""
        registry = Registry(MemoryStore(), Clock())
        self.successResultOf(registry.publish(publish_request("echo", apis=2)))
        registration = registry.get("echo")
        assert registration is not None
        self.assertEqual(type(registration).from_plain(registration.plain()), registration)
        self.assertIs(type(registration.plain()), tuple)


class FreezeTests(SynchronousTestCase):
    def test_daemon_freezes_once_started(self) -> None:
        """With freeze_gc, starting the service freezes what exists; without, nothing."""
        calls: list[str] = []
        self.patch(gctune.gc, "freeze", lambda: calls.append("freeze"))
        self.patch(gctune.gc, "collect", lambda *a: calls.append("collect"))
        reactor = MemoryReactorClock()
        service = makeService(RegistryConfig(endpoints=(), freeze_gc=True), reactor)
        service.startService()
        self.assertEqual(calls, ["freeze"])
        self.successResultOf(service.stopService())
        calls.clear()
        service = makeService(RegistryConfig(endpoints=()), reactor)
        service.startService()
        self.assertEqual(calls, [])
        self.successResultOf(service.stopService())

"""
Tests for L{hsu_registry.threads}: calling a running registry from other
threads.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hsu_registry.errors import ModuleNotFound, NotOwner
from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.threads import BlockingRegistry

from .helpers import publish_request


class BlockingRegistryTests(TestCase):
    def setUp(self) -> None:
        self.registry = Registry(MemoryStore(), reactor)
        self.blocking = BlockingRegistry(reactor, self.registry)

    async def test_from_worker_threads(self) -> None:
        """Worker threads publish, discover and unpublish; each call runs on the reactor."""

        def work(n: int) -> list[object]:
            module_id = f"worker-{n}"
            self.blocking.publish(publish_request(module_id, process_id=n))
            found = self.blocking.discover(module_id)
            health = self.blocking.health()
            return [found.process_id, health.registered_modules >= 1]

        results = [await deferToThread(work, n) for n in range(5)]
        self.assertEqual(results, [[n, True] for n in range(5)])
        self.assertEqual(len(self.registry), 5)

    async def test_errors_raised_in_thread(self) -> None:
        """Registry errors are raised in the calling thread."""

        def work() -> list[str]:
            caught = []
            try:
                self.blocking.discover("nope")
            except ModuleNotFound:
                caught.append("not found")
            self.blocking.publish(publish_request("owned", process_id=1))
            try:
                self.blocking.unpublish("owned", 2)
            except NotOwner:
                caught.append("not owner")
            self.assertIsNotNone(self.blocking.unpublish("owned", 1))
            return caught

        self.assertEqual(await deferToThread(work), ["not found", "not owner"])

    def test_refused_on_reactor_thread(self) -> None:
        """Calling from the reactor thread would deadlock, so it raises at once."""
        self.assertRaises(RuntimeError, self.blocking.discover, "x")

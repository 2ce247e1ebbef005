"""
The L{IStore} contract, one suite run against every store implementation.
Later stores (SQLite, etcd) add a fixture here and inherit every test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from hsu_registry.interfaces import IStore
from hsu_registry.model import Registration
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.testing import ControllableStore

from .helpers import api


def registration(module_id: str, process_id: int = 1, at: float = 100.0) -> Registration:
    return Registration.create(
        module_id=module_id,
        process_id=process_id,
        apis=(api("s1"), api("s2", port=8080, protocol="http")),
        registered_at=at,
    )


if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class StoreContractMixin(_Base):
    """Tests every L{IStore} must pass; C{make_store} returns a fresh, empty store."""

    def make_store(self) -> IStore:
        raise NotImplementedError()

    def setUp(self) -> None:
        self.store = self.make_store()

    def load(self) -> dict[str, tuple[Registration, float]]:
        records = self.successResultOf(self.store.load())
        return {r.registration.module_id: (r.registration, r.last_seen) for r in records}

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IStore, self.store))

    def test_empty(self) -> None:
        self.assertEqual(self.load(), {})

    def test_save_and_load(self) -> None:
        """A saved registration loads back equal, with its last-seen time."""
        reg = registration("a")
        self.successResultOf(self.store.save(reg, 150.0))
        self.assertEqual(self.load(), {"a": (reg, 150.0)})

    def test_save_replaces(self) -> None:
        """Saving a module again replaces its record."""
        self.successResultOf(self.store.save(registration("a", 1), 1.0))
        newer = registration("a", 2)
        self.successResultOf(self.store.save(newer, 2.0))
        self.assertEqual(self.load(), {"a": (newer, 2.0)})

    def test_remove(self) -> None:
        """Removed modules are gone; unknown IDs are ignored."""
        for name in "abc":
            self.successResultOf(self.store.save(registration(name), 1.0))
        self.successResultOf(self.store.remove(["a", "c", "zzz"]))
        self.assertEqual(set(self.load()), {"b"})

    def test_touch(self) -> None:
        """touch updates last-seen times of known modules and ignores unknown ones."""
        self.successResultOf(self.store.save(registration("a"), 1.0))
        self.successResultOf(self.store.touch({"a": 50.0, "ghost": 60.0}))
        self.assertEqual(self.load()["a"][1], 50.0)
        self.assertNotIn("ghost", self.load())

    def test_close(self) -> None:
        self.assertIsNone(self.successResultOf(self.store.close()))


class MemoryStoreTests(StoreContractMixin, SynchronousTestCase):
    def make_store(self) -> IStore:
        return MemoryStore()


class ControllableStoreTests(StoreContractMixin, SynchronousTestCase):
    def make_store(self) -> IStore:
        return ControllableStore()


class SQLiteStoreTests(StoreContractMixin, SynchronousTestCase):
    """The contract on a real SQLite file, with writes run in line (deterministic)."""

    def make_store(self) -> IStore:
        from twisted.internet.defer import maybeDeferred

        from hsu_registry.stores.sqlite import SQLiteStore

        store = SQLiteStore(self.mktemp() + ".db", executor=maybeDeferred)
        self.addCleanup(store.close)
        return store

    def test_survives_reopening(self) -> None:
        """What was saved is there for a new store on the same file."""
        from twisted.internet.defer import maybeDeferred

        from hsu_registry.stores.sqlite import SQLiteStore

        reg = registration("a")
        self.successResultOf(self.store.save(reg, 150.0))
        self.successResultOf(self.store.touch({"a": 160.0}))
        self.successResultOf(self.store.close())
        again = SQLiteStore(self.store.path, executor=maybeDeferred)  # type: ignore[attr-defined]
        self.addCleanup(again.close)
        records = self.successResultOf(again.load())
        self.assertEqual([(r.registration, r.last_seen) for r in records], [(reg, 160.0)])

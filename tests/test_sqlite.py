"""
Tests for L{hsu_registry.stores.sqlite}: group commit, refusing files it must
not touch, failures that change nothing, and the real writer thread.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hsu_registry.errors import StoreUnavailable
from hsu_registry.model import Registration
from hsu_registry.registry import Registry
from hsu_registry.stores.sqlite import SCHEMA_VERSION, SQLiteStore, StoreError, check_database

from .helpers import publish_request


class HeldExecutor:
    """Runs each transaction only when the test says so, as a busy disk would."""

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((work, d))
        return d

    def run_one(self) -> None:
        work, d = self.queue.pop(0)
        maybeDeferred(work).chainDeferred(d)


def _rows(path: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(
            "SELECT module_id, process_id, last_seen FROM registrations ORDER BY module_id"
        ).fetchall()
    finally:
        connection.close()


class GroupCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp() + ".db"
        self.executor = HeldExecutor()
        self.store = SQLiteStore(self.path, executor=self.executor)
        self.clock = Clock()
        self.registry = Registry(self.store, self.clock)
        self.successResultOf(self.registry.load())

    def test_writes_during_a_transaction_share_the_next(self) -> None:
        """Publishes arriving while a transaction is written are committed together."""
        first = self.registry.publish(publish_request("m0"))
        rest = [self.registry.publish(publish_request(f"m{i}")) for i in range(1, 50)]
        self.assertEqual(len(self.executor.queue), 1)
        self.assertNoResult(first)
        self.executor.run_one()  # commits m0; m1..m49 start as one transaction
        self.successResultOf(first)
        self.assertEqual(len(self.executor.queue), 1)
        for d in rest:
            self.assertNoResult(d)
        self.assertIsNone(self.registry.get("m1"))  # not acknowledged: not visible
        self.executor.run_one()
        for d in rest:
            self.successResultOf(d)
        self.assertEqual(self.store.transactions, 2)
        self.assertEqual(len(_rows(self.path)), 50)

    def test_close_waits_for_writes(self) -> None:
        """close() finishes the writes under way before closing the database."""
        d = self.registry.publish(publish_request("m0"))
        closed = self.store.close()
        self.assertNoResult(closed)
        self.executor.run_one()
        self.successResultOf(d)
        self.successResultOf(closed)
        self.assertEqual(len(_rows(self.path)), 1)


class FailureTests(SynchronousTestCase):
    """A write the disk refuses is answered 503 and changes nothing, in memory or on disk."""

    def setUp(self) -> None:
        self.path = self.mktemp() + ".db"
        self.store = SQLiteStore(self.path, executor=maybeDeferred)
        self.addCleanup(self.store.close)
        self.registry = Registry(self.store, Clock())
        self.successResultOf(self.registry.load())
        self.successResultOf(self.registry.publish(publish_request("kept", apis=1)))

    def check_unchanged(self) -> None:
        self.flushLoggedErrors(sqlite3.OperationalError)
        kept = self.registry.get("kept")
        assert kept is not None
        self.assertEqual(kept.api_count, 1)
        self.assertIsNone(self.registry.get("new"))
        self.assertEqual([row[0] for row in _rows(self.path)], ["kept"])

    def test_read_only(self) -> None:
        """A read-only database refuses publish and unpublish with StoreUnavailable."""
        assert self.store._connection is not None
        self.store._connection.execute("PRAGMA query_only = ON")
        failure = self.failureResultOf(
            self.registry.publish(publish_request("new")), StoreUnavailable
        )
        self.assertIn("readonly", failure.value.context["reason"])
        self.failureResultOf(self.registry.publish(publish_request("kept", apis=3)))
        self.failureResultOf(self.registry.unpublish("kept"), StoreUnavailable)
        self.check_unchanged()

    def test_full(self) -> None:
        """A full database refuses the publish with StoreUnavailable."""
        assert self.store._connection is not None
        pages = self.store._connection.execute("PRAGMA page_count").fetchone()[0]
        self.store._connection.execute(f"PRAGMA max_page_count = {pages}")
        request = publish_request("new", apis=100)
        failure = self.failureResultOf(self.registry.publish(request), StoreUnavailable)
        self.assertIn("full", failure.value.context["reason"])
        self.check_unchanged()

    def test_unpublish_on_full_disk(self) -> None:
        """
        An unpublish the full database cannot record says exactly what was
        kept: the module is still registered (in memory as on disk), and why.
        """
        assert self.store._connection is not None
        self.store._connection.execute("PRAGMA query_only = ON")  # as a full disk refuses
        failure = self.failureResultOf(self.registry.unpublish("kept"), StoreUnavailable)
        self.assertIn("module 'kept' is still registered", failure.value.message)
        self.assertEqual(failure.value.status, 503)
        self.assertIs(failure.value.context["stillRegistered"], True)
        self.assertIn("readonly", failure.value.context["reason"])
        self.assertIsNotNone(self.registry.get("kept"))
        self.check_unchanged()


class RefusalTests(SynchronousTestCase):
    """Files the store must not use are refused with one line naming them, and left as they are."""

    def assertRefused(self, path: str, fragment: str) -> None:
        with open(path, "rb") as f:
            before = f.read()
        error = self.assertRaises(StoreError, check_database, path)
        message = str(error)
        self.assertIn(path, message)
        self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_not_sqlite(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"hello, I am a text file\n" * 100)
        self.assertRefused(path, "not a database")

    def test_newer_schema(self) -> None:
        path = self.mktemp()
        check_database(path)
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        connection.close()
        self.assertRefused(path, "newer hsu-registry")

    def test_another_applications_database(self) -> None:
        path = self.mktemp()
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE invoices (id INTEGER)")
        connection.commit()
        connection.close()
        self.assertRefused(path, "not an hsu-registry database")

    def test_corrupt(self) -> None:
        path = self.mktemp()
        store = SQLiteStore(path, executor=maybeDeferred)
        registry = Registry(store, Clock())
        self.successResultOf(registry.load())
        for i in range(300):
            self.successResultOf(registry.publish(publish_request(f"module-{i}", apis=5)))
        self.successResultOf(store.close())
        size = os.path.getsize(path)
        with open(path, "r+b") as f:  # scribble over pages after the header
            f.seek(4096)
            f.write(b"\xde\xad\xbe\xef" * ((size - 4096) // 8))
        error = self.assertRaises(StoreError, check_database, path)
        self.assertIn(path, str(error))

    def test_missing_directory(self) -> None:
        """A missing state directory is created, private (0700), with the file in it."""
        path = os.path.join(self.mktemp(), "nowhere", "registry.db")
        check_database(path)
        self.assertTrue(os.path.isfile(path))
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o700)

    def test_new_file_created(self) -> None:
        """A missing file is created with the current schema."""
        path = self.mktemp()
        check_database(path)
        check_database(path)  # and accepted the second time
        connection = sqlite3.connect(path)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        connection.close()


class ThreadTests(TestCase):
    """With its real writer thread, the store acknowledges only committed writes."""

    async def test_real_thread(self) -> None:
        path = self.mktemp() + ".db"
        store = SQLiteStore(path, reactor)
        registry = Registry(store, reactor)
        await registry.load()
        results = [registry.publish(publish_request(f"m{i}")) for i in range(200)]
        for d in results:
            await d
        await registry.unpublish("m0")
        await store.close()
        self.assertEqual(len(_rows(path)), 199)
        self.assertLess(store.transactions, 200)  # grouped


class RestartTests(SynchronousTestCase):
    def test_expiry_across_a_restart(self) -> None:
        """
        Loaded registrations keep their persisted last-seen times, so the
        cleanup expires those whose owners vanished while the daemon was down,
        and keeps those refreshed just before the stop.
        """
        path = self.mktemp() + ".db"
        clock = Clock()
        store = SQLiteStore(path, executor=maybeDeferred)
        registry = Registry(store, clock, stale_after=300, expire_after=600)
        self.successResultOf(registry.load())
        self.successResultOf(registry.publish(publish_request("gone")))
        self.successResultOf(registry.publish(publish_request("alive")))
        for _ in range(2):
            clock.advance(250)
            registry.discover("alive")
        self.successResultOf(registry.flush_heartbeats())
        self.successResultOf(store.close())

        clock.advance(200)  # the daemon was down for 200 s
        store = SQLiteStore(path, executor=maybeDeferred)
        self.addCleanup(store.close)
        registry = Registry(store, clock, stale_after=300, expire_after=600)
        self.assertEqual(self.successResultOf(registry.load()), 2)
        expired = self.successResultOf(registry.expire())
        self.assertEqual([c.module_id for c in expired], ["gone"])
        self.assertIsNotNone(registry.get("alive"))
        self.assertEqual([row[0] for row in _rows(path)], ["alive"])


class MigrationTests(TestCase):
    def test_schema_1_gains_owners(self) -> None:
        """
        A database written before owners were recorded (schema 1) is migrated
        in place: its registrations load, with an unknown owner, and new
        ones store theirs.
        """
        path = self.mktemp()
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute(
            "CREATE TABLE registrations (module_id TEXT PRIMARY KEY, process_id INTEGER NOT"
            " NULL, registered_at REAL NOT NULL, last_seen REAL NOT NULL, body BLOB NOT NULL,"
            " api_count INTEGER NOT NULL) WITHOUT ROWID"
        )
        connection.execute("PRAGMA application_id = 1213420882")
        connection.execute("PRAGMA user_version = 1")
        connection.execute(
            "INSERT INTO registrations VALUES ('old', 7, 1.0, 2.0, ?, 0)",
            (b'{"moduleID":"old","apis":[]}',),
        )
        connection.close()
        check_database(path)
        store = SQLiteStore(path, reactor)
        self.addCleanup(store.close)

        async def go() -> None:
            [record] = await store.load()
            self.assertEqual(
                (record.registration.module_id, record.registration.owner), ("old", "")
            )

            await store.save(Registration.create("new", 1, (), 3.0, owner="uid:1000"), 3.0)
            rows = dict(sqlite3.connect(path).execute("SELECT module_id, owner FROM registrations"))
            self.assertEqual(rows, {"old": "", "new": "uid:1000"})

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

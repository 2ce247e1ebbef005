# -*- test-case-name: tests.test_store,tests.test_sqlite -*-
"""
The durable store: SQLite, written by one dedicated thread with group commit.

 - Durability: a change is acknowledged (its Deferred fires) only after the
   transaction holding it has committed.  The database runs in WAL mode with
   C{synchronous=FULL}: a committed transaction survives a process crash and
   a power loss (the WAL is fsynced at each commit).
 - The reactor never waits on disk: every write runs in the store's own
   thread.  Writes that arrive while a transaction is being written are
   grouped into the next one (group commit), so concurrent publishes share one
   fsync instead of paying one each.
 - Heartbeats (L{touch}) come in batches from the registry, a few seconds
   apart; a crash loses at most that window of last-seen history, which only
   moves a module's expiry by as much.
 - Start-up reads everything once, before the daemon listens (L{open}); a
   file that is not SQLite, is corrupt, belongs to another application or was
   written by a newer schema is refused with a one-line L{StoreError} naming
   it, never wiped.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from hsu_registry.errors import StartupFailure, StoreUnavailable
from hsu_registry.interfaces import IStore
from hsu_registry.model import Registration
from hsu_registry.stores import StoredRegistration

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "StoreError", "check_database"]

T = TypeVar("T")

# "HSUR": marks the file as an hsu-registry database (PRAGMA application_id).
APPLICATION_ID = 0x48535552
# 2: the owner column (the identity that created each registration).
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE registrations (
    module_id     TEXT PRIMARY KEY,
    process_id    INTEGER NOT NULL,
    registered_at REAL NOT NULL,
    last_seen     REAL NOT NULL,
    body          BLOB NOT NULL,
    api_count     INTEGER NOT NULL,
    owner         TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
"""

# Each step takes a database from the version before it to its own.
_MIGRATIONS = {
    2: "ALTER TABLE registrations ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
}

Executor = Callable[[Callable[[], T]], Deferred[T]]


class StoreError(StartupFailure):
    """The database cannot be used; the message is one line naming the file."""


def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None)


def _configure(connection: sqlite3.Connection) -> None:
    """WAL with synchronous=FULL: a committed change survives a crash and a power loss."""
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")


def _prepare(connection: sqlite3.Connection, path: str) -> None:
    """
    Check the file is ours and current (changing nothing in a file that is
    not), then set it up, creating the schema in a new file.
    """
    try:
        quick = connection.execute("PRAGMA quick_check").fetchone()[0]
        application_id = connection.execute("PRAGMA application_id").fetchone()[0]
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        tables = connection.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        ).fetchone()[0]
    except sqlite3.DatabaseError as e:
        raise StoreError(f"cannot use {path}: {e}") from None
    if quick != "ok":
        raise StoreError(f"cannot use {path}: the database is corrupt ({quick})")
    if application_id not in (0, APPLICATION_ID) or (application_id == 0 and tables):
        raise StoreError(f"cannot use {path}: it is not an hsu-registry database")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"cannot use {path}: it was written by a newer hsu-registry "
            f"(schema {version}; this one reads up to {SCHEMA_VERSION})"
        )
    _configure(connection)
    if version == 0:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(_SCHEMA)
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    elif version < SCHEMA_VERSION:
        # Registrations stored before owners were recorded keep an unknown
        # owner: the first identity allowed to publish the module claims it.
        connection.execute("BEGIN IMMEDIATE")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            connection.execute(_MIGRATIONS[step])
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")


def check_database(path: str) -> None:
    """
    Check at start-up that C{path} can serve as the store (creating it when
    missing), so that a bad file stops the daemon with one clear line.

    @raise StoreError: naming the file and what is wrong with it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        # A fresh machine has no state directory yet: make it private, as the
        # unix socket's directory is made.
        try:
            os.makedirs(directory, mode=0o700)
        except OSError as e:
            raise StoreError(
                f"cannot use {path}: cannot create its directory {directory}: {e.strerror or e}"
            ) from None
        Logger().info("Created the state directory {directory} (mode 0700)", directory=directory)
    try:
        connection = _connect(path)
    except sqlite3.Error as e:
        raise StoreError(f"cannot use {path}: {e}") from None
    try:
        _prepare(connection, path)
    except sqlite3.Error as e:
        raise StoreError(f"cannot use {path}: {e}") from None
    finally:
        connection.close()


def _thread_pool_executor(reactor: Any) -> tuple[Executor[Any], ThreadPool]:
    pool = ThreadPool(minthreads=1, maxthreads=1, name="hsu-registry-sqlite")

    def run(work: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(reactor, pool, work)

    return run, pool


@implementer(IStore)
class SQLiteStore:
    """
    An L{IStore} in a SQLite file.

    @param executor: runs a function off the reactor thread and returns a
        Deferred of its result; default: a dedicated one-thread pool.  Tests
        pass one that runs in line, to stay deterministic.
    """

    log = Logger()
    _closed = False

    def __init__(self, path: str, reactor: Any = None, executor: Executor[Any] | None = None):
        self.path = path
        self._pool: ThreadPool | None = None
        if executor is None:
            if reactor is None:
                from twisted.internet import reactor as global_reactor

                reactor = global_reactor
            executor, self._pool = _thread_pool_executor(reactor)
        self._execute = executor
        self._connection: sqlite3.Connection | None = None
        self._pending: list[tuple[tuple[Any, ...], Deferred[None]]] = []
        self._writing = False
        self._idle: list[Deferred[None]] = []
        self.transactions = 0

    # -- start-up ------------------------------------------------------------

    def open(self) -> None:
        """
        Open (creating when missing) and check the database.  Runs once, at
        start-up, before the daemon serves anything.

        @raise StoreError: when the file cannot serve as the store.
        """
        check_database(self.path)
        self._connection = _connect(self.path)
        _configure(self._connection)
        if self._pool is not None:
            self._pool.start()

    def load(self) -> Deferred[list[StoredRegistration]]:
        """
        Every stored registration.  Called once at start-up, before the daemon
        listens, so it reads in the calling thread: nothing is served yet.
        """
        if self._connection is None:
            self.open()
        assert self._connection is not None
        rows = self._connection.execute(
            "SELECT module_id, process_id, registered_at, body, api_count, owner, last_seen "
            "FROM registrations"
        ).fetchall()
        return succeed(
            [StoredRegistration(Registration.from_plain(tuple(row[:6])), row[6]) for row in rows]
        )

    # -- writes, grouped -----------------------------------------------------

    def save(self, registration: Registration, last_seen: float) -> Deferred[None]:
        module_id, process_id, registered_at, body, api_count, owner = registration.plain()
        return self._enqueue(
            ("save", module_id, process_id, registered_at, last_seen, body, api_count, owner)
        )

    def remove(self, module_ids: Iterable[str]) -> Deferred[None]:
        return self._enqueue(("remove", tuple(module_ids)))

    def touch(self, last_seen: Mapping[str, float]) -> Deferred[None]:
        if not last_seen:
            return succeed(None)
        return self._enqueue(("touch", tuple((seen, m) for m, seen in last_seen.items())))

    def _enqueue(self, operation: tuple[Any, ...]) -> Deferred[None]:
        if self._closed:
            # Never reopen a closed store: a write after the stop would commit
            # with nobody left to answer it.
            return fail(
                StoreUnavailable(
                    "the registry is stopping: nothing was changed", {"reason": "closed"}
                )
            )
        if self._connection is None:
            self.open()
        done: Deferred[None] = Deferred()
        self._pending.append((operation, done))
        self._write_next()
        return done

    def _write_next(self) -> None:
        if self._writing:
            return
        if not self._pending:
            idle, self._idle = self._idle, []
            for waiter in idle:
                waiter.callback(None)
            return
        batch, self._pending = self._pending, []
        self._writing = True
        operations = [operation for operation, _ in batch]
        d = maybeDeferred(self._execute, lambda: self._transaction(operations))
        d.addBoth(self._written, [waiter for _, waiter in batch])

    def _transaction(self, operations: list[tuple[Any, ...]]) -> None:
        """Write C{operations} in one transaction (in the store's thread)."""
        connection = self._connection
        assert connection is not None
        connection.execute("BEGIN IMMEDIATE")
        try:
            for operation in operations:
                kind = operation[0]
                if kind == "save":
                    connection.execute(
                        "INSERT OR REPLACE INTO registrations (module_id, process_id, "
                        "registered_at, last_seen, body, api_count, owner) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        operation[1:],
                    )
                elif kind == "remove":
                    connection.executemany(
                        "DELETE FROM registrations WHERE module_id = ?",
                        [(module_id,) for module_id in operation[1]],
                    )
                else:
                    connection.executemany(
                        "UPDATE registrations SET last_seen = ? WHERE module_id = ?",
                        operation[1],
                    )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise

    def _written(self, result: object, waiters: list[Deferred[None]]) -> None:
        self._writing = False
        self.transactions += 1
        if isinstance(result, Failure):
            self.log.failure(
                "Could not write {count} changes to {path}; they were refused",
                result,
                count=len(waiters),
                path=self.path,
            )
            reason = " ".join(result.getErrorMessage().split())
            for waiter in waiters:
                waiter.errback(
                    StoreUnavailable(
                        "the registry's store could not save the change; nothing was changed",
                        {"reason": reason},
                    )
                )
        else:
            for waiter in waiters:
                waiter.callback(None)
        self._write_next()

    # -- shutdown ------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Wait for the writes under way, then close the database and the thread."""
        if self._writing or self._pending:
            waiter: Deferred[None] = Deferred()
            self._idle.append(waiter)
            return waiter.addCallback(lambda _: self._close())
        self._close()
        return succeed(None)

    def _close(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._pool is not None and self._pool.started:
            self._pool.stop()

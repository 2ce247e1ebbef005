"""
The crash test: a real daemon on a SQLite store is killed with SIGKILL while
many publishes are under way; after a restart every publish that was answered
200 is there, and the database passes C{PRAGMA integrity_check}.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from .test_e2e import E2ETestCase

PUBLISHERS = 16
KILL_AFTER = 400  # acknowledged publishes before the kill
log = Logger()


class CrashTests(E2ETestCase):
    async def test_kill_9_loses_no_acknowledged_publish(self) -> None:
        directory = self.short_temp_dir()
        database = os.path.join(directory, "registry.db")
        argv = ["--endpoint=tcp:0:interface=127.0.0.1", f"--store=sqlite:{database}"]
        daemon = self.spawn_registry(*argv)
        port = await self.tcp_port(daemon)

        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = PUBLISHERS
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(reactor, pool=pool))
        acknowledged: list[str] = []
        killed: Deferred[None] = Deferred()

        async def publisher(number: int) -> None:
            i = 0
            while not killed.called:
                module_id = f"crash-{number}-{i}"
                body = json.dumps(
                    {
                        "moduleID": module_id,
                        "processID": number,
                        "apis": [{"serviceIDs": ["s"], "serverPort": 1000 + i, "protocol": "grpc"}],
                    }
                ).encode()
                try:
                    response = await client.post(
                        f"http://127.0.0.1:{port}/api/v1/publish",
                        data=body,
                        headers={b"content-type": [b"application/json"]},
                    )
                    await response.content()
                except Exception:
                    return  # the daemon is gone
                if response.code == 200:
                    acknowledged.append(module_id)
                    if len(acknowledged) >= KILL_AFTER and not killed.called:
                        daemon.signal("KILL")
                        killed.callback(None)
                i += 1

        publishers = [Deferred.fromCoroutine(publisher(n)) for n in range(PUBLISHERS)]
        await DeferredList(publishers)
        await daemon.wait_for_end()
        self.assertEqual(daemon.exit_signal, 9, daemon.describe())

        # Restart on the same file and look for every acknowledged module.
        daemon = self.spawn_registry(*argv)
        port = await self.tcp_port(daemon)
        fresh = Agent(reactor)
        missing = []
        for module_id in acknowledged:
            response = await fresh.request(
                b"GET", f"http://127.0.0.1:{port}/api/v1/discover/{module_id}".encode()
            )
            await readBody(response)
            if response.code != 200:
                missing.append(module_id)
        await self.stop(daemon)

        connection = sqlite3.connect(database)
        try:
            integrity = connection.execute("PRAGMA integrity_check").fetchone()[0]
            stored = connection.execute("SELECT count(*) FROM registrations").fetchone()[0]
        finally:
            connection.close()
        counts: dict[str, Any] = {
            "acknowledged": len(acknowledged),
            "recovered": len(acknowledged) - len(missing),
            "lost": len(missing),
            "stored": stored,
            "integrity": integrity,
        }
        log.info("crash test: {counts}", counts=counts)
        sys.stderr.write(f"\ncrash test: {json.dumps(counts)}\n")
        self.assertEqual(integrity, "ok")
        self.assertEqual(missing, [])
        self.assertGreaterEqual(stored, len(acknowledged))

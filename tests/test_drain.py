"""
Tests for L{hsu_registry.web.drain}: a stop answers the requests already
received, closes idle connections at once, and cuts off what is left after
the drain timeout; end to end, SIGTERM under concurrent publishers on SQLite
leaves no publish committed and unanswered.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import textwrap

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.registry import Registry
from hsu_registry.testing import ControllableStore
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.drain import drain
from hsu_registry.web.site import RegistrySite

from .helpers import publish_body
from .test_e2e import E2ETestCase


def _post(module_id: str) -> bytes:
    body = publish_body(module_id)
    return (
        b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )


class _Flushing(StringTransport):
    """An in-memory transport whose close completes at once (nothing left to write)."""

    def loseConnection(self) -> None:
        super().loseConnection()
        self.disconnected = True


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = ControllableStore()
        self.registry = Registry(self.store, self.clock)
        self.site = RegistrySite(RegistryAPI(self.registry).resource(), reactor=self.clock)

    def connect(self) -> tuple[object, _Flushing]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = _Flushing()
        channel.makeConnection(transport)
        return channel, transport

    def test_answers_what_was_received(self) -> None:
        """
        An idle keep-alive connection is closed at once; one whose publish
        waits on the store stays open until the store acknowledges it, gets
        its 200, and is then closed; the drain ends clean.
        """
        idle_channel, idle = self.connect()
        idle_channel.dataReceived(_post("done"))  # type: ignore[attr-defined]
        self.assertIn(b"200 OK", idle.value())
        self.store.holding = True
        busy_channel, busy = self.connect()
        busy_channel.dataReceived(_post("pending"))  # type: ignore[attr-defined]
        self.assertEqual(busy.value(), b"")

        drained = drain(self.site, self.clock, timeout=10)
        self.assertTrue(idle.disconnecting)
        self.assertFalse(busy.disconnecting)
        self.assertNoResult(drained)
        self.store.release()
        self.clock.advance(0.01)
        self.assertIn(b"200 OK", busy.value())
        self.assertTrue(busy.disconnecting)
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertIsNotNone(self.registry.get("pending"))

    def test_timeout(self) -> None:
        """A request still unanswered at the drain timeout is cut off, and counted."""
        self.store.holding = True
        channel, transport = self.connect()
        channel.dataReceived(_post("stuck"))  # type: ignore[attr-defined]
        drained = drain(self.site, self.clock, timeout=2)
        self.clock.advance(1.99)
        self.assertNoResult(drained)
        self.clock.pump([0.01] * 5)
        self.assertEqual(self.successResultOf(drained), 1)
        self.assertTrue(transport.disconnecting or transport.disconnected)  # type: ignore[attr-defined]


# Publishers of new modules, one per connection, in a loop: each prints one
# JSON line per answer ("ok" or the status), and "lost" for a publish that
# got no answer (connection closed under it).
_PUBLISHERS = textwrap.dedent(
    """
    import asyncio, json, sys
    port, count = int(sys.argv[1]), int(sys.argv[2])
    async def publisher(n):
        i = 0
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            while True:
                module = f"m{n}-{i}"
                i += 1
                body = json.dumps({"moduleID": module, "apis": []}).encode()
                writer.write(b"POST /api/v1/publish HTTP/1.1\\r\\nHost: r\\r\\n"
                             b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body)
                print(json.dumps(["sent", module]), flush=True)
                try:
                    head = await reader.readuntil(b"\\r\\n\\r\\n")
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\\r\\n")[0])
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError, IndexError) as e:
                    print(json.dumps(["lost", module, repr(e)[:300]]), flush=True)
                    break
                print(json.dumps([head.split(b" ")[1].decode(), module]), flush=True)
            writer.close()
    async def main():
        await asyncio.gather(*(publisher(n) for n in range(count)))
    asyncio.run(main())
    """
)


class SigtermTests(E2ETestCase):
    timeout = 180

    async def test_no_publish_committed_unanswered(self) -> None:
        """
        SIGTERM with 48 publishers in flight on a SQLite store: the daemon
        exits 0; every publish answered 200 is in the database, and none that
        went unanswered is (a publish is either answered or not committed).
        """
        directory = self.short_temp_dir()
        path = os.path.join(directory, "registry.db")
        daemon = self.spawn_registry(
            f"--store=sqlite:{path}", "--endpoint=tcp:0:interface=127.0.0.1"
        )
        port = await self.tcp_port(daemon)
        load = self.spawn([sys.executable, "-c", _PUBLISHERS, str(port), "48"])
        await load.wait_for(re.compile(rb'\["200", "m\d+-5"\]'), "stdout")
        await self.stop(daemon, "TERM")
        self.assertExitCode(daemon, 0)
        await load.wait_for_end()
        answers: dict[str, str] = {}
        for line in load.stdout.decode().splitlines():
            status, module, *_ = json.loads(line)
            answers[module] = status
        acknowledged = {m for m, s in answers.items() if s == "200"}
        unanswered = {m for m, s in answers.items() if s in ("sent", "lost")}
        connection = sqlite3.connect(path)
        committed = {row[0] for row in connection.execute("SELECT module_id FROM registrations")}
        connection.close()
        self.assertGreater(len(acknowledged), 48)
        self.assertEqual(acknowledged - committed, set(), daemon.describe())
        self.assertEqual(committed & unanswered, set(), daemon.describe())
        self.assertEqual(committed - acknowledged, set())

"""
Tests for L{hsu_registry.web.deadlines} and L{hsu_registry.web.budget}, through
the registry's site: the header, body and idle deadlines that trickled bytes do
not move, the absence of any deadline while a request is processed (blocking
queries, watch streams), and the byte budget shared by every request body.
All driven by a L{task.Clock} over in-memory transports: no real waiting.

Issue 13's second attack row is L{BodyBudgetTests.test_slow_bodies_attack}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.watch import ChangeLog
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.connections import ConnectionLimits
from hsu_registry.web.deadlines import Deadlines, DeadlineTimer
from hsu_registry.web.site import RegistrySite

from .helpers import publish_body

HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: r\r\n\r\n"


class ClosingTransport(StringTransport):
    """
    An in-memory transport that tells its protocol the connection is lost
    when it is closed (at once: as a real one does once it has written).
    """

    aborted = False

    def __init__(self, peer: Any = None) -> None:
        super().__init__(peerAddress=peer)
        self.protocol: Any = None

    def loseConnection(self) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Client:
    """One client connection to a site, over a L{ClosingTransport}."""

    def __init__(self, site: RegistrySite, peer: Any = None, transport: Any = None) -> None:
        if peer is None:
            peer = IPv4Address("TCP", "192.0.2.1", 40000)
        self.transport = transport if transport is not None else ClosingTransport(peer)
        self.channel = site.buildProtocol(peer)
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        if not self.transport.disconnecting:
            self.channel.dataReceived(data)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def raw(self) -> bytes:
        return bytes(self.transport.value())

    def responses(self) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        """Every answer written so far: status, headers and body."""
        out = []
        data = self.raw
        while data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" in headers:
                length = int(headers[b"content-length"])
                body, data = rest[:length], rest[length:]
            else:
                body, data = rest, b""
            out.append((int(lines[0].split(b" ")[1]), headers, body))
        return out

    def last(self) -> tuple[int, dict[bytes, bytes], bytes]:
        return self.responses()[-1]

    def error(self) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of the last answer, which must be an error."""
        status, headers, body = self.last()
        parsed = json.loads(body)
        assert headers[b"content-type"] == b"application/json", headers
        assert parsed["success"] is False, parsed
        return status, parsed


def post(body: bytes, declared: int | None = None) -> bytes:
    """A publish request whose headers declare C{declared} bytes (default: the body's)."""
    length = len(body) if declared is None else declared
    return (
        b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    ) + body


class SiteCase(SynchronousTestCase):
    """A registry site on a clock, with small deadlines and limits."""

    deadlines = Deadlines(header_timeout=10, idle_timeout=60, min_body_rate=1024, body_grace=10)
    max_body_size = 64 * 1024
    max_body_memory = 512 * 1024
    limits = ConnectionLimits(max_connections=1000, max_per_peer=1000, reserved=8)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(MemoryStore(), self.clock)
        self.changelog = ChangeLog(self.registry, self.clock, max_wait=600)
        self.api = RegistryAPI(self.registry, changelog=self.changelog, clock=self.clock)
        self.site = RegistrySite(
            self.api.resource(),
            max_body_size=self.max_body_size,
            reactor=self.clock,
            deadlines=self.deadlines,
            connection_limits=self.limits,
            max_body_memory=self.max_body_memory,
            privileged=frozenset(),
        )

    def connect(self, host: str = "192.0.2.1") -> Client:
        return Client(self.site, IPv4Address("TCP", host, 40000))

    def assertOpen(self, client: Client) -> None:
        self.assertFalse(client.closed, client.raw)


class DeadlineTimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.timer = DeadlineTimer(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_fires_at_the_deadline(self) -> None:
        """The timer calls back once its deadline has passed, not before."""
        self.timer.deadline = 10
        self.timer.ensure()
        self.clock.advance(9.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [10])

    def test_later_is_free(self) -> None:
        """Moving the deadline later schedules nothing new until the old call comes due."""
        self.timer.deadline = 10
        self.timer.ensure()
        calls = self.clock.getDelayedCalls()
        for later in range(11, 100):
            self.timer.deadline = later
            self.timer.ensure()
        self.assertEqual(self.clock.getDelayedCalls(), calls)
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.clock.advance(89)
        self.assertEqual(self.fired, [99])

    def test_sooner_needs_ensure(self) -> None:
        """An earlier deadline is kept once ensured (a new call, never a heap search)."""
        self.timer.deadline = 60
        self.timer.ensure()
        self.timer.deadline = 5
        self.timer.ensure()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(5)
        self.assertEqual(self.fired, [5])

    def test_none_and_stop(self) -> None:
        """No deadline: the call fires and does nothing; a stopped timer never fires."""
        self.timer.deadline = 5
        self.timer.ensure()
        self.timer.deadline = None
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertFalse(self.timer.scheduled)
        self.timer.deadline = 20
        self.timer.ensure()
        self.timer.stop()
        self.clock.advance(20)
        self.assertEqual((self.fired, self.clock.getDelayedCalls()), ([], []))


class HeaderDeadlineTests(SiteCase):
    def test_trickled_request_line(self) -> None:
        """
        A request line trickled one byte every 2 s is answered a JSON 408 and
        closed 10 s after its first byte: the bytes do not move the deadline
        (Twisted's idle timer restarted at each one and never fired).
        """
        client = self.connect()
        for byte in b"GET /api/v1/health HTTP/1.1\r\n":
            client.send(bytes([byte]))
            if client.closed:
                break
            self.clock.advance(2)
        self.assertTrue(client.closed)
        self.assertEqual(self.clock.seconds(), 1_700_000_010)
        status, body = client.error()
        self.assertEqual(status, 408)
        self.assertEqual(body["context"], {"headerTimeout": 10})
        self.assertIn("did not arrive within 10s", body["error"])
        self.assertEqual(self.site.header_timeouts, 1)
        self.assertEqual(self.site.connections.open, 0)

    def test_trickled_headers(self) -> None:
        """Headers trickled after a prompt request line are cut off the same way."""
        client = self.connect()
        client.send(b"GET /api/v1/health HTTP/1.1\r\n")
        for _ in range(20):
            client.send(b"X")
            self.clock.advance(1)
        self.assertEqual(client.error()[0], 408)

    def test_new_connection_that_says_nothing(self) -> None:
        """A new connection that sends nothing is closed after the header timeout, quietly."""
        client = self.connect()
        self.clock.advance(9.9)
        self.assertOpen(client)
        self.clock.advance(0.1)
        self.assertTrue(client.closed)
        self.assertEqual(client.raw, b"")
        self.assertEqual(self.site.idle_timeouts, 1)

    def test_headers_in_pieces_in_time(self) -> None:
        """A request arriving in pieces within the deadline is served."""
        client = self.connect()
        for piece in (b"GET /api/v1/hea", b"lth HTTP/1.1\r\nHo", b"st: r\r\n", b"\r\n"):
            client.send(piece)
            self.clock.advance(2)
        self.assertEqual(client.last()[0], 200)
        self.assertOpen(client)

    def test_timeouts_are_logged_at_most_every_ten_seconds(self) -> None:
        """Many header timeouts make one line per 10 s, with their count."""
        with capturedLogs() as events:
            clients = [self.connect(f"192.0.2.{n}") for n in range(1, 51)]
            for client in clients:
                client.send(b"G")
            self.clock.advance(10)
            self.clock.advance(10)
        lines = [e for e in events if e.get("limit_key") == "header-timeout"]
        self.assertEqual([e["count"] for e in lines], [1, 49])
        self.assertEqual(self.site.header_timeouts, 50)


class IdleDeadlineTests(SiteCase):
    def test_idle_after_a_request(self) -> None:
        """A kept-alive connection with no new request is closed after the idle timeout."""
        client = self.connect()
        client.send(HEALTH)
        self.assertEqual(client.last()[0], 200)
        self.clock.advance(59)
        self.assertOpen(client)
        self.clock.advance(1)
        self.assertTrue(client.closed)
        self.assertEqual(self.site.idle_timeouts, 1)

    def test_trickling_does_not_keep_it_open(self) -> None:
        """
        Between requests, a byte every 20 s does not restart the idle timer:
        the first byte starts the header deadline, which ends the connection
        10 s later with a 408, however the bytes keep coming.
        """
        client = self.connect()
        client.send(HEALTH)
        self.clock.advance(30)
        for _ in range(10):
            client.send(b"G")
            if client.closed:
                break
            self.clock.advance(20)
        self.assertTrue(client.closed)
        self.assertEqual(self.clock.seconds(), 1_700_000_000 + 30 + 20)
        self.assertEqual(client.responses()[-1][0], 408)

    def test_requests_keep_it_open(self) -> None:
        """A whole request every 50 s keeps a connection open: the idle timer starts after each."""
        client = self.connect()
        for _ in range(10):
            client.send(HEALTH)
            self.clock.advance(50)
        self.assertOpen(client)
        self.assertEqual([r[0] for r in client.responses()], [200] * 10)

    def test_pipelined_requests(self) -> None:
        """Pipelined requests in one read are all answered."""
        client = self.connect()
        client.send(HEALTH * 3)
        self.assertEqual([r[0] for r in client.responses()], [200] * 3)
        self.clock.advance(59)
        self.assertOpen(client)

    def test_closing_connection_that_does_not_read(self) -> None:
        """
        A connection closed after its answer but whose client does not take it
        is aborted after the channel's abort timeout.
        """
        client = self.connect()
        client.transport.loseConnection = lambda: setattr(  # a client that never reads
            client.transport, "disconnecting", True
        )
        client.send(b"GET /api/v1/health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        self.assertEqual(client.last()[0], 200)
        self.assertFalse(client.transport.aborted)
        self.clock.advance(client.channel.abortTimeout)
        self.assertTrue(client.transport.aborted)


class BodyDeadlineTests(SiteCase):
    def test_slow_body(self) -> None:
        """
        A body that brings fewer than min-body-rate x body-grace bytes in a
        period is answered a JSON 408 and closed; nothing is published.
        """
        body = publish_body("slow")
        client = self.connect()
        client.send(post(body[:10], declared=len(body)))
        self.clock.advance(9.9)
        self.assertOpen(client)
        self.clock.advance(0.1)
        status, error = client.error()
        self.assertEqual(status, 408)
        self.assertEqual(error["context"], {"minBodyRate": 1024})
        self.assertEqual(self.site.body_timeouts, 1)
        self.assertIsNone(self.registry.get("slow"))
        self.assertEqual(self.site.bodies.used, 0)

    def test_steady_body(self) -> None:
        """A body arriving at the minimum rate, however long it takes, is served."""
        body = json.dumps(
            {
                "moduleID": "steady",
                "processID": 1,
                "apis": [
                    {
                        "serviceIDs": ["s"],
                        "serverPort": 1,
                        "protocol": "grpc",
                        "metadata": {f"k{i}": "v" * 1000 for i in range(40)},
                    }
                ],
            }
        ).encode()
        client = self.connect()
        client.send(post(b"", declared=len(body)))
        sent = 0
        while sent < len(body):
            client.send(body[sent : sent + 1100])  # 1100 bytes a second, above 1024
            sent += 1100
            self.clock.advance(1)
        self.assertEqual(client.last()[0], 200, client.raw)
        self.assertIsNotNone(self.registry.get("steady"))
        self.assertEqual(self.site.bodies.used, 0)

    def test_small_body_not_finished(self) -> None:
        """
        A small body not finished within the first period came slower than the
        minimum rate, however little of it is missing: cut off.
        """
        body = publish_body("trickle")
        client = self.connect()
        client.send(post(body[:-5], declared=len(body)))
        for byte in body[-5:-1]:
            self.clock.advance(2)
            client.send(bytes([byte]))
        self.clock.advance(2)
        self.assertEqual(client.error()[0], 408)


class ProcessingTests(SiteCase):
    """No deadline runs while a request is processed, however long."""

    def test_blocking_query_held_for_minutes(self) -> None:
        """A blocking query waits minutes for its change; the idle deadline resumes after."""
        client = self.connect()
        client.send(b"GET /api/v1/modules?index=0&wait=10m HTTP/1.1\r\nHost: r\r\n\r\n")
        self.clock.advance(240)
        self.assertOpen(client)
        self.assertEqual(client.raw, b"")
        self.successResultOf(self.registry.publish(_publish("late")))
        self.clock.advance(0.01)
        self.assertEqual(client.last()[0], 200)
        self.clock.advance(59.9)
        self.assertOpen(client)
        self.clock.advance(0.1)
        self.assertTrue(client.closed)

    def test_blocking_query_with_a_pipelined_trickle(self) -> None:
        """Bytes of a next request trickled during a held query end neither."""
        client = self.connect()
        client.send(b"GET /api/v1/modules?index=0&wait=5m HTTP/1.1\r\nHost: r\r\n\r\n")
        for byte in HEALTH[:20]:
            client.send(bytes([byte]))
            self.clock.advance(5)
        self.assertOpen(client)
        self.successResultOf(self.registry.publish(_publish("late")))
        self.clock.advance(0.01)
        client.send(HEALTH[20:])
        self.assertEqual([r[0] for r in client.responses()], [200, 200])

    def test_watch_stream_for_an_hour(self) -> None:
        """A watch stream stays open for an hour of keep-alives and changes."""
        client = self.connect()
        client.send(b"GET /api/v1/watch HTTP/1.1\r\nHost: r\r\n\r\n")
        for minute in range(60):
            self.clock.advance(60)
            if minute % 10 == 0:
                self.successResultOf(self.registry.publish(_publish(f"m{minute}")))
        self.assertOpen(client)
        self.assertIn(b"event: published", client.raw)
        self.assertEqual(
            (self.site.header_timeouts, self.site.idle_timeouts, self.site.body_timeouts),
            (0, 0, 0),
        )


def _publish(name: str) -> Any:
    from .helpers import publish_request

    return publish_request(name)


class BodyBudgetTests(SiteCase):
    def test_declared_length_past_the_budget(self) -> None:
        """
        A body whose declared length does not fit in what is left of the
        budget is answered a JSON 503 with Retry-After before any of it is
        read (no 100 Continue), and the connection is closed.
        """
        holders = []
        for n in range(4):  # four peers, each holding two bodies of 64 KiB: 512 KiB
            for _ in range(2):
                client = self.connect(f"192.0.2.{n + 1}")
                client.send(post(b"", declared=64 * 1024))
                holders.append(client)
        self.assertEqual(self.site.bodies.used, 512 * 1024)
        late = self.connect("192.0.2.99")
        late.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\n"
            b"Content-Length: 10\r\n\r\n"
        )
        self.assertNotIn(b"100 Continue", late.raw)
        status, error = late.error()
        self.assertEqual(status, 503)
        self.assertEqual(late.last()[1][b"retry-after"], b"1")
        self.assertEqual(error["context"], {"maxBodyMemory": 512 * 1024})
        self.assertTrue(late.closed)
        self.assertEqual(self.site.bodies.refused, 1)
        # Closing a holder gives its bytes back: the next one fits.
        holders[0].transport.loseConnection()
        self.assertEqual(self.site.bodies.used, 448 * 1024)
        again = self.connect("192.0.2.99")
        again.send(post(publish_body("fits")))
        self.assertEqual(again.last()[0], 200)
        self.assertEqual(self.site.bodies.used, 448 * 1024)

    def test_peer_share(self) -> None:
        """One peer holds at most a quarter of the budget (at least one largest body)."""
        clients = [self.connect() for _ in range(3)]
        for client in clients:
            client.send(post(b"", declared=64 * 1024))
        self.assertEqual([c.closed for c in clients], [False, False, True])
        self.assertEqual(clients[2].error()[0], 503)
        self.assertEqual(self.site.bodies.held_by(clients[0].channel._peer), 128 * 1024)

    def test_chunked_body_past_the_budget(self) -> None:
        """A chunked body is cut off with a 503 as soon as it passes what is left."""
        for n in range(8):  # 7 x 64 KiB and 60 000 bytes: 5 536 bytes left
            holder = self.connect(f"192.0.2.{n // 2 + 1}")
            holder.send(post(b"", declared=64 * 1024 if n else 60_000))
        self.assertEqual(self.site.bodies.used, 7 * 64 * 1024 + 60_000)
        client = self.connect("192.0.2.50")
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        client.send(b"%x\r\n" % 4000 + b"x" * 4000 + b"\r\n")
        self.assertOpen(client)
        client.send(b"%x\r\n" % 4000 + b"x" * 4000 + b"\r\n")
        self.assertEqual(client.error()[0], 503)
        self.assertTrue(client.closed)
        self.assertEqual(self.site.bodies.used, 7 * 64 * 1024 + 60_000)

    def test_chunked_body_within_budget_is_given_back(self) -> None:
        """A chunked body's bytes are given back once its request is answered."""
        body = publish_body("chunky")
        client = self.connect()
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(client.last()[0], 200)
        self.assertEqual((self.site.bodies.used, self.site.bodies.peak), (0, len(body)))

    def test_body_of_a_get_is_dropped(self) -> None:
        """
        The body of a request whose method the API reads no body for (a watch
        stream) is dropped once received: a stream held for hours holds none.
        """
        client = self.connect()
        client.send(b"GET /api/v1/watch HTTP/1.1\r\nHost: r\r\nContent-Length: 50000\r\n\r\n")
        self.assertEqual(self.site.bodies.used, 50000)
        client.send(b"x" * 50000)
        self.assertEqual(client.responses()[0][0], 200)
        self.assertEqual(self.site.bodies.used, 0)

    def test_slow_bodies_attack(self) -> None:
        """
        Issue 13, second row, scaled down: POSTs declaring bodies of the
        largest size (1 MiB there, 64 KiB here), from several peers, each
        sending all but its last 500 bytes at once and the rest at a byte
        every 20 s.  Before: every body was held (1 500 x 1 MiB: RSS from 53
        MB to 1 646 MB) and none was closed for 90 s.  Now at most the
        budget is held (the rest are 503s before their bodies are read),
        the trickling bodies are 408s within two body periods, every byte is
        given back, and nothing changes in the registry.
        """
        size = 64 * 1024
        body = publish_body("attack", metadata={"k": "x" * 100}).ljust(size, b" ")
        clients = [self.connect(f"192.0.2.{n % 25 + 1}") for n in range(100)]
        for client in clients:
            client.send(post(body[:-500], declared=size))
        held = sum(len(c.channel.requests[-1].content.getvalue()) for c in clients if not c.closed)
        self.assertLessEqual(held, self.max_body_memory)
        refused = [c for c in clients if c.closed]
        self.assertEqual(len(refused), 100 - self.max_body_memory // size)
        for client in refused:
            self.assertEqual(client.error()[0], 503)
        self.assertEqual(self.site.bodies.peak, self.max_body_memory)
        for second in range(0, 90, 20):
            for client in clients:
                client.send(body[-500 + second // 20 : -499 + second // 20])
            self.clock.advance(20)
        self.assertTrue(all(c.closed for c in clients))
        slow = [c for c in clients if c not in refused]
        for client in slow:
            self.assertEqual(client.error()[0], 408)
        self.assertLessEqual(self.clock.seconds() - 1_700_000_000, 100)
        self.assertEqual((self.site.bodies.used, self.site.connections.open), (0, 0))
        self.assertEqual(len(self.registry), 0)
        self.assertEqual(self.registry.index, 0)

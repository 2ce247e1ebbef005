"""
Tests for L{hsu_registry.web.site}: bounded request bodies, JSON 413s, no
tracebacks, and the optional access log, driven through an in-memory
transport.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.site import RegistrySite

from .helpers import publish_body


def _response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = Registry(MemoryStore(), self.clock)
        self.site = RegistrySite(
            RegistryAPI(self.registry).resource(), max_body_size=1000, reactor=self.clock
        )

    def connect(self) -> tuple[object, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def post(self, body: bytes, extra_headers: bytes = b"") -> tuple[StringTransport, object]:
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/v1/publish HTTP/1.1\r\nHost: registry\r\n"
            + extra_headers
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        return transport, channel

    def test_body_within_limit(self) -> None:
        """A body within the limit is served, with a Content-Length answer."""
        transport, _ = self.post(publish_body("echo"))
        status, headers, body = _response(transport.value())
        self.assertEqual((status, body), (200, b'{"success":true}'))
        self.assertEqual(headers[b"content-length"], b"16")
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertIsNotNone(self.registry.get("echo"))

    def test_declared_length_over_limit(self) -> None:
        """A Content-Length over the limit is answered 413 before any body is read."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nExpect: 100-continue\r\n"
            b"Content-Length: 1001\r\n\r\n"
        )
        raw = transport.value()
        self.assertNotIn(b"100 Continue", raw)
        status, headers, body = _response(raw)
        self.assertEqual(status, 413)
        self.assertEqual(headers[b"connection"], b"close")
        parsed = json.loads(body)
        self.assertEqual(parsed["success"], False)
        self.assertEqual(parsed["context"], {"maxBodySize": 1000})
        self.assertTrue(transport.disconnecting)
        # Whatever the client still sends is ignored.
        channel.dataReceived(b"x" * 5000)  # type: ignore[attr-defined]
        self.assertEqual(transport.value(), raw)
        self.assertEqual(len(self.registry), 0)

    def test_huge_declared_length(self) -> None:
        """A Content-Length of many gigabytes is refused the same way."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nContent-Length: 99999999999\r\n\r\n"
        )
        self.assertEqual(_response(transport.value())[0], 413)

    def test_chunked_body_over_limit(self) -> None:
        """A chunked body is cut off with a 413 as soon as it passes the limit."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(3):
            channel.dataReceived(b"190\r\n" + b"x" * 400 + b"\r\n")  # type: ignore[attr-defined]
        status, _, body = _response(transport.value())
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["success"], False)
        self.assertTrue(transport.disconnecting)

    def test_chunked_body_within_limit(self) -> None:
        """A chunked body within the limit is served."""
        body = publish_body("chunky")
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(_response(transport.value())[0], 200)
        self.assertIsNotNone(self.registry.get("chunky"))

    def test_keep_alive(self) -> None:
        """Several requests are served on one persistent connection."""
        channel, transport = self.connect()
        for _ in range(3):
            channel.dataReceived(  # type: ignore[attr-defined]
                b"GET /api/v1/health HTTP/1.1\r\nHost: r\r\n\r\n"
            )
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertFalse(transport.disconnecting)

    def test_no_tracebacks(self) -> None:
        """The site never shows tracebacks."""
        self.assertFalse(self.site.displayTracebacks)

    def test_access_log_off_by_default(self) -> None:
        """Requests are not logged unless the access log is turned on."""
        written: list[str] = []
        self.site.logFile = type("F", (), {"write": written.append})()
        channel, _ = self.connect()
        channel.dataReceived(b"GET /api/v1/health HTTP/1.1\r\nHost: r\r\n\r\n")  # type: ignore[attr-defined]
        self.assertEqual(written, [])
        self.site.access_log = True
        channel.dataReceived(b"GET /api/v1/health HTTP/1.1\r\nHost: r\r\n\r\n")  # type: ignore[attr-defined]
        self.assertEqual(len(written), 1)
        self.assertIn("/api/v1/health", written[0])

    def test_idle_connections_time_out(self) -> None:
        """An idle connection is closed after the site's timeout."""
        _, transport = self.connect()
        self.clock.advance(61)
        self.assertTrue(transport.disconnecting)

    def test_chunked_body_over_limit_in_one_read(self) -> None:
        """
        A chunked body over the limit whose end arrives in the same read is
        answered the 413 alone: the rest of the read is not served.
        """
        body = publish_body("sneaky")
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % 1001
            + b" " * 1001
            + b"\r\n%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
        self.assertEqual(_response(transport.value())[0], 413)
        self.assertIsNone(self.registry.get("sneaky"))
        self.assertEqual(self.site.bodies.used, 0)

    def test_counters(self) -> None:
        """The site's bounds are counted, for a metrics endpoint."""
        self.post(publish_body("counted"))
        stats = self.site.stats()
        self.assertEqual(stats["connections_open"], 1)
        self.assertEqual(stats["connections_accepted"], 1)
        self.assertEqual(stats["body_bytes_held"], 0)
        self.assertGreater(stats["body_bytes_peak"], 0)
        self.assertEqual(
            {k: stats[k] for k in ("header_timeouts", "body_timeouts", "idle_timeouts")},
            {"header_timeouts": 0, "body_timeouts": 0, "idle_timeouts": 0},
        )

"""
Tests for L{hsu_registry.security.limits}: per-identity rates (429 with
Retry-After) and quotas (modules, bytes of metadata), through the HTTP API
with time on a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.errors import TooManyRequests
from hsu_registry.registry import Registry
from hsu_registry.security.identity import Identity
from hsu_registry.security.limits import Quotas, RateLimiter
from hsu_registry.security.policy import default_policy
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.web.api import RegistryAPI

from .helpers import publish_body

FLOODER = Identity("uid", "2000", uid=2000)
QUIET = Identity("uid", "2001", uid=2001)
ADMIN = Identity("uid", "0", uid=0)
BASE = "http://registry.invalid/api/v1"


class BucketTests(SynchronousTestCase):
    def test_burst_then_rate(self) -> None:
        """A burst passes, the next is refused with the wait, and the bucket refills in time."""
        limiter = RateLimiter(rate=2.0, burst=3, what="writes")
        for _ in range(3):
            limiter.take("a", 0.0)
        error = self.assertRaises(TooManyRequests, limiter.take, "a", 0.0)
        self.assertEqual(error.status, 429)
        self.assertAlmostEqual(error.retry_after, 0.5)
        limiter.take("b", 0.0)  # another identity has its own bucket
        limiter.take("a", 0.5)
        self.assertRaises(TooManyRequests, limiter.take, "a", 0.5)

    def test_bounded(self) -> None:
        """However many identities, the table keeps at most max_tracked buckets."""
        limiter = RateLimiter(rate=1.0, burst=1, what="writes", max_tracked=100)
        for i in range(1000):
            limiter.take(f"token:{i}", 0.0)
        self.assertEqual(len(limiter), 100)


class APILimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        quotas = Quotas(
            write_rate=10,
            write_burst=20,
            read_rate=5,
            read_burst=5,
            max_modules=3,
            max_metadata_bytes=100,
        )
        self.registry = Registry(
            MemoryStore(), self.clock, policy=default_policy(registry_uid=0), quotas=quotas
        )
        self.caller = FLOODER
        self.treq: Any = StubTreq(
            RegistryAPI(self.registry, identify=lambda request: self.caller).resource()
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, caller: Identity | None = None
    ) -> tuple[int, Any, Any]:
        self.caller = caller or self.caller
        response = self.successResultOf(self.treq.request(method, BASE + path, data=body))
        return response.code, response.headers, json.loads(self.successResultOf(response.content()))

    def test_write_flood(self) -> None:
        """
        An identity past its write rate gets a JSON 429 with Retry-After and
        nothing changes; another identity, and an admin, publish as usual.
        """
        codes = [
            self.request("POST", "/publish", publish_body("flood", i))[0] for i in range(1, 31)
        ]
        self.assertEqual(codes.count(200), 20)
        self.assertEqual(codes[20:], [429] * 10)
        code, headers, body = self.request("POST", "/publish", publish_body("flood", 99))
        self.assertEqual(code, 429)
        self.assertEqual(headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertIn("too many writes from uid:2000", body["error"])
        flood = self.registry.get("flood")
        assert flood is not None
        self.assertEqual(flood.process_id, 20)
        self.assertEqual(self.request("POST", "/publish", publish_body("q"), QUIET)[0], 200)
        for i in range(50):
            self.assertEqual(self.request("POST", "/publish", publish_body("a", i), ADMIN)[0], 200)
        self.clock.advance(1)
        self.assertEqual(self.request("PUT", "/heartbeat/flood", caller=FLOODER)[0], 200)

    def test_expensive_reads(self) -> None:
        """The catalog is rate limited per identity; a plain discover never is."""
        self.request("POST", "/publish", publish_body("m"))
        codes = [self.request("GET", "/modules")[0] for _ in range(7)]
        self.assertEqual(codes, [200] * 5 + [429] * 2)
        self.assertEqual(self.request("GET", "/services/service1")[0], 429)
        self.assertEqual({self.request("GET", "/discover/m")[0] for _ in range(50)}, {200})
        self.assertEqual(self.request("GET", "/modules", caller=QUIET)[0], 200)

    def test_module_quota(self) -> None:
        """
        A new module past the identity's quota is a 403 naming the limit; a
        republish of one it holds is not; unpublishing frees a place.
        """
        for name in ("a", "b", "c"):
            self.assertEqual(self.request("POST", "/publish", publish_body(name))[0], 200)
        code, _, body = self.request("POST", "/publish", publish_body("d"))
        self.assertEqual(code, 403)
        self.assertEqual(body["context"]["limit"], "modules per identity")
        self.assertIsNone(self.registry.get("d"))
        self.assertEqual(self.request("POST", "/publish", publish_body("a", 5))[0], 200)
        self.assertEqual(self.request("DELETE", "/unpublish/a")[0], 200)
        self.assertEqual(self.request("POST", "/publish", publish_body("d"))[0], 200)
        self.assertEqual(self.request("POST", "/publish", publish_body("e"), QUIET)[0], 200)

    def test_metadata_quota(self) -> None:
        """Metadata bytes are counted across an identity's modules."""

        def with_metadata(name: str, size: int) -> bytes:
            api = {"serviceIDs": ["s"], "serverPort": 1, "protocol": "grpc"}
            api["metadata"] = {"k": "v" * (size - 1)}  # type: ignore[assignment]
            return publish_body(name, apis=[api])

        self.assertEqual(self.request("POST", "/publish", with_metadata("a", 60))[0], 200)
        code, _, body = self.request("POST", "/publish", with_metadata("b", 60))
        self.assertEqual((code, body["context"]["limit"]), (403, "metadata bytes per identity"))
        self.assertEqual(self.request("POST", "/publish", with_metadata("a", 90))[0], 200)
        self.assertEqual(self.registry.usage.usage("uid:2000"), (1, 90))


class HoldOffTests(SynchronousTestCase):
    def test_connection_paused_until_retry(self) -> None:
        """
        Once a 429 is written, the connection is not read from until the
        identity may send again: a flooder ignoring Retry-After costs one
        answer per connection per wait.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from hsu_registry.web.site import RegistrySite

        clock = Clock()
        registry = Registry(
            MemoryStore(),
            clock,
            policy=default_policy(registry_uid=0),
            quotas=Quotas(write_rate=1, write_burst=1),
        )
        api = RegistryAPI(registry, identify=lambda request: FLOODER)
        site = RegistrySite(api.resource(), reactor=clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        body = publish_body("m")
        request = (
            b"POST /api/v1/publish HTTP/1.1\r\nHost: r\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        channel.dataReceived(request)
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(request)
        self.assertIn(b"HTTP/1.1 429 ", transport.value())
        self.assertEqual(transport.producerState, "paused")
        clock.advance(1)
        self.assertEqual(transport.producerState, "producing")


class RefusalLogTests(SynchronousTestCase):
    def test_flood_is_one_line_per_interval(self) -> None:
        """Every refusal counts; a flood of the same one is one log line per interval."""
        from twisted.logger import capturedLogs

        from hsu_registry.security.audit import RefusalLog

        clock = Clock()
        refusals = RefusalLog(clock, interval=10)
        with capturedLogs() as events:
            for _ in range(1000):
                refusals.refuse("rate", "uid:2000", "/api/v1/publish", "too many writes")
            clock.advance(10)
            refusals.refuse("rate", "uid:2000", "/api/v1/publish", "too many writes")
            refusals.refuse("rate", "uid:2001", "/api/v1/publish", "too many writes")
        self.assertEqual(refusals.refused, 1002)
        lines = [e["log_format"].format(**e) for e in events]
        self.assertEqual(len(lines), 3)
        self.assertIn("(999 in 10s)", lines[1])  # the 999 after the first, at the interval's end
        self.assertIn("uid:2001", lines[2])
        self.assertTrue(all(e["audit"] for e in events))
        # A flood that stops still has its count logged (at the stop at the latest).
        with capturedLogs() as events:
            refusals.stop()
        self.assertEqual([e["count"] for e in events], [1])

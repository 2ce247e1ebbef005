"""
Tests for L{hsu_registry.checks}: the ``check`` object of an API entry, the
TCP and HTTP probes against real local listeners, and the scheduler driven by
a L{task.Clock} and hand-fired fake probes.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hsu_registry.checks.probes import ProbeResult, http_probe, tcp_probe
from hsu_registry.checks.scheduler import CheckScheduler, Target, network_probe
from hsu_registry.checks.spec import (
    MAX_HTTP_PATH_LENGTH,
    MAX_INTERVAL,
    MAX_TIMEOUT,
    MIN_INTERVAL,
    MIN_TIMEOUT,
    CheckSpec,
    go_duration,
    parse_check,
)
from hsu_registry.errors import InvalidRequest

from .helpers import refusing_port

WHERE = "apis[0].check"

# -- the check object ---------------------------------------------------------


class ParseCheckTests(SynchronousTestCase):
    """
    L{parse_check} turns the ``check`` object of an API entry into a
    L{CheckSpec}, or refuses it with a message naming the field.
    """

    def assertRefused(self, raw: Any, *fragments: str) -> None:
        error = self.assertRaises(InvalidRequest, parse_check, raw, WHERE)
        self.assertIn(WHERE, error.message)
        for fragment in fragments:
            self.assertIn(fragment, error.message)

    def test_null(self) -> None:
        """A null check means no check."""
        self.assertIsNone(parse_check(None, WHERE))

    def test_tcpDefaults(self) -> None:
        """A TCP check without durations is checked every 10s with a 1s timeout."""
        self.assertEqual(parse_check({"tcp": True}, WHERE), CheckSpec("tcp", None, 10.0, 1.0))

    def test_http(self) -> None:
        """An HTTP check keeps its path and reads Go durations, sub-second included."""
        spec = parse_check(
            {"http": "/healthz?full=1", "interval": "1m30s", "timeout": "500ms"}, WHERE
        )
        self.assertEqual(spec, CheckSpec("http", "/healthz?full=1", 90.0, 0.5))

    def test_caseInsensitiveKeys(self) -> None:
        """Keys match case-insensitively, as everywhere in a publish body."""
        spec = parse_check({"HTTP": "/x", "Interval": "5s", "TimeOut": "2s"}, WHERE)
        self.assertEqual(spec, CheckSpec("http", "/x", 5.0, 2.0))

    def test_nullValuesMeanAbsent(self) -> None:
        """A null field is an absent field: its default applies."""
        spec = parse_check({"tcp": True, "http": None, "interval": None, "timeout": None}, WHERE)
        self.assertEqual(spec, CheckSpec("tcp", None, 10.0, 1.0))

    def test_notAnObject(self) -> None:
        """Anything but an object or null is refused."""
        raws: tuple[Any, ...] = ([], "tcp", True, 10)
        for raw in raws:
            self.assertRefused(raw, "must be an object")

    def test_unknownKey(self) -> None:
        """An unknown key (a typo) is refused, naming it and the allowed keys."""
        self.assertRefused(
            {"tcp": True, "intervall": "5s"}, "'intervall'", "tcp, http, interval, timeout"
        )

    def test_neitherOrBoth(self) -> None:
        """Exactly one of tcp and http is required."""
        self.assertRefused({}, "one of tcp or http")
        self.assertRefused({"interval": "5s"}, "one of tcp or http")
        self.assertRefused({"tcp": True, "http": "/"}, "only one of tcp and http")

    def test_tcpMustBeTrue(self) -> None:
        """tcp is exactly true; false is not a way to disable the check."""
        values: tuple[Any, ...] = (False, "true", 1, {})
        for value in values:
            self.assertRefused({"tcp": value}, f"{WHERE}.tcp must be true", "omit check")

    def test_httpPathRefused(self) -> None:
        """The path is a string of printable ASCII without spaces, starting with '/'."""
        cases = {
            5: "must be a path string",
            "": "must start with '/'",
            "healthz": "must start with '/'",
            "/a b": "printable ASCII",
            "/a\tb": "printable ASCII",
            "/a\x00": "printable ASCII",
            "/a\x7f": "printable ASCII",
            "/caf\u00e9": "percent-encode",
            "/a#top": "fragment",
            "/" + "a" * MAX_HTTP_PATH_LENGTH: f"longer than {MAX_HTTP_PATH_LENGTH}",
        }
        for path, fragment in cases.items():
            self.assertRefused({"http": path}, f"{WHERE}.http", fragment)

    def test_httpLongestPath(self) -> None:
        """A path of exactly the maximum length is accepted."""
        path = "/" + "a" * (MAX_HTTP_PATH_LENGTH - 1)
        spec = parse_check({"http": path}, WHERE)
        assert spec is not None
        self.assertEqual(spec.path, path)

    def test_durationsAreStrings(self) -> None:
        """A number of seconds is refused: durations are strings such as "10s"."""
        for field in ("interval", "timeout"):
            for value in (10, 1.5, True, ["1s"]):
                self.assertRefused(
                    {"tcp": True, field: value}, f"{WHERE}.{field}", "duration string"
                )

    def test_badDurations(self) -> None:
        """Text that is not a duration is refused with the parser's reason."""
        self.assertRefused({"tcp": True, "interval": "ten"}, f"{WHERE}.interval", "'ten'")
        self.assertRefused({"tcp": True, "timeout": "-1s"}, f"{WHERE}.timeout", "negative")

    def test_intervalLimits(self) -> None:
        """The interval is between 1s and 1h, both included."""
        self.assertEqual((MIN_INTERVAL, MAX_INTERVAL), (1.0, 3600.0))
        for text, seconds in (("1s", 1.0), ("1h", 3600.0)):
            spec = parse_check({"tcp": True, "interval": text, "timeout": "1s"}, WHERE)
            assert spec is not None
            self.assertEqual(spec.interval, seconds)
        for text in ("999ms", "0s", "1h0m1s"):
            self.assertRefused(
                {"tcp": True, "interval": text, "timeout": "10ms"}, "between 1s and 1h0m0s"
            )

    def test_timeoutLimits(self) -> None:
        """The timeout is between 10ms and 60s, both included."""
        self.assertEqual((MIN_TIMEOUT, MAX_TIMEOUT), (0.01, 60.0))
        for text, seconds in (("10ms", 0.01), ("60s", 60.0)):
            spec = parse_check({"tcp": True, "interval": "1m", "timeout": text}, WHERE)
            assert spec is not None
            self.assertEqual(spec.timeout, seconds)
        for text in ("9ms", "0s", "61s"):
            self.assertRefused(
                {"tcp": True, "interval": "1h", "timeout": text}, "between 10ms and 1m0s"
            )

    def test_timeoutWithinInterval(self) -> None:
        """The timeout may equal the interval but not exceed it, the default one included."""
        spec = parse_check({"tcp": True, "interval": "2s", "timeout": "2s"}, WHERE)
        assert spec is not None
        self.assertEqual((spec.interval, spec.timeout), (2.0, 2.0))
        self.assertRefused(
            {"tcp": True, "interval": "2s", "timeout": "3s"}, "timeout (3s) must not exceed"
        )
        self.assertRefused({"tcp": True, "timeout": "30s"}, "interval (10s)")


class CheckSpecJSONTests(SynchronousTestCase):
    """L{CheckSpec.to_json} writes the normalized form that L{parse_check} reads back."""

    def test_shapes(self) -> None:
        """tcp is written as true, http as its path, durations as Go text."""
        self.assertEqual(
            CheckSpec("tcp", None, 10.0, 1.0).to_json(),
            {"tcp": True, "interval": "10s", "timeout": "1s"},
        )
        self.assertEqual(
            CheckSpec("http", "/healthz", 90.0, 0.25).to_json(),
            {"http": "/healthz", "interval": "1m30s", "timeout": "250ms"},
        )

    def test_roundTripExamples(self) -> None:
        """Sub-second and fractional durations survive the trip."""
        for interval, timeout in (("1.5s", "500ms"), ("1h", "60s"), ("1s", "10ms"), ("3s", "0.3s")):
            raw = {"http": "/", "interval": interval, "timeout": timeout}
            spec = CheckSpec.from_json(raw)
            self.assertEqual(parse_check(spec.to_json(), WHERE), spec)
            self.assertEqual(CheckSpec.from_json(spec.to_json()), spec)

    @settings(deadline=None)
    @given(
        st.integers(int(MIN_INTERVAL * 1e9), int(MAX_INTERVAL * 1e9)),
        st.integers(int(MIN_TIMEOUT * 1e9), int(MAX_TIMEOUT * 1e9)),
        st.sampled_from([None, "/", "/healthz?x=1"]),
    )
    def test_roundTrip(self, interval_ns: int, timeout_ns: int, path: str | None) -> None:
        """Any valid spec, to the nanosecond, reads back equal from its JSON."""
        timeout_ns = min(timeout_ns, interval_ns)
        spec = CheckSpec(
            "tcp" if path is None else "http", path, interval_ns / 1e9, timeout_ns / 1e9
        )
        self.assertEqual(CheckSpec.from_json(spec.to_json()), spec)

    def test_fromJSONNull(self) -> None:
        """from_json wants a check, not null."""
        self.assertRaises(InvalidRequest, CheckSpec.from_json, None)

    def test_unknownKind(self) -> None:
        """A spec is a tcp or an http check."""
        self.assertRaises(ValueError, CheckSpec, "udp", None, 10.0, 1.0)

    def test_goDuration(self) -> None:
        """L{go_duration} writes what Go's Duration.String writes."""
        cases = {
            0.0: "0s",
            -1.0: "0s",
            1e-9: "1ns",
            1.5e-6: "1.5\u00b5s",
            0.0015: "1.5ms",
            0.5: "500ms",
            1.0: "1s",
            1.5: "1.5s",
            90.0: "1m30s",
            3600.0: "1h0m0s",
            3661.001: "1h1m1.001s",
            60.5: "1m0.5s",
        }
        for seconds, text in cases.items():
            self.assertEqual(go_duration(seconds), text, seconds)


# -- probes against real listeners ----------------------------------------------


class _Watched(ProtocolWrapper):
    """Tells its L{_Watching} factory about the data it receives."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received(data)
        super().dataReceived(data)


class _Watching(WrappingFactory):
    """
    A server factory wrapper that lets a test wait for what matters: the first
    request bytes, and every connection being closed again (no leak).
    """

    protocol = _Watched

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.data: Deferred[bytes] = Deferred()
        self.made = 0
        self._idle: list[tuple[int, Deferred[None]]] = []

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.made += 1

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self._check()

    def received(self, data: bytes) -> None:
        if not self.data.called:
            self.data.callback(data)

    def closed(self, count: int = 1) -> Deferred[None]:
        """Fires once C{count} connections were made and none is open."""
        d: Deferred[None] = Deferred()
        self._idle.append((count, d))
        self._check()
        return d

    def _check(self) -> None:
        for count, d in self._idle[:]:
            if self.made >= count and not self.protocols:
                self._idle.remove((count, d))
                d.callback(None)


class _Answer(Resource):
    """Answers every request with a status, recording what was asked."""

    isLeaf = True

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.requests: list[tuple[bytes, bytes | None, bytes | None]] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(
            (request.uri, request.getHeader(b"user-agent"), request.getHeader(b"host"))
        )
        request.setResponseCode(self.status)
        return b"body"


class _Endless(Protocol):
    """Answers 200 and then streams a body that never ends."""

    started = False

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if not self.started:
            self.started = True
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
            transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        transport: Any = self.transport
        transport.write(b"x" * 65536)

    def stopProducing(self) -> None:
        pass


class ProbeTests(TestCase):
    """
    The probes against real local listeners. Timeouts are driven by a
    L{task.Clock} passed as the probe's clock: nothing waits in real time.
    """

    timeout = 20

    def listen(self, factory: Any, interface: str = "127.0.0.1") -> tuple[_Watching, Any]:
        watching = _Watching(factory)
        port = reactor.listenTCP(0, watching, interface=interface)
        self.addCleanup(port.stopListening)
        return watching, port

    async def test_tcpConnected(self) -> None:
        """A listening port passes with "connected", and the probe hangs up at once."""
        watching, port = self.listen(Factory.forProtocol(Protocol))
        clock = task.Clock()
        result = await tcp_probe(reactor, "127.0.0.1", port.getHost().port, 5.0, clock)
        self.assertEqual(result, ProbeResult(True, "connected"))
        await watching.closed()
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_tcpRefusedOnceDown(self) -> None:
        """The same port is critical, "refused", once its listener stops."""
        watching, port = self.listen(Factory.forProtocol(Protocol))
        number = port.getHost().port
        self.assertTrue((await tcp_probe(reactor, "127.0.0.1", number, 5.0)).passing)
        await watching.closed()
        await port.stopListening()
        refusing_port(self, number)
        result = await tcp_probe(reactor, "127.0.0.1", number, 5.0, task.Clock())
        self.assertEqual(result, ProbeResult(False, "refused"))

    async def test_http200(self) -> None:
        """A 2xx answer passes; the probe GETs the path with its User-Agent and Host."""
        resource = _Answer(200)
        watching, port = self.listen(Site(resource))
        number = port.getHost().port
        result = await http_probe(reactor, "127.0.0.1", number, "/healthz?x=1", 5.0, task.Clock())
        self.assertEqual(result, ProbeResult(True, "HTTP 200"))
        self.assertEqual(
            resource.requests,
            [(b"/healthz?x=1", b"hsu-registry-check", f"127.0.0.1:{number}".encode())],
        )
        await watching.closed()

    async def test_http503(self) -> None:
        """Any other status is critical, with the status as output."""
        for status in (503, 404, 301):
            watching, port = self.listen(Site(_Answer(status)))
            result = await http_probe(reactor, "127.0.0.1", port.getHost().port, "/", 5.0)
            self.assertEqual(result, ProbeResult(False, f"HTTP {status}"))
            await watching.closed()

    async def test_httpRefused(self) -> None:
        """Nothing listening is critical, "refused"."""
        result = await http_probe(reactor, "127.0.0.1", refusing_port(self), "/", 5.0, task.Clock())
        self.assertEqual(result, ProbeResult(False, "refused"))

    async def test_httpClosedWithoutAnswer(self) -> None:
        """A server that hangs up without answering is critical, "closed"."""

        class HangUp(Protocol):
            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

        watching, port = self.listen(Factory.forProtocol(HangUp))
        result = await http_probe(reactor, "127.0.0.1", port.getHost().port, "/", 5.0)
        self.assertEqual(result, ProbeResult(False, "closed"))
        await watching.closed()

    async def test_httpGarbage(self) -> None:
        """
        An answer that is not HTTP, or a status line that never ends, is
        critical with "bad response", and the connection is closed.  What the
        target said is never in the output (issue 12: banners leaked), only
        in the detail, for the operator's log.
        """

        class Says(Protocol):
            reply = b""

            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.write(self.reply)

        for reply, shown in (
            (b"SSH-2.0-OpenSSH_9.2\r\n", "SSH-2.0-OpenSSH_9.2"),
            (b"HTTP/1.1 2000 Huh\r\n", "HTTP/1.1 2000 Huh"),
            (b"HTTP/1.1 \xd9\xa2\xd9\xa0\xd9\xa0 OK\r\n", "HTTP/1.1"),
            (b"x" * 2000, "no status line in the first 1024 bytes"),
        ):
            says: Any = type("Says", (Says,), {"reply": reply})
            factory = Factory.forProtocol(says)
            watching, port = self.listen(factory)
            result = await http_probe(reactor, "127.0.0.1", port.getHost().port, "/", 5.0)
            self.assertEqual(result, ProbeResult(False, "bad response"))
            self.assertEqual(result.output, "bad response")
            self.assertIn(shown, result.detail)
            await watching.closed()

    async def test_httpIPv6(self) -> None:
        """An IPv6 literal is bracketed in the URL and the Host header."""
        resource = _Answer(204)
        try:
            watching, port = self.listen(Site(resource), interface="::1")
        except CannotListenError:
            raise SkipTest("no IPv6 loopback here") from None
        number = port.getHost().port
        result = await http_probe(reactor, "::1", number, "/", 5.0, task.Clock())
        self.assertEqual(result, ProbeResult(True, "HTTP 204"))
        self.assertEqual(resource.requests[0][2], f"[::1]:{number}".encode())
        await watching.closed()

    async def test_httpHung(self) -> None:
        """
        A server that accepts and never answers is critical, "timeout", when
        the probe's clock reaches the timeout; the connection is closed and
        no timer is left.
        """
        watching, port = self.listen(Factory.forProtocol(Protocol))
        clock = task.Clock()
        probing = http_probe(reactor, "127.0.0.1", port.getHost().port, "/", 1.0, clock)
        request = await watching.data
        self.assertTrue(request.startswith(b"GET / HTTP/1.1\r\n"))
        self.assertNoResult(probing)
        clock.advance(0.999)
        self.assertNoResult(probing)
        clock.advance(0.001)
        self.assertEqual(self.successResultOf(probing), ProbeResult(False, "timeout"))
        await watching.closed()
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_httpCancelled(self) -> None:
        """Cancelling a probe fires it critical, closes its connection and leaves no timer."""
        watching, port = self.listen(Factory.forProtocol(Protocol))
        clock = task.Clock()
        probing = http_probe(reactor, "127.0.0.1", port.getHost().port, "/", 1.0, clock)
        await watching.data
        probing.cancel()
        self.assertEqual(self.successResultOf(probing), ProbeResult(False, "cancelled"))
        self.assertEqual(clock.getDelayedCalls(), [])
        await watching.closed()

    async def test_httpEndlessBody(self) -> None:
        """A 200 with an endless body passes at once: the body is not read but cut off."""
        watching, port = self.listen(Factory.forProtocol(_Endless))
        clock = task.Clock()
        result = await http_probe(reactor, "127.0.0.1", port.getHost().port, "/", 1.0, clock)
        self.assertEqual(result, ProbeResult(True, "HTTP 200"))
        await watching.closed()
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_networkProbe(self) -> None:
        """L{network_probe} runs the probe the target's spec names."""
        resource = _Answer(200)
        watching, port = self.listen(Site(resource))
        number = port.getHost().port
        probe = network_probe(reactor, task.Clock())
        tcp = Target("m", 0, "127.0.0.1", number, CheckSpec("tcp", None, 10.0, 5.0))
        http = Target("m", 1, "127.0.0.1", number, CheckSpec("http", "/h", 10.0, 5.0))
        self.assertEqual(await probe(tcp), ProbeResult(True, "connected"))
        self.assertEqual(await probe(http), ProbeResult(True, "HTTP 200"))
        self.assertEqual([uri for uri, _, _ in resource.requests], [b"/h"])
        await watching.closed(2)


class ProbeWithoutNetworkTests(SynchronousTestCase):
    """Probe behaviour that needs no real socket: a memory reactor stands in."""

    def test_tcpConnectTimesOut(self) -> None:
        """
        A connection attempt that never completes is critical at the timeout;
        the attempt is stopped and no timer is left.
        """
        memory = MemoryReactorClock()
        probing = tcp_probe(memory, "192.0.2.1", 80, 1.5)
        self.assertEqual([client[1] for client in memory.tcpClients], [80])
        memory.advance(1.4)
        self.assertNoResult(probing)
        memory.advance(0.1)
        self.assertEqual(self.successResultOf(probing), ProbeResult(False, "timeout"))
        self.assertTrue(memory.connectors[0].stoppedConnecting)
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_addressesSkipTheResolver(self) -> None:
        """
        An IP address is connected to at once, without a name lookup in the
        resolver's threads, through a factory that logs nothing per connection.
        """
        memory = MemoryReactorClock()
        resolved: list[str] = []
        resolver: Any = memory.nameResolver
        resolver.resolveHostName = lambda receiver, name, *a, **k: resolved.append(name)
        tcp_probe(memory, "192.0.2.1", 80, 1.0).cancel()
        http_probe(memory, "2001:db8::1", 8080, "/h", 1.0).cancel()
        self.assertEqual(
            [(c[0], c[1]) for c in memory.tcpClients], [("192.0.2.1", 80), ("2001:db8::1", 8080)]
        )
        self.assertEqual(resolved, [])
        self.assertFalse(memory.tcpClients[0][2]._wrappedFactory.noisy)
        tcp_probe(memory, "registry.invalid", 80, 1.0).cancel()  # a name: looked up
        self.assertEqual(resolved, ["registry.invalid"])

    def test_tcpCancelled(self) -> None:
        """Cancelling a connecting probe stops the attempt and cancels its timer."""
        memory = MemoryReactorClock()
        clock = task.Clock()
        probing = tcp_probe(memory, "::1", 80, 1.0, clock)
        probing.cancel()
        self.assertEqual(self.successResultOf(probing), ProbeResult(False, "cancelled"))
        self.assertTrue(memory.connectors[0].stoppedConnecting)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_unknownHost(self) -> None:
        """A name that resolves to nothing is critical, "unresolved"."""

        class Nothing:
            def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kw: Any) -> Any:
                receiver.resolutionBegan(None)
                receiver.resolutionComplete()
                return receiver

        memory = MemoryReactorClock()
        memory.installNameResolver(Nothing())
        result = self.successResultOf(tcp_probe(memory, "nowhere.invalid", 80, 1.0))
        self.assertEqual(result, ProbeResult(False, "unresolved"))
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_badHost(self) -> None:
        """A host that cannot be put in a URL is critical, not an exception."""
        memory = MemoryReactorClock()
        result = self.successResultOf(http_probe(memory, "a..b\u00e9", 80, "/", 1.0))
        self.assertFalse(result.passing)
        self.assertEqual(memory.getDelayedCalls(), [])


# -- the scheduler ----------------------------------------------------------------

TCP = CheckSpec("tcp", None, 10.0, 1.0)


def _target(index: int = 0, module: str = "m", port: int = 8000, spec: CheckSpec = TCP) -> Target:
    return Target(module, index, "127.0.0.1", port + index, spec)


class _FakeProbe:
    """A probe whose checks the test fires by hand; records calls and cancellations."""

    def __init__(self) -> None:
        self.calls: list[tuple[Target, Deferred[ProbeResult]]] = []
        self.cancelled: list[Target] = []

    def __call__(self, target: Target) -> Deferred[ProbeResult]:
        d: Deferred[ProbeResult] = Deferred(lambda _: self.cancelled.append(target))
        self.calls.append((target, d))
        return d

    def targets(self) -> list[Target]:
        return [target for target, _ in self.calls]

    def answer(self, index: int, passing: bool = True, output: str = "ok") -> None:
        self.calls[index][1].callback(ProbeResult(passing, output))


class SchedulerTests(SynchronousTestCase):
    """L{CheckScheduler} with a L{task.Clock} and probes fired by hand."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.probe = _FakeProbe()
        self.reports: list[tuple[Target, ProbeResult]] = []

    def report(self, target: Target, result: ProbeResult) -> None:
        self.reports.append((target, result))

    def scheduler(
        self, concurrency: int = 32, probe: Any = None, report: Any = None
    ) -> CheckScheduler:
        return CheckScheduler(
            self.clock,
            probe or self.probe,
            report or self.report,
            concurrency=concurrency,
            first_delay=lambda target: 0.0,
        )

    def test_firstDelay(self) -> None:
        """A new target is first checked after first_delay(target) seconds."""
        scheduler = CheckScheduler(
            self.clock, self.probe, self.report, first_delay=lambda t: 0.5 + t.api_index
        )
        scheduler.set_targets("m", [_target(0), _target(1)])
        self.clock.advance(0.499)
        self.assertEqual(self.probe.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(self.probe.targets(), [_target(0)])
        self.clock.advance(1.0)
        self.assertEqual(self.probe.targets(), [_target(0), _target(1)])

    def test_defaultJitter(self) -> None:
        """By default the first check comes after rng() times min(interval, 1s)."""
        scheduler = CheckScheduler(self.clock, self.probe, self.report, rng=lambda: 0.75)
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0.7)
        self.assertEqual(self.probe.calls, [])
        self.clock.advance(0.05)
        self.assertEqual(len(self.probe.calls), 1)

    def test_intervalAfterCompletion(self) -> None:
        """The next check starts interval seconds after the previous one completed."""
        scheduler = self.scheduler()
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0)
        self.clock.advance(0.5)
        self.probe.answer(0, True, "connected")
        self.assertEqual(self.reports, [(_target(), ProbeResult(True, "connected"))])
        self.clock.advance(9.999)
        self.assertEqual(len(self.probe.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.probe.calls), 2)

    def test_hungProbeNoPileUp(self) -> None:
        """
        A probe that never fires is cancelled at the spec's timeout and reported
        critical; the next check starts an interval after that, never earlier.
        """
        scheduler = self.scheduler()
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0)
        self.clock.advance(0.999)
        self.assertEqual((self.probe.cancelled, self.reports), ([], []))
        self.clock.advance(0.001)
        self.assertEqual(self.probe.cancelled, [_target()])
        self.assertEqual(self.reports, [(_target(), ProbeResult(False, "timeout"))])
        self.assertEqual(scheduler.in_flight, 0)
        self.clock.advance(9.999)
        self.assertEqual(len(self.probe.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.probe.calls), 2)
        for _ in range(100):
            self.clock.advance(0.5)
            self.assertLessEqual(scheduler.in_flight, 1)
        # At 61s: checks started at 0, 11, 22, 33, 44 and 55, one every 11s.
        self.assertEqual(len(self.probe.calls), 6)
        self.assertEqual(len(self.probe.cancelled), 6)

    def test_timeoutFreesSlot(self) -> None:
        """A hung probe holds its concurrency slot only until its timeout."""
        scheduler = self.scheduler(concurrency=1)
        scheduler.set_targets("m", [_target(0), _target(1)])
        self.clock.advance(0)
        self.assertEqual((scheduler.in_flight, scheduler.queued), (1, 1))
        self.clock.advance(1.0)
        self.assertEqual(self.probe.targets(), [_target(0), _target(1)])

    def test_concurrencyBoundFIFO(self) -> None:
        """At most concurrency probes run; due checks wait and start in FIFO order."""
        scheduler = self.scheduler(concurrency=2)
        targets = [_target(i) for i in range(4)]
        scheduler.set_targets("m", targets)
        self.clock.advance(0)
        self.assertEqual(self.probe.targets(), targets[:2])
        self.assertEqual((scheduler.in_flight, scheduler.queued, scheduler.scheduled), (2, 2, 4))
        self.probe.answer(1)
        self.assertEqual(self.probe.targets(), targets[:3])
        self.probe.answer(0)
        self.assertEqual(self.probe.targets(), targets)
        self.assertEqual((scheduler.in_flight, scheduler.queued), (2, 0))
        self.assertEqual([t for t, _ in self.reports], [targets[1], targets[0]])

    def test_synchronousProbesDoNotRecurse(self) -> None:
        """
        Hundreds of queued checks whose probes answer at once all run when the
        slot frees, in a loop rather than one nested call per check.
        """
        first: Deferred[ProbeResult] = Deferred()

        def probe(target: Target) -> Deferred[ProbeResult]:
            return first if target.api_index == 0 else succeed(ProbeResult(True, "ok"))

        scheduler = self.scheduler(concurrency=1, probe=probe)
        scheduler.set_targets("m", [_target(i) for i in range(1500)])
        self.clock.advance(0)
        self.assertEqual((scheduler.in_flight, scheduler.queued), (1, 1499))
        first.callback(ProbeResult(True, "ok"))
        self.assertEqual(len(self.reports), 1500)
        self.assertEqual((scheduler.in_flight, scheduler.queued), (0, 0))

    def test_setTargetsKeepsUnchanged(self) -> None:
        """
        An unchanged target keeps its schedule and its check in flight; a
        dropped one is cancelled; a new one is scheduled.
        """
        scheduler = self.scheduler()
        a, b, c = _target(0), _target(1), _target(2)
        scheduler.set_targets("m", [a, b])
        self.clock.advance(0)
        scheduler.set_targets("m", [a, c])
        self.assertEqual(self.probe.cancelled, [b])
        self.probe.answer(0)
        self.assertEqual(self.reports, [(a, ProbeResult(True, "ok"))])
        self.clock.advance(0)
        self.assertEqual(self.probe.targets(), [a, b, c])
        self.assertEqual(scheduler.scheduled, 2)

    def test_replacedTargetDropsStaleReport(self) -> None:
        """
        A target replaced while its probe runs (same API, new port) has its
        probe cancelled and its result never reported; the new one is checked.
        """
        scheduler = self.scheduler()
        old, new = _target(port=8000), _target(port=9000)
        scheduler.set_targets("m", [old])
        self.clock.advance(0)
        scheduler.set_targets("m", [new])
        self.assertEqual(self.probe.cancelled, [old])
        self.clock.advance(0)
        self.assertEqual(self.probe.targets(), [old, new])
        self.probe.answer(1)
        self.assertEqual(self.reports, [(new, ProbeResult(True, "ok"))])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_removeCancelsInFlight(self) -> None:
        """Removing a module cancels its probes and timers and frees their slots."""
        scheduler = self.scheduler(concurrency=1)
        scheduler.set_targets("m", [_target(0), _target(1)])
        scheduler.set_targets("other", [_target(0, module="other")])
        self.clock.advance(0)
        self.assertEqual((scheduler.in_flight, scheduler.queued), (1, 2))
        scheduler.remove("m")
        self.assertEqual(self.probe.cancelled, [_target(0)])
        self.assertEqual(self.probe.targets(), [_target(0), _target(0, module="other")])
        self.assertEqual((scheduler.scheduled, scheduler.in_flight, scheduler.queued), (1, 1, 0))
        scheduler.remove("other")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.reports, [])

    def test_stop(self) -> None:
        """stop cancels every timer and probe; later set_targets is ignored."""
        scheduler = self.scheduler(concurrency=1)
        scheduler.set_targets("m", [_target(0), _target(1)])
        self.clock.advance(0)
        scheduler.set_targets("n", [_target(0, module="n")])
        scheduler.stop()
        self.assertFalse(scheduler.running)
        self.assertEqual(self.probe.cancelled, [_target(0)])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((scheduler.scheduled, scheduler.in_flight, scheduler.queued), (0, 0, 0))
        scheduler.set_targets("m", [_target(0)])
        self.clock.advance(100)
        self.assertEqual((len(self.probe.calls), self.reports), (1, []))

    def test_reportFailureLogged(self) -> None:
        """A report that raises is logged with the target; the schedule goes on."""

        def report(target: Target, result: ProbeResult) -> None:
            self.reports.append((target, result))
            raise ZeroDivisionError("report broke")

        scheduler = self.scheduler(report=report)
        scheduler.set_targets("m", [_target()])
        with capturedLogs() as events:
            self.clock.advance(0)
            self.probe.answer(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual([e.get("module_id") for e in events if "log_failure" in e], ["m"])
        self.clock.advance(10)
        self.probe.answer(1)
        self.assertEqual(len(self.reports), 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_reportDeferredFailureLogged(self) -> None:
        """A report returning a failing Deferred is logged too."""
        scheduler = self.scheduler(report=lambda target, result: fail(KeyError("x")))
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0)
        self.probe.answer(0)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_probeRaises(self) -> None:
        """
        A probe raising is a logged critical result, "error": the error's
        text (which may quote the target) is only its detail.
        """

        def probe(target: Target) -> Deferred[ProbeResult]:
            raise RuntimeError("probe bug")

        scheduler = self.scheduler(probe=probe)
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0)
        self.assertEqual(self.reports, [(_target(), ProbeResult(False, "error"))])
        self.assertEqual(self.reports[0][1].detail, "probe bug")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.reports), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_probeFails(self) -> None:
        """A probe's failing Deferred is a logged critical result; the schedule goes on."""
        scheduler = self.scheduler(probe=lambda target: fail(ValueError("no good")))
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0)
        self.assertEqual(self.reports, [(_target(), ProbeResult(False, "error"))])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(scheduler.in_flight, 0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_reportMayRemove(self) -> None:
        """A report may remove its own module: no further check is scheduled."""
        scheduler: CheckScheduler

        def report(target: Target, result: ProbeResult) -> None:
            self.reports.append((target, result))
            scheduler.remove(target.module_id)

        scheduler = self.scheduler(report=report)
        scheduler.set_targets("m", [_target()])
        self.clock.advance(0)
        self.probe.answer(0)
        self.assertEqual(len(self.reports), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(scheduler.scheduled, 0)

    def test_wrongModule(self) -> None:
        """Targets are given under their own module's ID."""
        scheduler = self.scheduler()
        self.assertRaises(ValueError, scheduler.set_targets, "m", [_target(module="n")])
        self.assertEqual(scheduler.scheduled, 0)

    def test_concurrencyAtLeastOne(self) -> None:
        """A scheduler that could never run a probe is refused."""
        self.assertRaises(ValueError, CheckScheduler, self.clock, self.probe, self.report, 0)

"""
Regression tests for issue 12 ("Trust"): health checks used as an SSRF and
port-scanning tool.  One test per attack the issue found, each driven the
way the attack was (registrations with checks, the health checker following
them) and asserting what the attacker must no longer get:

- a scan of loopback ports: bounded per identity in count and rate;
- banners in C{checkOutput}: a fixed vocabulary, the detail only logged;
- redirects: never followed;
- metadata, private, unspecified and numeric-form addresses, and names:
  never connected to, a name resolved once and never again;
- a flood of one target: throttled per identity;
- a starved victim: its first check within its interval plus timeout.

These tests use only what the health checker offered before the fix
(registrations in a store, L{HealthCheckService}, probes), so they run, and
fail, against the code before it.  Time is a L{task.Clock} (or a
L{MemoryReactorClock}, whose connections never complete: a blackhole);
real connections go to loopback listeners only.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import address as twisted_address
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hsu_registry.checks.probes import ProbeResult
from hsu_registry.checks.scheduler import Target
from hsu_registry.checks.service import HealthCheckService
from hsu_registry.model import CRITICAL, UNKNOWN, Registration, encode_json, parse_publish_body
from hsu_registry.registry import Change, ChangeKind, Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.web.watch import encode_change

from .helpers import refusing_port

NOW = 1_700_000_000.0


def api_entry(port: int, check: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "serviceIDs": ["svc"],
        "serverPort": port,
        "protocol": "http",
        "check": check,
    }
    if address is not None:
        entry["address"] = address
    return entry


def registration(module_id: str, owner: str, *apis: dict[str, Any]) -> Registration:
    """A registration as the store holds it, owned by C{owner}."""
    body = json.dumps({"moduleID": module_id, "processID": 1, "apis": list(apis)}).encode()
    request = parse_publish_body(body)
    return Registration.create(module_id, 1, request.apis, NOW, owner=owner)


def loaded(case: SynchronousTestCase, clock: Any, *registrations: Registration) -> Registry:
    """A registry on C{clock} that loaded C{registrations} from its store."""
    store = MemoryStore()
    for r in registrations:
        store.save(r, clock.seconds())
    registry = Registry(store, clock)
    case.successResultOf(registry.load())
    return registry


def statuses(registry: Registry, module_id: str) -> list[tuple[str | None, str | None]]:
    found = registry.get(module_id)
    assert found is not None
    return [(api.status, api.output) for api in found.apis]


class _InstantProbe:
    """A probe that answers at once, recording when each target was checked."""

    def __init__(self, clock: Clock, output: str = "refused") -> None:
        self.clock = clock
        self.output = output
        self.calls: list[tuple[float, Target]] = []

    def __call__(self, target: Target) -> Deferred[ProbeResult]:
        self.calls.append((self.clock.seconds(), target))
        return succeed(ProbeResult(False, self.output))


class ScanAndFloodTests(SynchronousTestCase):
    """What one identity's checks can make the registry do, in count and rate."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    def run_for(self, seconds: float, step: float = 0.05) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)

    def test_loopback_port_scan_is_bounded(self) -> None:
        """
        Issue 12: 9 modules of one identity with tcp checks of 127.0.0.1
        ports 1 to 1026 mapped them all in about 4 s.  Now the identity's
        checks past 256 are not run (their status stays unknown), and in 4 s
        at most 32 + 4 x 32 checks start (its rate: 32 a second, bursts of 32).
        """
        check = {"tcp": True, "interval": "1s", "timeout": "1s"}
        modules = [
            registration(
                f"scan{m}",
                "uid:666",
                *[api_entry(m * 114 + i + 1, check) for i in range(114)],
            )
            for m in range(9)
        ]
        registry = loaded(self, self.clock, *modules)
        probe = _InstantProbe(self.clock)
        service = HealthCheckService(registry, self.clock, probe=probe)
        service.startService()
        self.addCleanup(service.stopService)
        self.run_for(4.0)
        ports = {target.port for _, target in probe.calls}
        self.assertLessEqual(len(ports), 32 + 4 * 32)
        self.assertLessEqual(len(probe.calls), 32 + 4 * 32)
        scheduler = service.scheduler
        assert scheduler is not None
        self.assertEqual(scheduler.scheduled, 256)
        self.run_for(10.0)  # enough for all of them at 32 a second
        found = [s for m in range(9) for s in statuses(registry, f"scan{m}")]
        self.assertEqual(found.count((CRITICAL, "refused")), 256)
        self.assertEqual(found.count((UNKNOWN, None)), 1026 - 256)

    def test_flood_of_one_target_is_throttled(self) -> None:
        """
        Issue 12: 8 publishes of 128 APIs, all checking one host:port every
        second, drove 843 connections a second at it.  Now one identity's
        checks start at most 32 times a second (after a first burst of 32).
        """
        check = {"tcp": True, "interval": "1s", "timeout": "1s"}
        modules = [
            registration(f"flood{m}", "uid:666", *[api_entry(8080, check) for _ in range(128)])
            for m in range(8)
        ]
        registry = loaded(self, self.clock, *modules)
        probe = _InstantProbe(self.clock)
        service = HealthCheckService(registry, self.clock, probe=probe)
        service.startService()
        self.addCleanup(service.stopService)
        self.run_for(10.0)
        self.assertLessEqual(len(probe.calls), 32 + 10 * 32)
        self.assertGreaterEqual(len(probe.calls), 10 * 32)  # throttled, not stopped
        for second in range(1, 10):
            started = [t for t, _ in probe.calls if NOW + second <= t < NOW + second + 1]
            self.assertLessEqual(len(started), 33, second)


class StarvationTests(SynchronousTestCase):
    """One identity's blackholed checks against another identity's first check."""

    def test_victim_checked_within_interval_plus_timeout(self) -> None:
        """
        Issue 12: a legitimate API stayed unknown for over 120 s behind 1 000
        checks of another identity against an address that never answers.
        Now the victim's first check starts within its interval plus its
        timeout (in fact within the first second's jitter): the attacker's
        checks hold at most a quarter of the slots and identities take
        turns.  The network is a memory reactor whose connections never
        complete: every attacker check hangs until its 60 s timeout.
        """
        memory = MemoryReactorClock()
        memory.advance(NOW)
        hang = {"tcp": True, "interval": "60s", "timeout": "60s"}
        attacker = [
            registration(f"hole{m}", "uid:666", *[api_entry(9, hang) for _ in range(125)])
            for m in range(8)
        ]
        victim = registration("victim", "uid:1000", api_entry(8080, {"tcp": True}))
        registry = loaded(self, memory, *attacker, victim)
        service = HealthCheckService(registry, memory)
        service.startService()
        self.addCleanup(service.stopService)
        started: float | None = None
        for _ in range(int(11 / 0.1)):  # victim: interval 10s + timeout 1s
            memory.advance(0.1)
            if any(client[1] == 8080 for client in memory.tcpClients):
                started = memory.seconds() - NOW
                break
        self.assertIsNotNone(started, "the victim was not checked within 11 s")
        assert started is not None
        self.assertLessEqual(started, 1.1)
        attacks = [client for client in memory.tcpClients if client[1] == 9]
        self.assertGreater(len(attacks), 0)
        self.assertLessEqual(len(attacks), 32)


class ForbiddenAddressTests(SynchronousTestCase):
    """
    Registrations whose check addresses no check may reach, as a store may
    hold them (published before publishes were vetted): never connected to.
    """

    ADDRESSES = [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "fe80::1",
        "10.0.0.5",
        "192.168.1.1",
        "8.8.8.8",
        "0.0.0.0",
        "::",
        "2130706433",
        "0x7f.1",
        "127.1",
        "0177.0.0.1",
        "224.0.0.1",
        "metadata.internal",
    ]

    def test_never_connected(self) -> None:
        """
        Issue 12: metadata (169.254.169.254), private ranges, 0.0.0.0,
        2130706433 and DNS names were all tried.  None is connected to, and
        the name that resolves to the metadata address is looked up once,
        when the registration is followed, never at each check; each API is
        critical, "not allowed".
        """
        memory = MemoryReactorClock()
        memory.advance(NOW)
        names = _Names({"metadata.internal": ["169.254.169.254"]})
        memory.installNameResolver(names)
        check = {"tcp": True, "interval": "1s", "timeout": "500ms"}
        bad = registration(
            "bad",
            "uid:666",
            *[api_entry(80, check, address) for address in self.ADDRESSES],
            api_entry(81, {"http": "/latest/meta-data/", "interval": "1s"}, "169.254.169.254"),
        )
        registry = loaded(self, memory, bad)
        service = HealthCheckService(registry, memory)
        service.startService()
        self.addCleanup(service.stopService)
        for _ in range(30):
            memory.advance(1)
        self.assertEqual(memory.tcpClients, [])
        self.assertLessEqual(len(names.asked), 1)
        self.assertEqual(
            statuses(registry, "bad"), [(CRITICAL, "not allowed")] * (len(self.ADDRESSES) + 1)
        )

    def test_name_resolved_once(self) -> None:
        """
        A name is resolved once and its address pinned: when the name later
        resolves elsewhere (DNS rebinding to the metadata address), checks
        keep connecting to the first address, and never look the name up.
        """
        memory = MemoryReactorClock()
        memory.advance(NOW)
        names = _Names({"api.internal": ["127.0.0.1"]})
        memory.installNameResolver(names)
        check = {"tcp": True, "interval": "1s", "timeout": "500ms"}
        registry = loaded(
            self, memory, registration("m", "uid:1000", api_entry(8080, check, "api.internal"))
        )
        service = HealthCheckService(registry, memory)
        service.startService()
        self.addCleanup(service.stopService)
        memory.advance(1)
        names.answers["api.internal"] = ["169.254.169.254"]
        for _ in range(20):
            memory.advance(1)
        self.assertEqual(names.asked, ["api.internal"])
        self.assertGreater(len(memory.tcpClients), 5)
        self.assertEqual({(c[0], c[1]) for c in memory.tcpClients}, {("127.0.0.1", 8080)})


class _Names:
    """A name resolver answering from a table; records every name asked."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, *a: Any) -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for text in self.answers.get(hostName, []):
            receiver.addressResolved(twisted_address.IPv4Address("TCP", text, portNumber))
        receiver.resolutionComplete()
        return receiver


# -- real connections to loopback listeners ---------------------------------------

BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


class _Banner(Protocol):
    """Greets every connection with an SSH version line, as sshd does."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(BANNER)


class _Redirect(Resource):
    """Answers every GET with a redirect to C{location}."""

    isLeaf = True

    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", self.location)
        return b""


class _Counting(Factory):
    """Counts connections, and closes them."""

    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        return Protocol()


class LoopbackTests(TestCase):
    """
    The health checker against real loopback listeners: time is a
    L{task.Clock}, so nothing waits for a timeout.
    """

    timeout = 20

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.registry = Registry(MemoryStore(), self.clock)
        self.service = HealthCheckService(self.registry, reactor, clock=self.clock)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.changes: list[Change] = []
        self.registry.subscribe(self.changes.append)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def listen(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number: int = port.getHost().port
        return number

    async def checked(self, module_id: str, count: int) -> Registration:
        """Run the first checks, and wait until all C{count} APIs have a status."""
        self.clock.advance(1)
        for _ in range(500):
            found = self.registry.get(module_id)
            assert found is not None
            if all(api.status != UNKNOWN for api in found.apis[:count]):
                return found
            await _turn()
        self.fail("the checks did not complete")

    async def test_no_banner_in_answers(self) -> None:
        """
        Issue 12: checkOutput showed the first 60 characters of a banner
        (an SSH version line, an SMTP greeting).  A tcp check of an SSH-like
        server says only "connected", an http check of it only "bad
        response", a tcp check of a closed port only "refused"; no byte of
        the banner is in the registration, its catalog entry or the watch
        stream's events, while the operator's log has it.
        """
        ssh = self.listen(Factory.forProtocol(_Banner))
        closed = refusing_port(self)
        body = {
            "moduleID": "m",
            "processID": 1,
            "apis": [
                api_entry(ssh, {"tcp": True}),
                api_entry(ssh, {"http": "/"}),
                api_entry(closed, {"tcp": True}),
            ],
        }
        self.successResultOf(self.registry.publish(parse_publish_body(json.dumps(body).encode())))
        found = await self.checked("m", 3)
        self.assertEqual(
            [(api.status, api.output) for api in found.apis],
            [("passing", "connected"), (CRITICAL, "bad response"), (CRITICAL, "refused")],
        )
        published = [found.discover_body]
        published += [encode_change(c, self.registry.epoch) for c in self.changes]
        published += [encode_json([api.to_json() for api in found.apis])]
        for text in published:
            for fragment in (b"SSH", b"OpenSSH", b"Debian", b"2.0"):
                self.assertNotIn(fragment, text)
        self.assertTrue(
            any("SSH-2.0-OpenSSH" in str(event.get("detail", "")) for event in self.logged),
            "the banner is logged for the operator",
        )

    async def test_redirects_not_followed(self) -> None:
        """
        An http check answered with a redirect to another address is
        critical, "HTTP 302": the registry never connects where the
        redirect points.
        """
        elsewhere = _Counting()
        target = self.listen(elsewhere)
        location = b"http://127.0.0.1:%d/healthz" % target
        redirecting = self.listen(Site(_Redirect(location)))
        body = {"moduleID": "m", "apis": [api_entry(redirecting, {"http": "/healthz"})]}
        self.successResultOf(self.registry.publish(parse_publish_body(json.dumps(body).encode())))
        found = await self.checked("m", 1)
        self.assertEqual((found.apis[0].status, found.apis[0].output), (CRITICAL, "HTTP 302"))
        for _ in range(5):
            await _turn()
        self.assertEqual(elsewhere.count, 0)
        status_changes = [c for c in self.changes if c.kind is ChangeKind.STATUS]
        self.assertEqual(len(status_changes), 1)


def _turn() -> Deferred[None]:
    """One trip through the real reactor."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d

"""
Tests for active health checks as the registry runs them: check specs in
publish bodies, statuses in answers and the watch stream, C{?passing=true},
and L{HealthCheckService} against fake probes (on a L{task.Clock}) and real
local listeners that go up and down or hang.
"""

from __future__ import annotations

import json
from ipaddress import ip_network
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hsu_registry.checks.probes import ProbeResult
from hsu_registry.checks.scheduler import Target
from hsu_registry.checks.service import HealthCheckService, targets_of
from hsu_registry.checks.spec import CheckSpec
from hsu_registry.checks.targets import CheckTargets
from hsu_registry.model import CRITICAL, PASSING, UNKNOWN, CheckTarget, parse_publish_body
from hsu_registry.registry import Change, ChangeKind, Registry
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.testing import ControllableStore
from hsu_registry.watch import ChangeLog
from hsu_registry.web.api import RegistryAPI
from hsu_registry.web.watch import encode_change

from .helpers import held_port

BASE = "http://registry.invalid/api/v1"
TCP_CHECK = {"tcp": True, "interval": "10s", "timeout": "1s"}
HTTP_CHECK = {"http": "/healthz", "interval": "10s", "timeout": "1s"}


def api_entry(port: int, check: Any = None, service: str = "svc", **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"serviceIDs": [service], "serverPort": port, "protocol": "http"}
    if check is not None:
        entry["check"] = check
    entry.update(extra)
    return entry


def body(module_id: str, *apis: dict[str, Any], process_id: int = 7) -> bytes:
    return json.dumps({"moduleID": module_id, "processID": process_id, "apis": list(apis)}).encode()


class _Fixture:
    """A registry on a clock, its API in memory, and the changes it made."""

    def set_up(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = ControllableStore()
        self.registry = Registry(self.store, self.clock)
        self.changes: list[Change] = []
        self.registry.subscribe(self.changes.append)
        self.api = RegistryAPI(self.registry)
        self.treq: Any = StubTreq(self.api.resource())

    def call(self, method: str, path: str, data: bytes | None = None) -> tuple[int, Any]:
        test: Any = self
        response = test.successResultOf(self.treq.request(method, BASE + path, data=data))
        return response.code, json.loads(test.successResultOf(response.content()))


class CheckSpecInPublishTests(_Fixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.set_up()

    def test_bad_checks_are_400_and_change_nothing(self) -> None:
        """Every malformed check is refused naming the field; nothing is registered."""
        cases: list[tuple[Any, str]] = [
            ("yes", "apis[0].check must be an object"),
            ({}, "needs one of tcp or http"),
            ({"tcp": True, "http": "/x"}, "only one of tcp and http"),
            ({"tcp": False}, "apis[0].check.tcp must be true"),
            ({"http": "healthz"}, "must start with '/'"),
            ({"http": "/a b"}, "apis[0].check.http contains"),
            ({"tcp": True, "interval": 10}, "apis[0].check.interval must be a duration"),
            ({"tcp": True, "interval": "100ms"}, "apis[0].check.interval must be between"),
            ({"tcp": True, "timeout": "2m"}, "apis[0].check.timeout must be between"),
            ({"tcp": True, "interval": "5s", "timeout": "6s"}, "must not exceed the interval"),
            ({"tcp": True, "intervall": "5s"}, "unknown key 'intervall'"),
        ]
        for check, fragment in cases:
            code, answer = self.call("POST", "/publish", body("m", api_entry(80, check)))
            self.assertEqual(code, 400, (check, answer))
            self.assertIn(fragment, answer["error"], check)
        self.assertEqual((len(self.registry), self.registry.index), (0, 0))

    def test_check_and_status_in_answers(self) -> None:
        """
        A checked API carries its normalized check and C{status: unknown}
        until checked; an unchecked one carries neither (the seed's shape).
        """
        code, _ = self.call(
            "POST",
            "/publish",
            body("m", api_entry(80, {"HTTP": "/healthz", "timeout": "250ms"}), api_entry(81)),
        )
        self.assertEqual(code, 200)
        _, found = self.call("GET", "/discover/m")
        checked, plain = found["apis"]
        self.assertEqual(
            checked["check"], {"http": "/healthz", "interval": "10s", "timeout": "250ms"}
        )
        self.assertEqual(checked["status"], UNKNOWN)
        self.assertNotIn("status", plain)
        self.assertNotIn("check", plain)
        _, entry = self.call("GET", "/modules/m")
        self.assertEqual(entry["apis"][0]["status"], UNKNOWN)
        _, service = self.call("GET", "/services/svc")
        self.assertEqual(service["providers"][0]["apis"][0]["status"], UNKNOWN)

    def test_null_check_is_no_check(self) -> None:
        """C{"check": null} means no check, as null means absent everywhere."""
        self.assertEqual(self.call("POST", "/publish", body("m", api_entry(80)))[0], 200)
        raw = json.loads(body("m", api_entry(80)))
        raw["apis"][0]["check"] = None
        self.assertEqual(parse_publish_body(json.dumps(raw).encode()).apis[0].check, None)


class StatusTests(_Fixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.set_up()
        self.call("POST", "/publish", body("m", api_entry(80, TCP_CHECK), api_entry(81)))
        registration = self.registry.get("m")
        assert registration is not None
        target = registration.apis[0].check_target()
        assert target is not None
        self.target = target

    def set_status(self, status: str, index: int = 0, target: CheckTarget | None = None) -> Any:
        return self.successResultOf(
            self.registry.set_status("m", index, target or self.target, status, "test")
        )

    def test_status_change_is_a_change(self) -> None:
        """A new status bumps the index and is a C{status} change; the same one is not."""
        index = self.registry.index
        change = self.set_status(PASSING)
        self.assertEqual((change.kind, change.index), (ChangeKind.STATUS, index + 1))
        self.assertEqual(change.registration.apis[0].status, PASSING)
        self.assertIsNone(self.set_status(PASSING))
        self.assertEqual(self.registry.index, index + 1)
        _, found = self.call("GET", "/discover/m")
        self.assertEqual(found["apis"][0]["status"], PASSING)
        self.assertEqual(found["apis"][0]["checkOutput"], "test")
        self.assertNotIn("checkOutput", found["apis"][1])
        self.assertEqual(self.store.writes, 1)  # statuses are not written to the store

    def test_status_event_on_the_watch_stream(self) -> None:
        """A status change is an SSE C{status} event carrying the new status."""
        change = self.set_status(CRITICAL)
        event = encode_change(change, self.registry.epoch)
        self.assertTrue(event.startswith(b"id: %d\nevent: status\n" % change.index))
        data = json.loads(event.split(b"data: ", 1)[1])
        self.assertEqual(data["apis"][0]["status"], CRITICAL)
        changelog = ChangeLog(self.registry, self.clock)
        self.set_status(PASSING)
        replay = changelog.since(change.index)
        assert replay is not None
        self.assertEqual([c.kind for c in replay], [ChangeKind.STATUS])

    def test_results_for_old_checks_are_dropped(self) -> None:
        """A result for a check the API no longer has, or an API it no longer has, is ignored."""
        other = CheckTarget("127.0.0.1", 80, CheckSpec("tcp", None, 30.0, 1.0))
        self.assertIsNone(self.set_status(PASSING, target=other))
        moved = CheckTarget("127.0.0.1", 8080, self.target.check)  # the old place
        self.assertIsNone(self.set_status(PASSING, target=moved))
        self.assertIsNone(self.set_status(PASSING, index=5))
        self.assertIsNone(
            self.successResultOf(self.registry.set_status("ghost", 0, other, PASSING))
        )
        self.assertRaises(ValueError, self.registry.set_status, "m", 0, other, "fine")

    def test_republish_keeps_status(self) -> None:
        """The same content again is a heartbeat and keeps the status found."""
        self.set_status(PASSING)
        index = self.registry.index
        self.call("POST", "/publish", body("m", api_entry(80, TCP_CHECK), api_entry(81)))
        self.assertEqual(self.registry.index, index)
        registration = self.registry.get("m")
        assert registration is not None
        self.assertEqual(registration.apis[0].status, PASSING)

    def test_update_keeps_status_of_unchanged_apis(self) -> None:
        """An update keeps the status of an API it did not change, resets one it did."""
        self.set_status(PASSING)
        self.call(
            "POST",
            "/publish",
            body("m", api_entry(80, TCP_CHECK), api_entry(81, TCP_CHECK)),
        )
        registration = self.registry.get("m")
        assert registration is not None
        self.assertEqual([a.status for a in registration.apis], [PASSING, UNKNOWN])
        self.call(
            "POST",
            "/publish",
            body("m", api_entry(90, TCP_CHECK), api_entry(81, TCP_CHECK)),
        )
        registration = self.registry.get("m")
        assert registration is not None
        self.assertEqual(registration.apis[0].status, UNKNOWN)

    def test_metadata_change_keeps_status(self) -> None:
        """An API published again with other metadata, same check and place, keeps its status."""
        self.set_status(PASSING)
        self.call(
            "POST",
            "/publish",
            body("m", api_entry(80, TCP_CHECK, metadata={"v": "2"}), api_entry(81)),
        )
        registration = self.registry.get("m")
        assert registration is not None
        self.assertEqual(registration.apis[0].status, PASSING)

    def test_results_for_a_module_being_expired_are_dropped(self) -> None:
        """
        A check result arriving while the store removes an expired module is
        dropped: the module goes, from memory and store alike.
        """
        self.registry.discover_heartbeat = False
        self.clock.advance(601)
        self.store.holding = True
        done = self.registry.expire()
        self.assertIsNone(self.set_status(PASSING))
        self.store.release()
        self.assertEqual([c.module_id for c in self.successResultOf(done)], ["m"])
        self.assertIsNone(self.registry.get("m"))
        self.assertEqual(self.successResultOf(self.store.load()), [])

    def test_republished_while_expiring_stays_and_expires_later(self) -> None:
        """A module published again during its expiry's write stays, and expires in its turn."""
        self.registry.discover_heartbeat = False
        self.clock.advance(601)
        self.store.holding = True
        done = self.registry.expire()
        republished = self.registry.publish(parse_publish_body(body("m", api_entry(99))))
        self.store.release()
        self.successResultOf(republished)
        # The expiry went first in the store and in memory; the publish
        # after it registered the module anew, in both.
        self.assertEqual([c.kind for c in self.successResultOf(done)], [ChangeKind.EXPIRED])
        self.assertEqual(self.changes[-1].kind, ChangeKind.PUBLISHED)
        self.assertIsNotNone(self.registry.get("m"))
        stored = self.successResultOf(self.store.load())
        self.assertEqual([r.registration.module_id for r in stored], ["m"])
        self.store.holding = False
        self.clock.advance(601)
        self.assertEqual([c.module_id for c in self.successResultOf(self.registry.expire())], ["m"])

    def test_statuses_are_unknown_after_a_restart(self) -> None:
        """A registry loading a stored registration starts its checked APIs unknown."""
        store = MemoryStore()
        first = Registry(store, self.clock)
        first.publish(parse_publish_body(body("m", api_entry(80, TCP_CHECK))))
        registration = first.get("m")
        assert registration is not None
        target = registration.apis[0].check_target()
        assert target is not None
        self.successResultOf(first.set_status("m", 0, target, PASSING))
        # An update after the status was found writes the status to the store too.
        first.publish(parse_publish_body(body("m", api_entry(80, TCP_CHECK), api_entry(82))))
        second = Registry(store, self.clock)
        self.successResultOf(second.load())
        loaded = second.get("m")
        assert loaded is not None
        self.assertEqual(loaded.apis[0].status, UNKNOWN)


class PassingFilterTests(_Fixture, SynchronousTestCase):
    def setUp(self) -> None:
        self.set_up()
        self.call(
            "POST",
            "/publish",
            body(
                "m",
                api_entry(80, TCP_CHECK),
                api_entry(81, HTTP_CHECK),
                api_entry(82),
                api_entry(83, TCP_CHECK, service="other"),
            ),
        )
        self.call("POST", "/publish", body("sick", api_entry(90, TCP_CHECK)))
        registration = self.registry.get("m")
        assert registration is not None
        checks = [api.check_target() for api in registration.apis]
        assert checks[0] is not None and checks[1] is not None
        self.successResultOf(self.registry.set_status("m", 0, checks[0], PASSING))
        self.successResultOf(self.registry.set_status("m", 1, checks[1], CRITICAL))

    def ports(self, apis: list[dict[str, Any]]) -> list[int]:
        return [api["serverPort"] for api in apis]

    def test_discover(self) -> None:
        """C{?passing=true}: passing and unchecked APIs only; without it, all."""
        _, everything = self.call("GET", "/discover/m")
        self.assertEqual(self.ports(everything["apis"]), [80, 81, 82, 83])
        for query in ("?passing=true", "?passing=", "?passing=1", "?passing=TRUE"):
            _, passing = self.call("GET", "/discover/m" + query)
            self.assertEqual(self.ports(passing["apis"]), [80, 82], query)
            self.assertEqual(passing["moduleID"], "m")
        _, passing = self.call("GET", "/discover/m?passing=false")
        self.assertEqual(self.ports(passing["apis"]), [80, 81, 82, 83])
        _, sick = self.call("GET", "/discover/sick?passing=true")
        self.assertEqual(sick, {"moduleID": "sick", "apis": []})

    def test_services(self) -> None:
        """C{?passing=true} on a service lookup drops failing APIs and providers left with none."""
        _, everything = self.call("GET", "/services/svc")
        self.assertEqual([p["moduleID"] for p in everything["providers"]], ["m", "sick"])
        _, passing = self.call("GET", "/services/svc?passing=true")
        self.assertEqual([p["moduleID"] for p in passing["providers"]], ["m"])
        self.assertEqual(self.ports(passing["providers"][0]["apis"]), [80, 82])

    def test_bad_passing(self) -> None:
        """
        A C{passing} that is not a boolean, or given twice, is a 400, at once
        even on a blocking query.
        """
        index = self.registry.index
        for query in ("?passing=maybe", "?passing=true&passing=false"):
            for path in (
                "/discover/m",
                "/services/svc",
                f"/services/svc?index={index}&wait=30s&",
                "/discover/ghost?wait=30s&",
            ):
                url = path + (query if "?" not in path else query[1:])
                code, answer = self.call("GET", url)
                self.assertEqual(code, 400, url)
                self.assertIn("passing", answer["error"])


class HealthCheckServiceTests(_Fixture, SynchronousTestCase):
    """The service wiring the scheduler to the registry, with a probe the test answers."""

    def setUp(self) -> None:
        self.set_up()
        self.probes: list[tuple[Target, Deferred[ProbeResult]]] = []

        def probe(target: Target) -> Deferred[ProbeResult]:
            d: Deferred[ProbeResult] = Deferred()
            self.probes.append((target, d))
            return d

        # 10.0.0.0/8 is granted to every identity here: checks reach only
        # loopback and the host's own addresses without a grant.
        self.targets = CheckTargets(
            self.clock, lambda principal: [ip_network("10.0.0.0/8")], local_addresses=lambda: ()
        )
        self.service = HealthCheckService(
            self.registry, self.clock, probe=probe, targets=self.targets
        )

    def test_checks_follow_the_registry(self) -> None:
        """Published checks are run, their results recorded; unpublish stops them."""
        self.call("POST", "/publish", body("early", api_entry(70, TCP_CHECK)))
        self.service.startService()
        self.call(
            "POST",
            "/publish",
            body("m", api_entry(80, TCP_CHECK, address="10.0.0.5"), api_entry(81)),
        )
        self.clock.advance(1)  # first checks within a second
        targets = sorted((t.module_id, t.host, t.port) for t, _ in self.probes)
        self.assertEqual(targets, [("early", "127.0.0.1", 70), ("m", "10.0.0.5", 80)])
        for target, d in self.probes:
            d.callback(ProbeResult(target.module_id == "m", "result"))
        statuses = {
            c.module_id: c.registration.apis[0].status
            for c in self.changes
            if c.kind is ChangeKind.STATUS
        }
        self.assertEqual(statuses, {"m": PASSING, "early": CRITICAL})
        self.probes.clear()
        self.call("DELETE", "/unpublish/m")
        self.clock.advance(10)
        self.assertEqual([t.module_id for t, _ in self.probes], ["early"])
        self.service.stopService()
        self.clock.advance(60)
        self.assertEqual(len(self.probes), 1)

    def test_update_without_checks_stops_them(self) -> None:
        """A module published again without checks is no longer checked."""
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.call("POST", "/publish", body("m", api_entry(80, TCP_CHECK)))
        self.call("POST", "/publish", body("m", api_entry(80)))
        self.clock.advance(30)
        self.assertEqual(self.probes, [])

    def test_targets_of(self) -> None:
        """Only checked APIs are targets, at their address or the registry's host."""
        request = parse_publish_body(
            body("m", api_entry(1), api_entry(2, HTTP_CHECK, address="db.local"))
        )
        self.successResultOf(self.registry.publish(request))
        registration = self.registry.get("m")
        assert registration is not None
        (target,) = targets_of(registration)
        self.assertEqual((target.api_index, target.host, target.port), (1, "db.local", 2))
        self.assertEqual(target.spec.path, "/healthz")


class _Status(Resource):
    """An HTTP health endpoint whose answer the test sets."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        return b"ok" if self.code == 200 else b"down"


class _Silent(Protocol):
    """Accepts a connection and never answers: a hung service."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]


class RealTargetTests(TestCase):
    """
    The daemon's health checking against real listeners on 127.0.0.1: the
    network is real, time is a L{task.Clock}, so no test waits for a timeout.
    """

    timeout = 20

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.registry = Registry(MemoryStore(), self.clock)
        self.service = HealthCheckService(self.registry, reactor, clock=self.clock)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.waiting: list[Deferred[Change]] = []
        self.registry.subscribe(self._changed)

    def _changed(self, change: Change) -> None:
        if change.kind is ChangeKind.STATUS and self.waiting:
            self.waiting.pop(0).callback(change)

    def next_status(self) -> Deferred[Change]:
        d: Deferred[Change] = Deferred()
        self.waiting.append(d)
        return d

    def publish(self, port: int, check: dict[str, Any]) -> None:
        self.successResultOf(
            self.registry.publish(parse_publish_body(body("m", api_entry(port, check))))
        )

    def status(self, change: Change) -> tuple[str | None, str]:
        api = change.registration.apis[0]
        return api.status, change.registration.module_id

    async def test_tcp_target_up_and_down(self) -> None:
        """A listening port passes; once it stops listening the next check is critical."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.publish(port.getHost().port, TCP_CHECK)
        changed = self.next_status()
        self.clock.advance(1)
        self.assertEqual(self.status(await changed), (PASSING, "m"))
        number = port.getHost().port
        await port.stopListening()
        held = held_port(self, number)
        changed = self.next_status()
        self.clock.advance(10)
        self.assertEqual(self.status(await changed), (CRITICAL, "m"))
        held.close()
        # Back up on the same port: passing again (unless another process
        # took the port meanwhile: then there is nothing more to see here).
        try:
            port = reactor.listenTCP(number, Factory.forProtocol(Protocol), interface="127.0.0.1")
        except CannotListenError:
            return
        self.addCleanup(port.stopListening)
        changed = self.next_status()
        self.clock.advance(10)
        self.assertEqual(self.status(await changed), (PASSING, "m"))

    async def test_http_target_up_and_down(self) -> None:
        """HTTP 200 passes, 503 is critical, 200 again passes."""
        health = _Status()
        port = reactor.listenTCP(0, Site(health), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.publish(port.getHost().port, HTTP_CHECK)
        changed = self.next_status()
        self.clock.advance(1)
        self.assertEqual(self.status(await changed), (PASSING, "m"))
        health.code = 503
        changed = self.next_status()
        self.clock.advance(10)
        self.assertEqual(self.status(await changed), (CRITICAL, "m"))
        health.code = 200
        changed = self.next_status()
        self.clock.advance(10)
        self.assertEqual(self.status(await changed), (PASSING, "m"))

    async def test_hung_target(self) -> None:
        """
        A target that accepts and never answers is critical after the check's
        timeout, its connection is closed, and checks do not pile up on it.
        """
        factory = Factory.forProtocol(_Silent)
        factory.connections = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.publish(port.getHost().port, HTTP_CHECK)
        self.clock.advance(1)
        while not factory.connections:  # type: ignore[attr-defined]
            await _turn()
        connection = factory.connections[0]  # type: ignore[attr-defined]
        lost: Deferred[None] = Deferred()
        connection.connectionLost = lambda reason: lost.callback(None)
        scheduler = self.service.scheduler
        assert scheduler is not None
        self.assertEqual(scheduler.in_flight, 1)
        changed = self.next_status()
        self.clock.advance(1)  # the timeout
        change = await changed
        self.assertEqual(self.status(change), (CRITICAL, "m"))
        await lost
        self.assertEqual((scheduler.in_flight, scheduler.queued), (0, 0))
        self.assertEqual(len(factory.connections), 1)  # type: ignore[attr-defined]


def _turn() -> Deferred[None]:
    """One trip through the real reactor."""
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d

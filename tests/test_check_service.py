"""
Tests for L{HealthCheckService} as the last line of issue 12's defences:
only the fixed vocabulary is published (the detail is logged), every target
is judged against its owner before it is checked (again on L{recheck}), a
name is resolved once and never by a probe, and the counts of checked APIs
per identity that L{CheckTargets.vet} needs follow the registry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from ipaddress import ip_network
from typing import Any

from twisted.internet import address as twisted_address
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hsu_registry.checks.limits import CheckLimitExceeded
from hsu_registry.checks.probes import OUTPUTS, ProbeResult, is_output
from hsu_registry.checks.scheduler import Target, network_probe
from hsu_registry.checks.service import HealthCheckService, targets_of
from hsu_registry.checks.spec import CheckSpec
from hsu_registry.checks.targets import CheckTargets
from hsu_registry.model import (
    CRITICAL,
    PASSING,
    UNKNOWN,
    ModuleAPI,
    PublishRequest,
    Registration,
    parse_publish_body,
)
from hsu_registry.registry import Registry
from hsu_registry.stores.memory import MemoryStore

NOW = 1_700_000_000.0
TCP = {"tcp": True, "interval": "10s", "timeout": "1s"}


def registration(module_id: str, owner: str, *apis: dict[str, Any]) -> Registration:
    body = json.dumps({"moduleID": module_id, "processID": 1, "apis": list(apis)}).encode()
    return Registration.create(module_id, 1, parse_publish_body(body).apis, NOW, owner=owner)


def api_entry(port: int, address: str | None = None, check: Any = TCP) -> dict[str, Any]:
    entry: dict[str, Any] = {"serviceIDs": ["s"], "serverPort": port, "protocol": "http"}
    if check is not None:
        entry["check"] = check
    if address is not None:
        entry["address"] = address
    return entry


class _Resolver:
    """A name resolver whose lookups the test completes by hand."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, Any]] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, *a: Any) -> Any:
        receiver.resolutionBegan(None)
        self.pending.append((hostName, receiver))
        return receiver

    def answer(self, index: int, *addresses: str) -> None:
        _, receiver = self.pending[index]
        for text in addresses:
            receiver.addressResolved(twisted_address.IPv4Address("TCP", text, 0))
        receiver.resolutionComplete()


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.memory = MemoryReactorClock()
        self.memory.advance(NOW)
        self.resolver = _Resolver()
        self.memory.installNameResolver(self.resolver)
        self.grants: dict[str, list[str]] = {"uid:1000": ["10.0.0.0/8"]}
        self.targets = CheckTargets(self.memory, self.extra, local_addresses=lambda: ())
        self.probes: list[Target] = []
        self.results: list[ProbeResult] = [ProbeResult(True, "connected")]

    def extra(self, principal: str) -> Sequence[Any]:
        return [ip_network(n) for n in self.grants.get(principal, [])]

    def probe(self, target: Target) -> Deferred[ProbeResult]:
        self.probes.append(target)
        return succeed(self.results[min(len(self.probes), len(self.results)) - 1])

    def start(self, *registrations: Registration) -> tuple[Registry, HealthCheckService]:
        store = MemoryStore()
        for r in registrations:
            store.save(r, NOW)
        registry = Registry(store, self.memory)
        self.successResultOf(registry.load())
        service = HealthCheckService(registry, self.memory, probe=self.probe, targets=self.targets)
        service.startService()
        self.addCleanup(service.stopService)
        return registry, service

    def outputs(self, registry: Registry, module_id: str) -> list[tuple[str | None, str | None]]:
        found = registry.get(module_id)
        assert found is not None
        return [(api.status, api.output) for api in found.apis]

    def test_onlyTheVocabularyIsPublished(self) -> None:
        """
        A probe's output outside the vocabulary (a banner, say) is published
        as C{error}; what it said is logged for the operator, with the
        detail, when the status changes.
        """
        self.results = [ProbeResult(False, "SSH-2.0-OpenSSH_9.2", "from a custom probe")]
        registry, _ = self.start(registration("m", "uid:1", api_entry(22)))
        with capturedLogs() as events:
            self.memory.advance(1)
        self.assertEqual(self.outputs(registry, "m"), [(CRITICAL, "error")])
        details = [e["detail"] for e in events if "detail" in e]
        self.assertEqual(details, ["'SSH-2.0-OpenSSH_9.2' from a custom probe"])

    def test_detailLoggedOnStatusChanges(self) -> None:
        """The detail is logged when the status changes, not at every check."""
        self.results = [ProbeResult(False, "bad response", "not an HTTP status line: 'x'")] * 3
        self.start(registration("m", "uid:1", api_entry(80)))
        with capturedLogs() as events:
            for _ in range(30):
                self.memory.advance(1)
        self.assertEqual(len(self.probes), 3)
        logged = [e for e in events if e.get("detail")]
        self.assertEqual(len(logged), 1)
        self.assertEqual(
            {k: logged[0][k] for k in ("module_id", "api_index", "address", "port", "output")},
            {
                "module_id": "m",
                "api_index": 0,
                "address": "127.0.0.1",
                "port": 80,
                "output": "bad response",
            },
        )

    def test_usageFollowsTheRegistry(self) -> None:
        """
        The service records each owner's checked APIs in the shared
        L{CheckTargets}, so that vet refuses a publish past the limit; an
        expired module's checks no longer count.
        """
        registry, _ = self.start(
            registration("a", "uid:1000", *[api_entry(p) for p in range(1, 201)][:128]),
            registration("b", "uid:1000", *[api_entry(p) for p in range(200, 300)]),
            registration("c", "uid:2000", api_entry(1), api_entry(2, check=None)),
        )
        usage = self.targets.usage
        self.assertEqual((usage.of("uid:1000"), usage.of("uid:2000")), (228, 1))
        many = PublishRequest(
            "d",
            1,
            tuple(
                ModuleAPI(("s",), p, "http", check=CheckSpec("tcp", None, 10.0, 1.0))
                for p in range(1, 30)
            ),
        )
        self.assertRaises(CheckLimitExceeded, self.targets.vet, many, "uid:1000")
        self.memory.advance(registry.expire_after + 1)
        self.successResultOf(registry.expire())
        self.assertEqual((usage.of("uid:1000"), usage.of("uid:2000")), (0, 0))
        self.assertIs(self.targets.vet(many, "uid:1000"), many)

    def test_recheckAfterTheGrantGoes(self) -> None:
        """
        A target allowed by a grant is checked; once the grant is gone,
        recheck() stops it: critical, "not allowed", never probed again.
        """
        registry, service = self.start(registration("m", "uid:1000", api_entry(80, "10.0.0.5")))
        self.memory.advance(1)
        self.assertEqual(self.outputs(registry, "m"), [(PASSING, "connected")])
        del self.grants["uid:1000"]
        service.recheck()
        self.memory.advance(0)
        self.assertEqual(self.outputs(registry, "m"), [(CRITICAL, "not allowed")])
        probed = len(self.probes)
        for _ in range(30):
            self.memory.advance(1)
        self.assertEqual(len(self.probes), probed)

    def test_namePinnedAtFollowKeptOnRecheck(self) -> None:
        """
        A name not pinned at publish is resolved once when the service
        takes the registration; recheck() keeps that address and asks no
        resolver again; the target connects to it.
        """
        _, service = self.start(registration("m", "uid:1000", api_entry(80, "db.internal")))
        self.assertEqual([name for name, _ in self.resolver.pending], ["db.internal"])
        self.assertEqual(self.probes, [])
        self.resolver.answer(0, "10.0.0.5")
        self.memory.advance(1)
        self.assertEqual([(t.host, t.ip) for t in self.probes], [("db.internal", "10.0.0.5")])
        service.recheck()
        self.assertEqual(len(self.resolver.pending), 1)
        scheduler = service.scheduler
        assert scheduler is not None
        self.assertEqual([t.ip for t in scheduler.targets("m")], ["10.0.0.5"])

    def test_nameThatDoesNotResolve(self) -> None:
        """A name that does not resolve (in time) is critical, "not allowed", never checked."""
        registry, _ = self.start(registration("m", "uid:1000", api_entry(80, "gone.internal")))
        self.memory.advance(self.targets.limits.resolve_timeout)
        self.memory.advance(0)
        self.assertEqual(self.outputs(registry, "m"), [(CRITICAL, "not allowed")])
        self.assertEqual(self.probes, [])

    def test_slowLookupOfAnOlderFollowIsIgnored(self) -> None:
        """
        A lookup still running when the registration is followed again
        does not overwrite what the newer follow decided.
        """
        _, service = self.start(registration("m", "uid:1000", api_entry(80, "db.internal")))
        service.recheck()  # nothing pinned yet: looked up again
        self.assertEqual(len(self.resolver.pending), 2)
        self.resolver.answer(1, "10.0.0.6")
        self.resolver.answer(0, "10.0.0.5")
        scheduler = service.scheduler
        assert scheduler is not None
        self.assertEqual([t.ip for t in scheduler.targets("m")], ["10.0.0.6"])

    def test_unknownStaysForChecksPastTheLimit(self) -> None:
        """
        Checks past the owner's limit (registrations stored before the
        limit) are not run, and the operator is told once per module.
        """
        with capturedLogs() as events:
            registry, service = self.start(
                registration("a", "uid:1", *[api_entry(p) for p in range(1, 129)]),
                registration("b", "uid:1", *[api_entry(p) for p in range(200, 328)]),
                registration("c", "uid:1", *[api_entry(p) for p in range(400, 410)]),
            )
        scheduler = service.scheduler
        assert scheduler is not None
        self.assertEqual(scheduler.scheduled, 256)
        warnings = [e for e in events if "limit" in e and "count" in e]
        self.assertEqual([(e["module_id"], e["count"]) for e in warnings], [("c", 10)])
        self.memory.advance(60)
        self.assertEqual({s for s, _ in self.outputs(registry, "c")}, {UNKNOWN})

    def test_pinFromTheModel(self) -> None:
        """
        Once the model keeps the pinned address (beside the check object in
        answers), the checker uses it without any lookup.
        """
        spec = CheckSpec("tcp", None, 10.0, 1.0).pinned("10.0.0.5")
        api = ModuleAPI(("s",), 80, "http", address="db.internal", check=spec)
        pinned = Registration.create("m", 1, (api,), NOW, owner="uid:1000")
        check = pinned.apis[0].check
        assert check is not None
        self.assertEqual(check.ip, "10.0.0.5")  # kept as checkAddress in the encoded answer
        (target,) = targets_of(pinned)
        self.assertEqual((target.host, target.ip), ("db.internal", "10.0.0.5"))
        self.start(pinned)
        self.memory.advance(1)
        self.assertEqual(self.resolver.pending, [])
        self.assertEqual([t.ip for t in self.probes], ["10.0.0.5"])


class VocabularyTests(SynchronousTestCase):
    def test_outputs(self) -> None:
        """The vocabulary: fixed words and HTTP with a three-digit status."""
        for word in ("connected", "refused", "timeout", "HTTP 503", "HTTP 200", "not allowed"):
            self.assertTrue(is_output(word), word)
        for text in ("HTTP 5030", "HTTP 50", "SSH-2.0-OpenSSH", "bad response: 'x'", ""):
            self.assertFalse(is_output(text), text)
        self.assertIn("unreachable", OUTPUTS)

    def test_networkProbeNeverResolves(self) -> None:
        """
        A target whose address is a name without a pinned address is
        critical, "not allowed": the probe neither resolves nor connects.
        """
        memory = MemoryReactorClock()
        resolver = _Resolver()
        memory.installNameResolver(resolver)
        probe = network_probe(memory, memory)
        spec = CheckSpec("tcp", None, 10.0, 1.0)
        result = self.successResultOf(probe(Target("m", 0, "db.internal", 80, spec)))
        self.assertEqual(result, ProbeResult(False, "not allowed"))
        self.assertEqual((resolver.pending, memory.tcpClients), ([], []))
        probe(Target("m", 0, "db.internal", 80, spec, "uid:1", "10.0.0.5")).cancel()
        self.assertEqual([(c[0], c[1]) for c in memory.tcpClients], [("10.0.0.5", 80)])
        self.assertEqual(resolver.pending, [])


class _Hosts(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[bytes | None] = []

    def render_GET(self, request: Any) -> bytes:
        self.hosts.append(request.getHeader(b"host"))
        return b"ok"


class PinnedHTTPTests(TestCase):
    timeout = 20

    async def test_hostHeaderNamesTheName(self) -> None:
        """
        An http check of a name pinned to an address connects to the
        address and still names the host in its C{Host} header.
        """
        resource = _Hosts()
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        probe = network_probe(reactor, Clock())
        spec = CheckSpec("http", "/h", 10.0, 5.0)
        target = Target("m", 0, "api.internal", number, spec, "uid:1", "127.0.0.1")
        self.assertEqual(await probe(target), ProbeResult(True, "HTTP 200"))
        self.assertEqual(resource.hosts, [b"api.internal:%d" % number])

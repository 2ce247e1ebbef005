"""
Tests for where health checks may go (issue 12): the strict reading of an
API's address (L{parse_address}), the judgement of an IP address
(L{refusal}), this host's own addresses from the kernel's tables
(L{host_addresses}), and L{CheckTargets.vet}, which the publish path runs:
synchronous when it can be, names resolved once (in memory here, on a
L{task.Clock}) and pinned, every refusal a 400 naming the API, and the
per-identity limit of checked APIs a 403.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

from attrs import evolve
from twisted.internet import address as twisted_address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from hsu_registry.checks.addresses import (
    Address,
    AddressRefused,
    Network,
    host_addresses,
    parse_address,
    refusal,
)
from hsu_registry.checks.limits import (
    DEFAULT_CHECK_LIMITS,
    MAX_CHECKED_APIS_PER_IDENTITY,
    CheckLimitExceeded,
    CheckLimits,
)
from hsu_registry.checks.spec import CheckSpec
from hsu_registry.checks.targets import CheckTargets, CheckUsage
from hsu_registry.errors import InvalidRequest
from hsu_registry.model import ModuleAPI, PublishRequest, parse_publish_body

TCP = CheckSpec("tcp", None, 10.0, 1.0)
HOST: list[Address] = [IPv4Address("192.0.2.2"), IPv6Address("fd00::2")]


def checked(address: str | None, port: int = 8080, check: CheckSpec | None = TCP) -> ModuleAPI:
    return ModuleAPI(
        service_ids=("svc",), server_port=port, protocol="http", address=address, check=check
    )


def request(*apis: ModuleAPI, module_id: str = "m") -> PublishRequest:
    return PublishRequest(module_id=module_id, process_id=1, apis=apis)


class FakeNames:
    """
    A name resolver answering from a table, in memory; names in C{held}
    never complete.  Records every name it is asked.
    """

    def __init__(self, answers: dict[str, list[str]], held: Sequence[str] = ()) -> None:
        self.answers = answers
        self.held = set(held)
        self.asked: list[str] = []

    def resolveHostName(
        self,
        receiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        if hostName in self.held:
            return receiver
        for text in self.answers.get(hostName, []):
            if ":" in text:
                receiver.addressResolved(twisted_address.IPv6Address("TCP", text, portNumber))
            else:
                receiver.addressResolved(twisted_address.IPv4Address("TCP", text, portNumber))
        receiver.resolutionComplete()
        return receiver


def grants(table: dict[str, list[str]]) -> Any:
    def extra(principal: str) -> Sequence[Network]:
        return [ip_network(text) for text in table.get(principal, [])]

    return extra


class AddressParsingTests(SynchronousTestCase):
    """L{parse_address}: canonical IP literals and host names only."""

    def test_literals(self) -> None:
        """Canonical literals are IP addresses; an IPv4-mapped one is its IPv4 address."""
        self.assertEqual(parse_address("127.0.0.1"), IPv4Address("127.0.0.1"))
        self.assertEqual(parse_address("::1"), IPv6Address("::1"))
        self.assertEqual(parse_address("0:0:0:0:0:0:0:1"), IPv6Address("::1"))
        self.assertEqual(parse_address("::ffff:169.254.169.254"), IPv4Address("169.254.169.254"))

    def test_names(self) -> None:
        """Names come back lower case, IDNA-encoded, without the root's dot."""
        self.assertEqual(parse_address("DB.Internal."), "db.internal")
        self.assertEqual(parse_address("localhost"), "localhost")
        self.assertEqual(parse_address("bücher.example"), "xn--bcher-kva.example")
        self.assertEqual(parse_address("_srv.example-1.com"), "_srv.example-1.com")

    def test_numericFormsRefused(self) -> None:
        """
        Every form the C library reads as an IPv4 address but that is not a
        dotted quad is refused, not resolved (issue 12: 2130706433 reached
        127.0.0.1).
        """
        for text in (
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "127.1",
            "127.0.1",
            "0177.0.0.1",
            "0177.1",
            "127.0.0.01",
            "127.0.0.1.",
            "1.2.3.4.5",
            "0x",
        ):
            with self.assertRaises(AddressRefused, msg=text) as caught:
                parse_address(text)
            self.assertIn("non-canonical numeric", caught.exception.reason, text)

    def test_malformed(self) -> None:
        """Brackets, zone indexes, bad labels and empty text are refused."""
        for text, fragment in (
            ("[::1]", "without brackets"),
            ("::g", "not a valid IPv6"),
            ("fe80::1%eth0", "zone index"),
            ("127.0.0.1%lo", "zone index"),
            ("a b", "valid host name"),
            ("a..b", "valid host name"),
            ("-a.example", "valid host name"),
            ("x" * 64 + ".example", "valid host name"),
            (".".join(["a" * 60] * 5), "valid host name"),
            ("", "is empty"),
        ):
            with self.assertRaises(AddressRefused, msg=text) as caught:
                parse_address(text)
            self.assertIn(fragment, caught.exception.reason, text)


class RefusalTests(SynchronousTestCase):
    """L{refusal}: which IP addresses a check of an identity may reach."""

    def judge(self, text: str, extra: Sequence[str] = (), own: Sequence[str] = ()) -> str | None:
        parsed = parse_address(text)
        assert not isinstance(parsed, str)
        return refusal(
            parsed,
            "uid:1000",
            frozenset(ip_address(a) for a in own),
            [ip_network(n) for n in extra],
        )

    def test_loopbackAndOwn(self) -> None:
        """Loopback (all of 127/8, ::1) and the host's own addresses are allowed."""
        for text in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            self.assertIsNone(self.judge(text), text)
        self.assertIsNone(self.judge("192.0.2.2", own=["192.0.2.2"]))
        self.assertIsNotNone(self.judge("192.0.2.3", own=["192.0.2.2"]))

    def test_neverAllowed(self) -> None:
        """
        Unspecified, this-network, multicast, link-local (metadata),
        broadcast, reserved and IPv4-embedding addresses are refused even
        inside a granted network.
        """
        everything = ["0.0.0.0/0", "::/0"]
        for text, fragment in (
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("0.1.2.3", "0.0.0.0/8"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("169.254.169.254", "link-local"),
            ("::ffff:169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("64:ff9b::a9fe:a9fe", "NAT64"),
            ("2002:a9fe:a9fe::1", "6to4"),
            ("2001::a9fe:a9fe", "Teredo"),
            ("::a9fe:a9fe", "IPv4-compatible"),
        ):
            reason = self.judge(text, extra=everything, own=[text])
            self.assertIsNotNone(reason, text)
            assert reason is not None
            self.assertIn(fragment, reason, text)

    def test_privateAndPublicNeedAGrant(self) -> None:
        """Private and public addresses are refused unless a granted network holds them."""
        for text, kind in (
            ("10.0.0.5", "private"),
            ("192.168.1.1", "private"),
            ("172.17.0.2", "private"),
            ("fd00::5", "private"),
            ("8.8.8.8", "public"),
            ("2606:4700::1111", "public"),
        ):
            reason = self.judge(text)
            assert reason is not None, text
            self.assertIn(f"is a {kind} address", reason)
            self.assertIn("uid:1000", reason)
            self.assertIsNone(self.judge(text, extra=["10.0.0.0/8", "0.0.0.0/0", "::/0"]), text)
        self.assertIsNotNone(self.judge("10.0.0.5", extra=["192.168.0.0/16", "::/0"]))


class HostAddressesTests(SynchronousTestCase):
    """L{host_addresses} reads the kernel's tables, without DNS."""

    FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 198.51.100.0/24 2 0 2
           |-- 198.51.100.0
              /24 link UNICAST
           |-- 198.51.100.7
              /32 host LOCAL
        |-- 198.51.100.255
           /32 link BROADCAST
Local:
  +-- 0.0.0.0/0 3 0 5
           |-- 198.51.100.7
              /32 host LOCAL
"""
    IF_INET6 = (
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
        "fd000000000000000000000000000002 04 40 00 82     eth0\n"
        "00000000000000000000000000000001 01 80 10 80       lo\n"
    )

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_tables(self) -> None:
        """The "/32 host LOCAL" leaves and every if_inet6 address, plus loopback."""
        found = host_addresses(self.write(self.FIB_TRIE), self.write(self.IF_INET6))
        self.assertEqual(
            found,
            {
                IPv4Address("127.0.0.1"),
                IPv4Address("198.51.100.7"),
                IPv6Address("::1"),
                IPv6Address("fd00::2"),
                IPv6Address("fe80::fc:ff:fe00:1"),
            },
        )

    def test_unreadable(self) -> None:
        """Without the tables, only loopback is the host's own; the operator is told."""
        with capturedLogs() as events:
            found = host_addresses(self.mktemp(), self.mktemp())
        self.assertEqual(found, {IPv4Address("127.0.0.1"), IPv6Address("::1")})
        self.assertEqual(len(events), 2)

    def test_thisHost(self) -> None:
        """On this machine: at least loopback, and whatever /proc lists."""
        found = host_addresses()
        self.assertIn(IPv4Address("127.0.0.1"), found)
        if os.path.exists("/proc/net/if_inet6"):
            self.assertIn(IPv6Address("::1"), found)


class VetTests(SynchronousTestCase):
    """L{CheckTargets.vet}, as the publish path calls it."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.names = FakeNames(
            {
                "db.internal": ["10.0.0.5"],
                "localhost": ["127.0.0.1", "::1"],
                "metadata.internal": ["169.254.169.254"],
                "split.internal": ["127.0.0.1", "169.254.169.254"],
                "nowhere.internal": [],
            },
            held=["slow.internal"],
        )
        self.reactor.installNameResolver(self.names)
        self.targets = CheckTargets(
            self.reactor,
            grants({"uid:1000": ["10.0.0.0/8"]}),
            local_addresses=lambda: HOST,
        )

    def refused(self, *apis: ModuleAPI, principal: str = "uid:1001") -> InvalidRequest:
        result: Any = None
        try:
            result = self.targets.vet(request(*apis), principal)
        except InvalidRequest as e:
            return e
        self.assertIsInstance(result, Deferred)
        return self.failureResultOf(result, InvalidRequest).value

    def test_noChecksIsSynchronousAndUnchanged(self) -> None:
        """A publish without checks gets its own request back, at once: no Deferred."""
        plain = request(checked("10.0.0.5", check=None), checked("metadata.internal", check=None))
        self.assertIs(self.targets.vet(plain, "anonymous"), plain)
        self.assertEqual(self.names.asked, [])

    def test_addressesAreSynchronous(self) -> None:
        """
        Checked APIs at IP addresses the identity may reach (or none: the
        registry's host) are vetted at once and left as they are.
        """
        ok = request(
            checked(None),
            checked("127.0.0.1"),
            checked("127.0.0.2"),
            checked("::1"),
            checked("192.0.2.2"),
            checked("fd00::2"),
            checked("10.9.8.7", check=None),
        )
        self.assertIs(self.targets.vet(ok, "uid:1001"), ok)
        granted = request(checked("10.0.0.5"))
        self.assertIs(self.targets.vet(granted, "uid:1000"), granted)

    def test_everyAttackAddressRefused(self) -> None:
        """
        Every address issue 12 tried is a 400 naming the API and why, and
        nothing is looked up.
        """
        cases = [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("2130706433", "non-canonical numeric"),
            ("0x7f.1", "non-canonical numeric"),
            ("127.1", "non-canonical numeric"),
            ("0177.0.0.1", "non-canonical numeric"),
            ("169.254.169.254", "link-local"),
            ("::ffff:169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("224.0.0.251", "multicast"),
            ("10.0.0.5", "is a private address, which health checks of uid:1001"),
            ("192.168.0.1", "private"),
            ("172.16.0.1", "private"),
            ("8.8.8.8", "is a public address"),
            ("[::1]", "brackets"),
        ]
        for address, fragment in cases:
            error = self.refused(checked("127.0.0.1"), checked(address))
            self.assertEqual(error.status, 400)
            self.assertTrue(
                error.message.startswith(f"apis[1].address {address!r} "), error.message
            )
            self.assertIn(fragment, error.message, address)
            self.assertEqual(error.context, {"moduleID": "m", "field": "apis[1].address"})
        self.assertEqual(self.names.asked, [])

    def test_grantsArePerIdentity(self) -> None:
        """A network granted to one identity is not another's; metadata is no one's."""
        self.assertIsNotNone(self.targets.vet(request(checked("10.1.2.3")), "uid:1000"))
        self.assertIn("uid:1001", self.refused(checked("10.1.2.3")).message)
        targets = CheckTargets(self.reactor, grants({"uid:0": ["0.0.0.0/0", "::/0"]}))
        with self.assertRaises(InvalidRequest):
            targets.vet(request(checked("169.254.169.254")), "uid:0")

    def test_nonCanonicalIPv6Pinned(self) -> None:
        """
        An IPv6 literal in another spelling keeps its published address and
        checks connect to the canonical one.
        """
        vetted = self.targets.vet(
            request(checked("0:0:0:0:0:0:0:1"), checked("::ffff:127.0.0.1"), checked("::1")),
            "uid:1001",
        )
        assert isinstance(vetted, PublishRequest)
        self.assertEqual(
            [(api.address, api.check and api.check.ip) for api in vetted.apis],
            [("0:0:0:0:0:0:0:1", "::1"), ("::ffff:127.0.0.1", "127.0.0.1"), ("::1", None)],
        )

    def test_namesResolvedOnceAndPinned(self) -> None:
        """
        A name is resolved once per publish (however many APIs name it) and
        the address it resolved to is pinned in each check; the published
        address stays the name.
        """
        d = self.targets.vet(
            request(checked("db.internal"), checked("DB.internal", port=9090), checked(None)),
            "uid:1000",
        )
        assert isinstance(d, Deferred)
        vetted = self.successResultOf(d)
        self.assertEqual(self.names.asked, ["db.internal"])
        self.assertEqual(
            [(api.address, api.check and api.check.ip) for api in vetted.apis],
            [("db.internal", "10.0.0.5"), ("DB.internal", "10.0.0.5"), (None, None)],
        )
        # The pin is not part of the check object answers show, nor of its identity.
        assert vetted.apis[0].check is not None
        self.assertEqual(vetted.apis[0].check.to_json(), TCP.to_json())
        self.assertEqual(vetted.apis[0].check, TCP)
        d = self.targets.vet(request(checked("localhost")), "uid:1001")
        assert isinstance(d, Deferred)
        localhost = self.successResultOf(d).apis[0].check
        self.assertEqual(localhost and localhost.ip, "127.0.0.1")

    def test_namesToRefusedAddresses(self) -> None:
        """
        A name resolving to an address a check may not reach (any one of
        its addresses), or to none, is a 400 naming the API.
        """
        for name, fragment in (
            ("metadata.internal", "resolves to 169.254.169.254, which is link-local"),
            ("split.internal", "resolves to 169.254.169.254"),
            ("db.internal", "resolves to 10.0.0.5, which is a private address"),
            ("nowhere.internal", "does not resolve to any address"),
        ):
            error = self.refused(checked(None), checked("127.0.0.1"), checked(name))
            self.assertEqual(error.status, 400)
            self.assertTrue(error.message.startswith(f"apis[2].address {name!r} "), error.message)
            self.assertIn(fragment, error.message)

    def test_resolutionTimesOut(self) -> None:
        """
        A lookup that never completes refuses the publish after the limit's
        timeout (on the clock): the publish is never left hanging.
        """
        d = self.targets.vet(request(checked("slow.internal")), "uid:1000")
        assert isinstance(d, Deferred)
        self.reactor.advance(DEFAULT_CHECK_LIMITS.resolve_timeout - 0.001)
        self.assertNoResult(d)
        self.reactor.advance(0.001)
        error = self.failureResultOf(d, InvalidRequest).value
        self.assertIn("did not resolve within 5s", error.message)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noResolverNoName(self) -> None:
        """Without a name resolver (a bare clock), names are refused, not looked up."""
        targets = CheckTargets(object(), local_addresses=lambda: ())
        d = targets.vet(request(checked("db.internal")), "uid:1000")
        assert isinstance(d, Deferred)
        self.assertIn("cannot be resolved", self.failureResultOf(d, InvalidRequest).value.message)

    def test_namesPerPublishBounded(self) -> None:
        """One publish may ask for at most max_names lookups."""
        targets = CheckTargets(self.reactor, limits=CheckLimits(max_names=1))
        with self.assertRaises(InvalidRequest) as caught:
            targets.vet(request(checked("localhost"), checked("db.internal")), "uid:1000")
        self.assertIn("at most 1 names", caught.exception.message)
        self.assertEqual(self.names.asked, [])

    def test_publishBodyCannotPin(self) -> None:
        """A publisher cannot choose the address its check connects to: no such key."""
        body = {
            "moduleID": "m",
            "apis": [
                {
                    "serviceIDs": ["s"],
                    "serverPort": 80,
                    "protocol": "http",
                    "address": "db.internal",
                    "check": {"tcp": True, "ip": "169.254.169.254"},
                }
            ],
        }
        with self.assertRaises(InvalidRequest) as caught:
            parse_publish_body(json.dumps(body).encode())
        self.assertIn("unknown key 'ip'", caught.exception.message)

    def test_checkedAPIsPerIdentityBounded(self) -> None:
        """
        An identity may have at most max_checked_apis checked APIs over all
        its modules: past it a publish is a 403 naming the limit.  The
        module's own current checks, being replaced, do not count, nor do
        other identities'.
        """
        limit = MAX_CHECKED_APIS_PER_IDENTITY
        self.assertEqual(limit, 256)
        usage = self.targets.usage
        usage.set("other", "uid:1000", limit - 6)
        usage.set("m", "uid:1000", 3)
        usage.set("theirs", "uid:2000", limit)
        six = request(*[checked(None, port=p) for p in range(1, 7)])
        self.assertIs(self.targets.vet(six, "uid:1000"), six)
        seven = request(*[checked(None, port=p) for p in range(1, 8)])
        with self.assertRaises(CheckLimitExceeded) as caught:
            self.targets.vet(seven, "uid:1000")
        error = caught.exception
        self.assertEqual(error.status, 403)
        self.assertIn("at most 256 APIs with health checks", error.message)
        self.assertEqual(
            error.context,
            {"moduleID": "m", "limit": "checkedAPIsPerIdentity", "max": 256, "requested": 257},
        )
        # Unchecked APIs do not count.
        plain = request(*[checked(None, port=p, check=None) for p in range(1, 100)])
        self.assertIs(self.targets.vet(plain, "uid:1000"), plain)
        everything = request(*[checked(None, port=p) for p in range(1, 7)], module_id="other")
        self.assertIsNotNone(self.targets.vet(everything, "uid:1000"))

    def test_refresh(self) -> None:
        """refresh() reads the host's addresses again: vet sees the new ones."""
        addresses = [IPv4Address("198.51.100.7")]
        targets = CheckTargets(self.reactor, local_addresses=lambda: addresses)
        targets.vet(request(checked("198.51.100.7")), "uid:1")
        addresses[:] = [IPv4Address("198.51.100.8")]
        with capturedLogs() as events:
            self.assertEqual(targets.refresh(), {IPv4Address("198.51.100.8")})
        self.assertEqual(len(events), 1)
        with self.assertRaises(InvalidRequest):
            targets.vet(request(checked("198.51.100.7")), "uid:1")
        targets.vet(request(checked("198.51.100.8")), "uid:1")


class UsageTests(SynchronousTestCase):
    """L{CheckUsage} counts checked APIs per identity, module by module."""

    def test_counts(self) -> None:
        usage = CheckUsage()
        usage.set("a", "uid:1", 3)
        usage.set("b", "uid:1", 4)
        usage.set("c", "uid:2", 5)
        self.assertEqual((usage.of("uid:1"), usage.of("uid:2"), usage.of("x")), (7, 5, 0))
        self.assertEqual(usage.others("uid:1", "a"), 4)
        self.assertEqual(usage.others("uid:2", "a"), 5)
        usage.set("a", "uid:2", 1)  # another owner now
        self.assertEqual((usage.of("uid:1"), usage.of("uid:2")), (4, 6))
        usage.set("b", "uid:1", 0)
        usage.discard("c")
        usage.discard("nothing")
        self.assertEqual((usage.of("uid:1"), usage.of("uid:2")), (0, 1))


class CheckSpecPinTests(SynchronousTestCase):
    """The pinned address rides beside the check object, never in it."""

    def test_pin(self) -> None:
        pinned = TCP.pinned("10.0.0.5")
        self.assertEqual((pinned.ip, pinned), ("10.0.0.5", TCP))
        self.assertIs(TCP.pinned(None), TCP)
        self.assertNotIn("ip", pinned.to_json())
        self.assertEqual(CheckSpec.from_json(pinned.to_json(), ip="10.0.0.5").ip, "10.0.0.5")
        self.assertIsNone(CheckSpec.from_json(pinned.to_json()).ip)
        self.assertIsNone(CheckSpec.from_json(pinned.to_json(), ip="").ip)
        self.assertEqual(evolve(pinned, ip=None), pinned)

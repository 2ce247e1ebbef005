"""
Tests for L{hsu_registry.web.connections}: the limits derived from the
open-file limit, the peer of a connection (uid or address), admission to the
general pool, the operator's reserve and the health lane, the rate-limited log
of refusals, the options, and, with real sockets and a real daemon, issue 13's
first attack row: one uid's slow connections no longer take every descriptor
(L{DescriptorTests}).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import struct
import sys
import textwrap
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hsu_registry.config import RegistryConfig
from hsu_registry.options import Options
from hsu_registry.service import makeService
from hsu_registry.web.connections import (
    FILE_MARGIN,
    UNIDENTIFIED,
    ConnectionLimiter,
    ConnectionLimits,
    Peer,
    RateLimitedLog,
    Slot,
    derive_connection_limits,
    open_file_limit,
    peer_of,
)
from hsu_registry.web.deadlines import Deadlines

from .helpers import publish_body
from .test_deadlines import HEALTH, Client, ClosingTransport, SiteCase, post
from .test_e2e import HSU_REGISTRY, UNIX_LISTENING, E2ETestCase, _text

SETPRIV = shutil.which("setpriv")
PRLIMIT = shutil.which("prlimit")


class DerivedLimitsTests(SynchronousTestCase):
    def test_from_the_open_file_limit(self) -> None:
        """
        Half the open-file limit is left to pidfds, then the health checks and
        a margin; a sixteenth of the rest (4 to 64) is the reserve, the rest
        the total, a quarter of it the per-peer limit.
        """
        for file_limit, expected in [
            (1024, (390, 97, 26)),
            (20_000, (9840, 2460, 64)),
            (65_536, (32_608, 8152, 64)),
            (256, (28, 7, 4)),
        ]:
            limits = derive_connection_limits(check_concurrency=32, file_limit=file_limit)
            self.assertEqual(
                (limits.max_connections, limits.max_per_peer, limits.reserved), expected
            )
            self.assertEqual(
                limits.max_connections + limits.reserved,
                file_limit - file_limit // 2 - 32 - FILE_MARGIN,
            )
            self.assertFalse(limits.overcommitted())

    def test_without_process_binding(self) -> None:
        """Without process-bound registrations no pidfd is set aside."""
        limits = derive_connection_limits(check_concurrency=32, process_binding=False)
        self.assertEqual(limits.descriptors, open_file_limit() - 32 - FILE_MARGIN)

    def test_more_checks_fewer_connections(self) -> None:
        """Every health check in flight may hold a descriptor: they are set aside."""
        few = derive_connection_limits(check_concurrency=32, file_limit=4096)
        many = derive_connection_limits(check_concurrency=1032, file_limit=4096)
        self.assertEqual(few.descriptors - many.descriptors, 1000)

    def test_given_values_are_kept(self) -> None:
        """Values given are kept; the others are derived; too high is overcommitted."""
        limits = derive_connection_limits(
            max_connections=5000, reserved=0, check_concurrency=32, file_limit=1024
        )
        self.assertEqual((limits.max_connections, limits.max_per_peer), (5000, 1250))
        self.assertEqual(limits.reserved, 0)
        self.assertTrue(limits.overcommitted())

    def test_tiny_limit(self) -> None:
        """An open-file limit too small for the rest still admits a few connections."""
        limits = derive_connection_limits(file_limit=64)
        self.assertGreaterEqual(limits.max_connections, 4)

    def test_open_file_limit(self) -> None:
        self.assertEqual(open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class _Handle:
    """A transport's socket as far as identification goes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        return self.sock

    def getPeer(self) -> Any:
        peer = self.sock.getpeername()
        if self.sock.family == socket.AF_UNIX:
            return UNIXAddress(None)
        if self.sock.family == socket.AF_INET6:
            return IPv6Address("TCP", peer[0], peer[1])
        return IPv4Address("TCP", peer[0], peer[1])


class PeerTests(SynchronousTestCase):
    def pair(self, family: int, address: Any) -> socket.socket:
        server = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(server.close)
        server.bind(address)
        server.listen(1)
        client = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect(server.getsockname())
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        return accepted

    def test_unix_peer_is_its_uid(self) -> None:
        """A unix-socket peer is its uid (SO_PEERCRED), privileged when listed."""
        directory = self.mktemp()
        os.makedirs(directory)
        accepted = self.pair(socket.AF_UNIX, os.path.join(directory, "s"))
        peer, identity = peer_of(_Handle(accepted), frozenset({os.geteuid()}))
        self.assertEqual(peer, Peer(f"uid:{os.geteuid()}", privileged=True, local=True))
        self.assertIsNotNone(identity)
        assert identity is not None
        self.assertEqual((identity.uid, identity.pid), (os.geteuid(), os.getpid()))
        self.assertEqual(peer_of(_Handle(accepted), frozenset())[0].privileged, False)

    def test_loopback_tcp_peer_is_its_uid(self) -> None:
        """A loopback TCP peer is its uid too (sock_diag): the same peer as over unix."""
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            accepted = self.pair(family, (host, 0))
            peer, identity = peer_of(_Handle(accepted), frozenset())
            self.assertEqual(peer, Peer(f"uid:{os.geteuid()}", local=True))
            assert identity is not None
            self.assertEqual(identity.uid, os.geteuid())
            # Not asked: the peer is left unidentified.
            peer, identity = peer_of(_Handle(accepted), frozenset(), identify_loopback=False)
            self.assertEqual((peer, identity), (Peer(UNIDENTIFIED, local=True), None))
            self.assertTrue(peer.unidentified)

    def test_remote_peer_is_its_address(self) -> None:
        """
        A remote peer is its address, an IPv6 one its /64, an IPv4-mapped one
        its IPv4 address; the kernel is not asked for a uid.
        """
        for address, key in [
            (IPv4Address("TCP", "192.0.2.7", 1), "ip:192.0.2.7"),
            (IPv6Address("TCP", "2001:db8:1:2:3:4:5:6", 1), "net:2001:db8:1:2::/64"),
            (IPv6Address("TCP", "2001:db8:1:2::9%eth0", 1), "net:2001:db8:1:2::/64"),
            (IPv6Address("TCP", "::ffff:192.0.2.8", 1), "ip:192.0.2.8"),
        ]:
            peer, identity = peer_of(ClosingTransport(address), frozenset({0}))
            self.assertEqual((peer, identity), (Peer(key), None))

    def test_unknown_unix_peer(self) -> None:
        """A unix peer whose credentials cannot be read is one peer, unprivileged."""
        transport = ClosingTransport(UNIXAddress(None))
        self.assertEqual(peer_of(transport, frozenset({0}))[0], Peer("unix:unknown", local=True))


class LimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.warned: list[tuple[str, dict[str, Any]]] = []
        self.limiter = ConnectionLimiter(
            ConnectionLimits(max_connections=4, max_per_peer=2, reserved=4),
            lambda key, format, **fields: self.warned.append((key, fields)),
        )

    def test_per_peer(self) -> None:
        """A peer past its limit is refused; a privileged one is not limited per peer."""
        a, root = Peer("uid:1000"), Peer("uid:0", privileged=True)
        self.assertEqual([self.limiter.admit(a) for _ in range(3)][2], Slot.OVER_PEER_LIMIT)
        self.assertEqual([self.limiter.admit(root) for _ in range(2)], [Slot.GENERAL] * 2)
        self.assertEqual(self.limiter.count_of(root), 2)
        self.assertEqual(self.limiter.refused_per_peer, 1)
        self.assertEqual(self.warned, [("per-peer", {"limit": 2, "peer": "uid:1000"})])

    def test_reserve_and_health_lane(self) -> None:
        """
        Past the total, root and the registry's uid use the reserve; another
        peer holding no connection gets a health-only slot, from half of it.
        """
        for n in range(4):
            self.assertEqual(self.limiter.admit(Peer(f"ip:10.0.0.{n}")), Slot.GENERAL)
        self.assertEqual(self.limiter.admit(Peer("ip:10.0.0.0")), Slot.OVER_TOTAL_LIMIT)
        self.assertEqual(self.limiter.admit(Peer("uid:1")), Slot.HEALTH)
        self.assertEqual(self.limiter.admit(Peer("uid:1")), Slot.OVER_TOTAL_LIMIT)
        self.assertEqual(self.limiter.admit(Peer("uid:2")), Slot.HEALTH)
        self.assertEqual(self.limiter.admit(Peer("uid:3")), Slot.OVER_TOTAL_LIMIT)
        root = Peer("uid:0", privileged=True)
        self.assertEqual([self.limiter.admit(root) for _ in range(3)][:2], [Slot.RESERVED] * 2)
        self.assertEqual(self.limiter.open, 8)
        self.assertEqual((self.limiter.admitted_health, self.limiter.admitted_reserved), (2, 2))
        self.assertEqual(self.limiter.refused_total, 4)
        self.limiter.release(Peer("uid:1"), Slot.HEALTH)
        self.assertEqual(self.limiter.admit(root), Slot.RESERVED)

    def test_uids_matter_from_the_per_peer_limit(self) -> None:
        """
        Uids can matter once as many local connections are open as one peer
        may hold, or when only the reserve is left; an unidentified peer is
        counted, but not limited as one peer.
        """
        unidentified = Peer(UNIDENTIFIED, local=True)
        self.assertFalse(self.limiter.needs_uid())
        self.assertEqual(self.limiter.admit(unidentified), Slot.GENERAL)
        self.assertTrue(self.limiter.needs_uid())  # 1 + 1 >= 2 per peer
        self.assertEqual(self.limiter.admit(unidentified), Slot.GENERAL)
        self.assertEqual(self.limiter.admit(unidentified), Slot.GENERAL)
        self.assertEqual((self.limiter.local, self.limiter.count_of(unidentified)), (3, 3))
        uid = Peer("uid:1000", local=True)
        self.limiter.identified(unidentified, uid)
        self.assertEqual((self.limiter.count_of(unidentified), self.limiter.count_of(uid)), (2, 1))
        self.limiter.release(uid, Slot.GENERAL)
        self.assertEqual((self.limiter.local, self.limiter.open, self.limiter.peers), (2, 2, 1))
        remote = ConnectionLimiter(ConnectionLimits(max_connections=2, max_per_peer=5, reserved=0))
        remote.admit(Peer("ip:192.0.2.1"))
        self.assertFalse(remote.needs_uid())
        remote.admit(Peer("ip:192.0.2.2"))
        self.assertTrue(remote.needs_uid())  # full: only the reserve is left

    def test_release(self) -> None:
        """Released slots are admitted again; peers holding nothing are forgotten."""
        peers = [Peer(f"ip:10.0.0.{n}") for n in range(4)]
        slots = [self.limiter.admit(peer) for peer in peers]
        for peer, slot in zip(peers, slots, strict=True):
            self.limiter.release(peer, slot)
        self.assertEqual((self.limiter.open, self.limiter.peers, self.limiter.peak), (0, 0, 4))
        self.assertEqual(self.limiter.admit(peers[0]), Slot.GENERAL)
        self.limiter.release(peers[0], Slot.OVER_PEER_LIMIT)  # never admitted: no-op
        self.assertEqual(self.limiter.open, 1)
        self.assertEqual(self.limiter.stats()["connections_accepted"], 5)


class RateLimitedLogTests(SynchronousTestCase):
    def test_one_line_per_interval(self) -> None:
        """The first event is logged at once, the rest of the interval in one line with a count."""
        clock = Clock()
        log = RateLimitedLog(Logger(), clock, interval=10)
        with capturedLogs() as events:
            for n in range(100):
                log.warn("k", "{count} things, the latest {n}", n=n)
                clock.advance(0.05)
            log.warn("other", "{count} other")
            clock.advance(10)
            clock.advance(10)
        lines = [(e["limit_key"], e["count"], e.get("n")) for e in events]
        self.assertEqual(lines, [("k", 1, 0), ("other", 1, None), ("k", 99, 99)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_flushes(self) -> None:
        """Stopping logs the counts pending."""
        clock = Clock()
        log = RateLimitedLog(Logger(), clock, interval=10)
        with capturedLogs() as events:
            for _ in range(3):
                log.warn("k", "{count}")
            log.stop()
        self.assertEqual([e["count"] for e in events], [1, 2])
        self.assertEqual(clock.getDelayedCalls(), [])


class _UnixHandle:
    """A unix socket whose SO_PEERCRED names C{uid}."""

    family = socket.AF_UNIX

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return struct.pack("3i", 4242, self.uid, self.uid)


class UnixTransport(ClosingTransport):
    """An in-memory unix-socket connection from C{uid}."""

    def __init__(self, uid: int) -> None:
        super().__init__(UNIXAddress(None))
        self.handle = _UnixHandle(uid)

    def getHandle(self) -> Any:
        return self.handle


class LoopbackTransport(ClosingTransport):
    """An in-memory connection over a real loopback TCP socket (the kernel knows its uid)."""

    def __init__(self, case: SynchronousTestCase, server: socket.socket) -> None:
        client = socket.create_connection(server.getsockname())
        accepted, address = server.accept()
        case.addCleanup(client.close)
        case.addCleanup(accepted.close)
        super().__init__(IPv4Address("TCP", address[0], address[1]))
        self.sock = accepted

    def getHandle(self) -> socket.socket:
        return self.sock


class LazyIdentificationTests(SiteCase):
    """Loopback TCP connections are identified only once their uid can matter."""

    limits = ConnectionLimits(max_connections=100, max_per_peer=3, reserved=4)

    def setUp(self) -> None:
        super().setUp()
        self.server = socket.socket()
        self.addCleanup(self.server.close)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(10)

    def loopback(self) -> Client:
        transport = LoopbackTransport(self, self.server)
        return Client(self.site, transport.getPeer(), transport)

    def test_identified_at_the_per_peer_limit(self) -> None:
        """
        Below the per-peer limit, loopback TCP connections are admitted
        without asking the kernel; reaching it, all of them are identified,
        and the one past it is refused.
        """
        uid = f"uid:{os.geteuid()}"
        first, second = self.loopback(), self.loopback()
        self.assertEqual([c.channel._peer.key for c in (first, second)], [UNIDENTIFIED] * 2)
        self.assertFalse(hasattr(first.channel, "hsu_identity"))
        third = self.loopback()
        self.assertEqual([c.channel._peer.key for c in (first, second, third)], [uid] * 3)
        self.assertEqual(first.channel.hsu_identity.uid, os.geteuid())
        self.assertEqual(self.site.unidentified, set())
        fourth = self.loopback()
        self.assertEqual(fourth.error()[0], 429)
        self.assertEqual(self.site.connections.count_of(third.channel._peer), 3)
        third.transport.loseConnection()
        self.assertEqual(self.site.connections.stats()["connections_local"], 2)

    def test_identified_for_a_body(self) -> None:
        """A connection that sends a body is identified first (the API needs its owner)."""
        client = self.loopback()
        self.assertTrue(client.channel._peer.unidentified)
        client.send(post(publish_body("lazy")))
        self.assertEqual(client.last()[0], 200)
        self.assertEqual(client.channel._peer.key, f"uid:{os.geteuid()}")
        entry = self.registry.get("lazy")
        assert entry is not None
        self.assertEqual(entry.owner, f"uid:{os.geteuid()}")

    def test_discover_needs_no_uid(self) -> None:
        """A discover over a new loopback connection never asks the kernel."""
        client = self.loopback()
        client.send(HEALTH)
        client.send(b"GET /api/v1/discover/x HTTP/1.1\r\nHost: r\r\n\r\n")
        self.assertEqual([r[0] for r in client.responses()], [200, 404])
        self.assertTrue(client.channel._peer.unidentified)


class SiteLimitTests(SiteCase):
    """The site admits, refuses and answers per its connection limits."""

    limits = ConnectionLimits(max_connections=6, max_per_peer=3, reserved=4)

    def setUp(self) -> None:
        super().setUp()
        self.site.privileged = frozenset({0})

    def unix(self, uid: int) -> Client:
        return Client(self.site, UNIXAddress(None), UnixTransport(uid))

    def test_per_peer_refusal(self) -> None:
        """
        A peer's connection past its limit is answered a JSON 429 at once
        (Retry-After, Connection: close) and closed; the same uid over the
        unix socket and loopback TCP is one peer.
        """
        held = [self.unix(1000) for _ in range(3)]
        late = self.unix(1000)
        self.assertTrue(late.closed)
        status, error = late.error()
        self.assertEqual(status, 429)
        self.assertEqual(error["context"], {"maxConnectionsPerPeer": 3})
        self.assertEqual(late.last()[1][b"retry-after"], b"1")
        self.assertEqual(late.last()[1][b"connection"], b"close")
        self.assertEqual(self.site.connections.refused_per_peer, 1)
        # Whatever the refused client sends is ignored.
        late.channel.dataReceived(HEALTH)
        self.assertEqual(len(late.responses()), 1)
        # Another uid is served; one of the holders is served too.
        other = self.unix(1001)
        other.send(HEALTH)
        self.assertEqual(other.last()[0], 200)
        held[0].send(HEALTH)
        self.assertEqual(held[0].last()[0], 200)

    def test_identity_is_kept_for_the_api(self) -> None:
        """The kernel's word on the peer, read at connect, is what the API uses."""
        client = self.unix(1000)
        self.assertEqual(client.channel.hsu_identity.principal, "uid:1000")
        client.send(post(publish_body("mine")))
        self.assertEqual(client.last()[0], 200)
        entry = self.registry.get("mine")
        assert entry is not None
        self.assertEqual(entry.owner, "uid:1000")

    def test_total_reserve_and_health(self) -> None:
        """
        With every general slot taken, root is still served (the reserve);
        another uid holding nothing gets its health answered (Connection:
        close) but nothing else; past that, a JSON 503.
        """
        holders = [self.unix(uid) for uid in (1, 1, 1, 2, 2, 2)]
        self.assertEqual(self.site.connections.open, 6)
        monitor = self.unix(3)
        monitor.send(HEALTH)
        status, headers, body = monitor.last()
        self.assertEqual((status, headers[b"connection"]), (200, b"close"))
        self.assertEqual(json.loads(body)["status"], "healthy")
        self.assertTrue(monitor.closed)
        nosy = self.unix(3)
        nosy.send(b"GET /api/v1/modules HTTP/1.1\r\nHost: r\r\n\r\n")
        status, error = nosy.error()
        self.assertEqual(status, 503)
        self.assertIn("may only ask GET /api/v1/health", error["error"])
        # A holder cannot take a health slot: it already holds connections.
        crowd = self.unix(1)
        self.assertEqual(crowd.error()[0], 429)
        root = [self.unix(0) for _ in range(2)]
        for client in root:
            client.send(post(publish_body("ops")))
            self.assertEqual(client.last()[0], 200)
        self.assertEqual(self.site.connections.admitted_reserved, 2)
        # A health-only connection changes nothing, even a request without a body.
        for _ in range(2):
            rogue = self.unix(4)
            rogue.send(b"DELETE /api/v1/unpublish/ops HTTP/1.1\r\nHost: r\r\n\r\n")
            self.assertEqual(rogue.error()[0], 503)
        self.assertIsNotNone(self.registry.get("ops"))
        # The lane and the reserve share the 4 slots: half at most for the lane.
        lane = [self.unix(uid) for uid in (10, 11, 12)]
        self.assertEqual([c.closed for c in lane], [False, False, True])
        self.assertEqual(lane[2].error()[0], 503)
        self.assertEqual(self.site.stats()["connections_open"], 10)
        for holder in holders:
            holder.transport.loseConnection()
        self.assertEqual(self.site.connections.open, 4)

    def test_health_slot_must_ask_at_once(self) -> None:
        """A health-only connection that does not ask within a second is closed."""
        for uid in (1, 1, 1, 2, 2, 2):
            self.unix(uid)
        quiet = self.unix(5)
        self.clock.advance(1)
        self.assertTrue(quiet.closed)
        self.assertEqual(self.site.connections.health, 0)

    def test_refusals_logged_once_per_interval(self) -> None:
        """Thousands of refusals make one log line per limit every 10 s, with their count."""
        for _ in range(3):
            self.unix(1000)
        with capturedLogs() as events:
            for _ in range(1000):
                self.unix(1000)
            self.clock.advance(10)
        lines = [e for e in events if e.get("limit_key") == "per-peer"]
        self.assertEqual(
            [(e["count"], e["peer"]) for e in lines], [(1, "uid:1000"), (999, "uid:1000")]
        )
        self.assertEqual(self.site.connections.refused_per_peer, 1000)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> RegistryConfig:
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_defaults(self) -> None:
        """Connection limits are derived unless given; the deadlines and budget have defaults."""
        config = self.parse()
        self.assertEqual(
            (config.max_connections, config.max_connections_per_peer, config.reserved_connections),
            (None, None, None),
        )
        self.assertEqual(
            (config.header_timeout, config.idle_timeout, config.min_body_rate, config.body_grace),
            (10.0, 60.0, 1024, 10.0),
        )
        self.assertEqual(config.max_body_memory, 64 * 1024 * 1024)

    def test_given(self) -> None:
        config = self.parse(
            "--max-connections=500",
            "--max-connections-per-peer=50",
            "--reserved-connections=0",
            "--header-timeout=2.5s",
            "--idle-timeout=5m",
            "--min-body-rate=4096",
            "--body-grace=1m",
            "--max-body-memory=2097152",
        )
        self.assertEqual(
            (config.max_connections, config.max_connections_per_peer, config.reserved_connections),
            (500, 50, 0),
        )
        self.assertEqual(
            (config.header_timeout, config.idle_timeout, config.min_body_rate, config.body_grace),
            (2.5, 300.0, 4096, 60.0),
        )
        self.assertEqual(config.max_body_memory, 2 * 1024 * 1024)

    def test_bad_values(self) -> None:
        """Bad values are usage errors naming the option."""
        for argv, flag in [
            (["--max-connections=0"], "--max-connections"),
            (["--max-connections-per-peer=many"], "--max-connections-per-peer"),
            (["--reserved-connections=-1"], "--reserved-connections"),
            (["--header-timeout=0s"], "--header-timeout"),
            (["--idle-timeout=soon"], "--idle-timeout"),
            (["--min-body-rate=0"], "--min-body-rate"),
            (["--body-grace=-1s"], "--body-grace"),
            (["--max-body-memory=1000"], "--max-body-memory"),
        ]:
            error = self.assertRaises(UsageError, self.parse, *argv)
            self.assertIn(flag, str(error))

    def test_wiring(self) -> None:
        """The daemon's site gets its limits (room left for pidfds), deadlines and budget."""
        config = self.parse("--endpoint=tcp:0:interface=127.0.0.1", "--header-timeout=3s")
        service = makeService(config, Clock())
        site = service.site
        self.assertEqual(
            site.connection_limits,
            derive_connection_limits(
                check_concurrency=32, process_binding=service.processes is not None
            ),
        )
        self.assertEqual(site.deadlines, Deadlines(header_timeout=3.0))
        self.assertEqual(site.bodies.capacity, 64 * 1024 * 1024)
        self.assertEqual(site.bodies.peer_share, 16 * 1024 * 1024)
        config = self.parse("--max-connections=100", "--max-connections-per-peer=10")
        limits = makeService(config, Clock()).site.connection_limits
        self.assertEqual((limits.max_connections, limits.max_per_peer), (100, 10))


def _as(uid: int, *argv: str) -> list[str]:
    return [SETPRIV or "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


# Opens COUNT connections, alternately over loopback TCP and the unix socket,
# sends one byte on each (a request begun, never finished), says what each got
# once at most EXPECT are left unanswered (or after 10 s), then holds them
# until FLAG exists.
_HOLDER = textwrap.dedent(
    """
    import json, os, socket, sys, time
    port, path, count, flag = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    expect = int(sys.argv[5])
    socks = []
    for i in range(count):
        if i % 2:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
        else:
            s = socket.create_connection(("127.0.0.1", port))
        try:
            s.sendall(b"G")
        except OSError:
            pass  # refused and closed already: its answer is still there to read
        s.setblocking(False)
        socks.append(s)
    answers = {}
    start = time.monotonic()
    while count - len(answers) > expect and time.monotonic() - start < 10:
        time.sleep(0.1)
        for i, s in enumerate(socks):
            if i in answers:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                answers[i] = type(e).__name__
            else:
                answers[i] = data.split(b" ")[1].decode() if data else "closed"
    counts = {}
    for answer in answers.values():
        counts[answer] = counts.get(answer, 0) + 1
    print(json.dumps({"open": count - len(answers), "answered": counts}), flush=True)
    while not os.path.exists(flag):
        time.sleep(0.05)
    """
)

# COUNT requests over loopback TCP and as many over the unix socket, each on
# a new connection: the statuses, or the error met.
_CLIENT = textwrap.dedent(
    """
    import http.client, json, socket, sys
    port, path, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    method, target = sys.argv[4], sys.argv[5]
    class Unix(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(5)
            self.sock.connect(path)
    out = {"tcp": [], "unix": []}
    for _ in range(count):
        tcp = lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for kind, make in (("tcp", tcp), ("unix", lambda: Unix("localhost", timeout=5))):
            try:
                c = make()
                c.request(method, target, b"{}" if method == "POST" else None)
                r = c.getresponse()
                r.read()
                out[kind].append(r.status)
                c.close()
            except Exception as e:
                out[kind].append(type(e).__name__)
    print(json.dumps(out), flush=True)
    """
)


class DescriptorTests(E2ETestCase):
    """
    Issue 13's first row with real sockets and a real daemon, scaled down:
    an open-file limit of 256 (prlimit) instead of 20 000, and 600 slow
    connections instead of 20 200.  The attacker and a second user are other
    uids (setpriv); the test itself is root, the operator.
    """

    FILE_LIMIT = 256

    def setUp(self) -> None:
        super().setUp()
        if os.geteuid() != 0 or SETPRIV is None or PRLIMIT is None:
            raise SkipTest("other uids need root, setpriv and prlimit (CI runs as root)")

    async def start(self, *options: str) -> tuple[Any, int, str, str]:
        directory = self.short_temp_dir()
        os.chmod(directory, 0o755)  # other uids reach the socket
        sock = os.path.join(directory, "registry.sock")
        daemon = self.spawn(
            [
                PRLIMIT or "prlimit",
                f"--nofile={self.FILE_LIMIT}:{self.FILE_LIMIT}",
                HSU_REGISTRY,
                f"--endpoint=unix:{sock}:mode=666",
                "--endpoint=tcp:0:interface=127.0.0.1",
                *options,
            ]
        )
        port = await self.tcp_port(daemon)
        await daemon.wait_for(UNIX_LISTENING, "stderr")
        return daemon, port, sock, os.path.join(directory, "release")

    async def hold(
        self, uid: int, port: int, sock: str, count: int, flag: str, expect: int
    ) -> dict[str, Any]:
        """
        C{count} slow connections of C{uid}, held until C{flag} exists: what
        they got, once at most C{expect} are unanswered.
        """
        argv = [sys.executable, "-c", _HOLDER, str(port), sock, str(count), flag, str(expect)]
        holder = self.spawn(_as(uid, *argv))
        match = await holder.wait_for(re.compile(rb"^(\{.*\})$", re.M), "stdout")
        report: dict[str, Any] = json.loads(match.group(1))
        return report

    async def clients(
        self,
        uid: int | None,
        port: int,
        sock: str,
        method: str = "GET",
        target: str = "/api/v1/health",
    ) -> dict[str, list[Any]]:
        argv = [sys.executable, "-c", _CLIENT, str(port), sock, "5", method, target]
        process = await self.run_to_end(_as(uid, *argv) if uid is not None else argv)
        self.assertExitCode(process, 0)
        result: dict[str, list[Any]] = json.loads(process.stdout)
        return result

    def descriptors(self, daemon: Any) -> int:
        return len(os.listdir(f"/proc/{daemon.transport.pid}/fd"))

    async def test_slow_connections_of_one_uid(self) -> None:
        """
        600 connections of one uid, each sending a byte and no more, over TCP
        and the unix socket.  Before: every descriptor was taken and no other
        client was served, over either transport, until they were released.
        Now the uid holds its limit (7 here: a quarter of what 256 descriptors
        leave), the rest are JSON 429s at once; another uid's clients and the
        operator's are all served, over both transports; refusals are logged
        once, with their count; the registry is unchanged.
        """
        limits = derive_connection_limits(check_concurrency=32, file_limit=self.FILE_LIMIT)
        daemon, port, sock, flag = await self.start()
        attack = await self.hold(65534, port, sock, 600, flag, limits.max_per_peer)
        during = self.descriptors(daemon)
        others = await self.clients(65533, port, sock)
        operator = await self.clients(None, port, sock)
        served = {"tcp": [200] * 5, "unix": [200] * 5}
        self.assertEqual((others, operator), (served, served), attack)
        self.assertEqual(attack["open"], limits.max_per_peer, _text(daemon.stderr))
        # Refused at once: a JSON 429, or a reset for a byte that came after
        # the close.
        refused = attack["answered"]
        self.assertEqual(sum(refused.values()), 600 - limits.max_per_peer, refused)
        self.assertLessEqual(set(refused), {"429", "ConnectionResetError"}, refused)
        self.assertGreater(refused["429"], 500, refused)
        self.assertLess(during, 64)
        refusals = re.findall(
            rb"Refused (\d+) connections in 10(?:\.0)?s past the limit of 7 per peer "
            rb"\(the latest from uid:65534\)",
            daemon.stderr,
        )
        self.assertEqual(refusals[:1], [b"1"], _text(daemon.stderr))
        self.assertLessEqual(len(refusals), 2)
        self.assertNotIn(b"EMFILE", daemon.stderr)
        with open(flag, "w"):
            pass
        modules = await self.clients(None, port, sock, target="/api/v1/modules")
        self.assertEqual(modules["tcp"][0], 200)
        client = self.http_client()
        catalog = await self.assertJSON(
            client, "GET", f"http://127.0.0.1:{port}/api/v1/modules", 200
        )
        self.assertEqual(catalog["modules"], [])

    async def test_many_uids_fill_the_registry(self) -> None:
        """
        Six uids each hold as many connections as they may, more than the
        registry holds in all: each past the total gets a JSON 503 (429 past
        its own limit), the daemon stays within its descriptors, root (the
        operator) is served anything over either transport from the reserve,
        and a monitor of another uid gets its health answered, and only that.
        """
        limits = derive_connection_limits(check_concurrency=32, file_limit=self.FILE_LIMIT)
        daemon, port, sock, flag = await self.start("--header-timeout=1m")
        reports = [
            await self.hold(uid, port, sock, 10, flag, 7 if uid < 65504 else 0)
            for uid in range(65500, 65506)
        ]
        held = sum(report["open"] for report in reports)
        self.assertEqual(held, limits.max_connections, reports)
        answered: dict[str, int] = {}
        for report in reports:
            for status, count in report["answered"].items():
                answered[status] = answered.get(status, 0) + count
        # Four uids fill the 28 slots (7 each, then 3 x 429); the other two get
        # one health-only slot each, cut off after a second (408), then 503s.
        resets = answered.pop("ConnectionResetError", 0)
        self.assertEqual(answered.pop("408"), 2, reports)
        self.assertEqual(sum(answered.values()) + resets, 30, reports)
        self.assertLessEqual(set(answered), {"429", "503"}, reports)
        self.assertLess(self.descriptors(daemon), 64)
        monitor = await self.clients(65533, port, sock)
        self.assertEqual(monitor, {"tcp": [200] * 5, "unix": [200] * 5})
        nosy = await self.clients(65533, port, sock, target="/api/v1/modules")
        self.assertEqual(nosy, {"tcp": [503] * 5, "unix": [503] * 5})
        operator = await self.clients(None, port, sock, target="/api/v1/modules")
        self.assertEqual(operator, {"tcp": [200] * 5, "unix": [200] * 5})
        self.assertIn(b"past the limit of 28 connections and the reserve", daemon.stderr)
        self.assertNotIn(b"EMFILE", daemon.stderr)
        with open(flag, "w"):
            pass

# -*- test-case-name: tests.test_connections -*-
"""
How many connections the registry holds, in all and per peer, so that no
client can take every descriptor the daemon has.

Without a bound, 20 200 connections each sending a byte every 20 s took
every descriptor of a daemon with an open-file limit of 20 000: no other
client, over TCP or the unix socket, was served until they were released.

 - B{Peers.}  A connection's peer is the uid the kernel names on a local
   transport (C{SO_PEERCRED} on a unix socket; the owner of the client's
   socket, through C{sock_diag}, on loopback TCP: the same uid over either
   is the same peer), else its source address (an IPv6 source by its /64,
   which one host usually holds whole).  Asking C{sock_diag} costs a new
   loopback TCP connection about a sixth of its cost, so it is asked only
   when the answer can matter: while fewer local connections are open than
   one peer may hold and the registry is not full, no uid can be past its
   limit, and a loopback TCP connection is admitted unidentified; the
   moment that stops being true, every connection still unidentified is
   identified, and so is one about to send a body.
 - B{Limits.}  At most L{ConnectionLimits.max_connections} connections in
   all, and L{ConnectionLimits.max_per_peer} from one peer.  Past either,
   a new connection is answered at once (a JSON 429 past the peer's limit,
   a JSON 503 past the total) and closed; the refusal is counted and
   logged, at most once per limit every 10 s.
 - B{The reserve.}  L{ConnectionLimits.reserved} more connections are kept
   for the operator: root and the registry's own uid (the admins whatever
   the policy says; by default the unix socket's mode admits no one else)
   may use all of them, for any request, over the unix socket or loopback
   TCP.  Other peers may use half of them for a single C{GET
   /api/v1/health} (anything else is a JSON 503; it must arrive within a
   second), and only while they hold no other connection: a monitor of
   another uid still sees the registry answer while the peers filling it
   cannot keep those slots themselves.
   The operator keeps the other half whatever anyone does.
 - B{Defaults} come from the open-file limit (L{derive_connection_limits}):
   what is left once the process monitor's pidfds (up to half the limit),
   the health checks' connections and a margin for the daemon's own files
   are set aside.
"""

from __future__ import annotations

import enum
import ipaddress
import resource
from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from hsu_registry.security.audit import RateLimitedLog
from hsu_registry.security.identity import Identity, connection_identity
from hsu_registry.security.policy import operator_uids

__all__ = [
    "FILE_MARGIN",
    "UNIDENTIFIED",
    "ConnectionLimiter",
    "ConnectionLimits",
    "Peer",
    "RateLimitedLog",
    "Slot",
    "derive_connection_limits",
    "open_file_limit",
    "peer_of",
    "privileged_uids",
]

#: Descriptors set aside for the daemon's own files: stdio, log files, the
#: listeners, the reactor's epoll and waker, SQLite's database, journal and
#: WAL, resolver threads, the sock_diag socket of an identification, /proc
#: reads, Twisted's EMFILE reserve.
FILE_MARGIN = 64

#: The most connections the reserve holds by default.
MAX_DEFAULT_RESERVE = 64


def open_file_limit() -> int:
    """The process's soft open-file limit (C{RLIMIT_NOFILE})."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return int(soft)


@frozen
class ConnectionLimits:
    """
    The connection limits of a site.

    @ivar max_connections: connections open at once, in all (the reserve
        comes on top).
    @ivar max_per_peer: connections open at once from one peer (uid or
        address); root and the registry's own uid are not limited.
    @ivar reserved: connections beyond C{max_connections} for root and the
        registry's uid, half of which others holding no connection may use
        for a health request.
    @ivar file_limit: the open-file limit the defaults came from (0: unknown).
    @ivar descriptors: the descriptors left for connections under that limit
        (0: unknown), to warn when the limits are set higher.
    """

    max_connections: int
    max_per_peer: int
    reserved: int
    file_limit: int = 0
    descriptors: int = 0

    @property
    def health_lane(self) -> int:
        """Connections of the reserve others may use for a health request."""
        return self.reserved // 2

    def overcommitted(self) -> bool:
        """Whether the limits allow more connections than there are descriptors for."""
        return bool(self.descriptors) and self.max_connections + self.reserved > self.descriptors


def derive_connection_limits(
    max_connections: int | None = None,
    max_per_peer: int | None = None,
    reserved: int | None = None,
    check_concurrency: int = 32,
    process_binding: bool = True,
    file_limit: int | None = None,
) -> ConnectionLimits:
    """
    The limits given, and defaults for those that are not, from the
    open-file limit C{L}:

     - descriptors for connections: C{L}, less C{L/2} for pidfds when
       registrations are bound to processes (the process monitor's own
       cap), less C{check_concurrency} for health checks, less
       L{FILE_MARGIN};
     - the reserve: a sixteenth of those, from 4 to L{MAX_DEFAULT_RESERVE};
     - C{max_connections}: the rest;
     - C{max_per_peer}: a quarter of C{max_connections}, so it takes four
       uids (or addresses) to fill the registry, and the reserve still
       answers the operator when they do.

    With C{L} = 1024: 390 connections, 97 per peer, 26 reserved; with
    65 536 (the systemd unit's): 32 608, 8 152 per peer, 64 reserved.
    """
    limit = open_file_limit() if file_limit is None else file_limit
    pidfds = limit // 2 if process_binding else 0
    descriptors = max(limit - pidfds - check_concurrency - FILE_MARGIN, 8)
    if reserved is None:
        reserved = min(MAX_DEFAULT_RESERVE, max(4, descriptors // 16))
    if max_connections is None:
        max_connections = max(descriptors - reserved, 4)
    if max_per_peer is None:
        max_per_peer = max(1, max_connections // 4)
    return ConnectionLimits(
        max_connections=max_connections,
        max_per_peer=max_per_peer,
        reserved=reserved,
        file_limit=limit,
        descriptors=descriptors,
    )


def privileged_uids() -> frozenset[int]:
    """Root and the registry's own uid: the admins whatever the policy says."""
    return operator_uids()


#: The key of loopback TCP peers not identified yet.
UNIDENTIFIED = "loopback:unidentified"


@frozen
class Peer:
    """
    Who is at the other end of a connection, for counting connections.

    @ivar key: C{uid:N}, C{ip:ADDRESS}, C{net:PREFIX/64}, C{unix:unknown},
        or L{UNIDENTIFIED}.
    @ivar privileged: root or the registry's own uid, known from the kernel.
    @ivar local: on this host: a uid (unix socket or loopback TCP), or a
        loopback TCP peer not identified yet.
    """

    key: str
    privileged: bool = False
    local: bool = False

    @property
    def unidentified(self) -> bool:
        """A loopback TCP peer whose uid was not asked yet."""
        return self.key == UNIDENTIFIED


_UNIDENTIFIED_PEER = Peer(UNIDENTIFIED, local=True)


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost") or host.startswith("::ffff:127.")


def _address_key(host: str) -> str:
    """C{ip:ADDRESS} for IPv4 (and IPv4-mapped IPv6), C{net:PREFIX/64} for IPv6."""
    host = host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"ip:{host}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"net:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


def peer_of(
    transport: Any, privileged: frozenset[int], identify_loopback: bool = True
) -> tuple[Peer, Identity | None]:
    """
    The peer of a new connection, and the kernel's identity of it when it is
    also the connection's identity for the API (L{None} when it is not: on a
    TLS connection the certificate decides, after the handshake).

    @param privileged: the uids whose connections may use the reserve.
    @param identify_loopback: whether to ask the kernel for the uid behind a
        loopback TCP connection (else its peer is L{UNIDENTIFIED}).
    """
    address = transport.getPeer()
    # A TLS connection's socket is its wrapper's transport.
    wrapped = hasattr(transport, "wrappedProtocol")
    raw = getattr(transport, "transport", None) if wrapped else transport
    if isinstance(address, UNIXAddress):
        identity = connection_identity(raw)
        if identity.uid is None:
            return Peer("unix:unknown", local=True), None if wrapped else identity
    elif isinstance(address, IPv4Address | IPv6Address):
        if not _is_loopback(address.host):
            # Beyond loopback the kernel cannot name a uid: skip the lookup.
            # (An IPv4 host is the kernel's dotted quad already: no parsing.)
            if isinstance(address, IPv4Address):
                return Peer("ip:" + address.host), None
            return Peer(_address_key(address.host)), None
        if not identify_loopback:
            return _UNIDENTIFIED_PEER, None
        identity = connection_identity(raw)
        if identity.uid is None:
            return Peer(_address_key(address.host), local=True), None if wrapped else identity
    else:
        return Peer(f"ip:{getattr(address, 'host', 'unknown')}"), None
    uid = identity.uid
    return Peer(f"uid:{uid}", uid in privileged, local=True), None if wrapped else identity


class Slot(enum.Enum):
    """Where a connection was admitted, or why it was not."""

    GENERAL = "general"
    RESERVED = "reserved"
    HEALTH = "health"
    OVER_PEER_LIMIT = "per-peer"
    OVER_TOTAL_LIMIT = "total"

    @property
    def admitted(self) -> bool:
        return self in (Slot.GENERAL, Slot.RESERVED, Slot.HEALTH)


class ConnectionLimiter:
    """
    Admits or refuses each new connection (see the module docstring) and
    counts them.  Every counter is an attribute, for a metrics endpoint:

    @ivar open: connections open now (all slots).
    @ivar local: of those, from this host (unix socket, loopback TCP).
    @ivar peak: the most open at once.
    @ivar accepted: connections admitted so far.
    @ivar admitted_reserved: of those, admitted to the operators' reserve.
    @ivar admitted_health: of those, admitted for a health request only.
    @ivar refused_per_peer: connections refused past the per-peer limit.
    @ivar refused_total: connections refused past the total and the reserve.
    """

    def __init__(
        self,
        limits: ConnectionLimits,
        warn: Callable[..., None] | None = None,
    ) -> None:
        self.limits = limits
        self._warn = warn
        self._by_peer: dict[str, int] = {}
        self.general = 0
        self.reserved = 0
        self.health = 0
        self.local = 0
        self.peak = 0
        self.accepted = 0
        self.admitted_reserved = 0
        self.admitted_health = 0
        self.refused_per_peer = 0
        self.refused_total = 0

    @property
    def open(self) -> int:
        return self.general + self.reserved + self.health

    def count_of(self, peer: Peer) -> int:
        """The connections C{peer} holds now."""
        return self._by_peer.get(peer.key, 0)

    @property
    def peers(self) -> int:
        """The peers holding connections now."""
        return len(self._by_peer)

    def needs_uid(self) -> bool:
        """
        Whether a new local connection's uid can matter: once as many local
        connections are open as one peer may hold (one of them may then be
        at its limit), or when only the reserve is left (for root and the
        registry's uid).  Until then no uid can be past its limit.
        """
        limits = self.limits
        return self.local + 1 >= limits.max_per_peer or self.general >= limits.max_connections

    def identified(self, before: Peer, after: Peer) -> None:
        """An open connection counted as C{before} turned out to be C{after}'s."""
        self._forget(before)
        self._by_peer[after.key] = self._by_peer.get(after.key, 0) + 1

    def admit(self, peer: Peer) -> Slot:
        """Admit a new connection from C{peer} to a slot, or say why not."""
        limits = self.limits
        held = self._by_peer.get(peer.key, 0)
        if not peer.privileged and held >= limits.max_per_peer and not peer.unidentified:
            self.refused_per_peer += 1
            if self._warn is not None:
                self._warn(
                    "per-peer",
                    "Refused {count} connections in {interval}s past the limit of "
                    "{limit} per peer (the latest from {peer})",
                    limit=limits.max_per_peer,
                    peer=peer.key,
                )
            return Slot.OVER_PEER_LIMIT
        if self.general < limits.max_connections:
            self.general += 1
            slot = Slot.GENERAL
        elif peer.privileged and self.reserved + self.health < limits.reserved:
            self.reserved += 1
            self.admitted_reserved += 1
            slot = Slot.RESERVED
        elif (
            held == 0
            and self.health < limits.health_lane
            and self.reserved + self.health < limits.reserved
        ):
            # A peer holding no connection (a monitor, not one of those
            # filling the registry) may ask for its health.
            self.health += 1
            self.admitted_health += 1
            slot = Slot.HEALTH
        else:
            self.refused_total += 1
            if self._warn is not None:
                self._warn(
                    "total",
                    "Refused {count} connections in {interval}s past the limit of "
                    "{limit} connections and the reserve (the latest from {peer})",
                    limit=limits.max_connections,
                    peer=peer.key,
                )
            return Slot.OVER_TOTAL_LIMIT
        self._by_peer[peer.key] = held + 1
        if peer.local:
            self.local += 1
        self.accepted += 1
        opened = self.general + self.reserved + self.health
        if opened > self.peak:
            self.peak = opened
        return slot

    def release(self, peer: Peer, slot: Slot) -> None:
        """A connection admitted to C{slot} closed."""
        if slot is Slot.GENERAL:
            self.general -= 1
        elif slot is Slot.RESERVED:
            self.reserved -= 1
        elif slot is Slot.HEALTH:
            self.health -= 1
        else:
            return
        if peer.local:
            self.local -= 1
        self._forget(peer)

    def _forget(self, peer: Peer) -> None:
        held = self._by_peer.get(peer.key, 0) - 1
        if held > 0:
            self._by_peer[peer.key] = held
        else:
            self._by_peer.pop(peer.key, None)

    def stats(self) -> dict[str, int]:
        """The counters, by name."""
        return {
            "connections_open": self.open,
            "connections_local": self.local,
            "connections_peak": self.peak,
            "connections_peers": self.peers,
            "connections_accepted": self.accepted,
            "connections_admitted_reserved": self.admitted_reserved,
            "connections_admitted_health": self.admitted_health,
            "connections_refused_per_peer": self.refused_per_peer,
            "connections_refused_total": self.refused_total,
        }

# -*- test-case-name: tests.test_deadlines -*-
"""
One byte budget for the request bodies being received, shared by every
connection.

Bodies are held in memory (up to C{--max-body-size} each), so without a
bound 1 500 POSTs declaring 1 MiB bodies and sending them slowly took the
daemon from 53 MB to 1 646 MB.  A body's declared C{Content-Length} is taken
from the budget before any of it is read (a request that does not fit is a
JSON 503), a chunked body's bytes as they arrive (cut off the same way), and
both are given back when the request completes or its connection closes.

One peer may hold at most a share of the budget (a quarter, and at least
one body of the largest size), so that it takes several uids or addresses
to keep everyone else's publishes waiting; root and the registry's own uid
are not limited.
"""

from __future__ import annotations

from collections.abc import Callable

from hsu_registry.web.connections import Peer

__all__ = ["DEFAULT_MAX_BODY_MEMORY", "BodyBudget"]

#: Bytes of request bodies held at once, by default.
DEFAULT_MAX_BODY_MEMORY = 64 * 1024 * 1024


class BodyBudget:
    """
    The bytes of request bodies being received and processed.

    @ivar capacity: the most held at once.
    @ivar peer_share: the most one (unprivileged) peer may hold.
    @ivar used: bytes held now.
    @ivar peak: the most held at once so far.
    @ivar refused: requests refused (503) because their body did not fit.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_MAX_BODY_MEMORY,
        peer_share: int | None = None,
        warn: Callable[..., None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.peer_share = capacity // 4 if peer_share is None else min(peer_share, capacity)
        self._warn = warn
        self._by_peer: dict[str, int] = {}
        self.used = 0
        self.peak = 0
        self.refused = 0

    def held_by(self, peer: Peer) -> int:
        """The bytes C{peer}'s bodies hold now."""
        return self._by_peer.get(peer.key, 0)

    def take(self, peer: Peer, size: int) -> bool:
        """
        Take C{size} bytes for C{peer}'s body, if they fit in the budget and
        in the peer's share; count and log a refusal when they do not.
        """
        used = self.used + size
        held = self._by_peer.get(peer.key, 0) + size
        if used > self.capacity or (held > self.peer_share and not peer.privileged):
            self.refused += 1
            if self._warn is not None:
                self._warn(
                    "body-memory",
                    "Refused {count} request bodies in {interval}s: {used} of {capacity} "
                    "bytes of bodies held, {held} by {peer} (the latest)",
                    used=self.used,
                    capacity=self.capacity,
                    held=held - size,
                    peer=peer.key,
                )
            return False
        self.used = used
        self._by_peer[peer.key] = held
        if used > self.peak:
            self.peak = used
        return True

    def give_back(self, peer: Peer, size: int) -> None:
        """C{peer}'s body of C{size} bytes is no longer held."""
        self.used -= size
        held = self._by_peer.get(peer.key, 0) - size
        if held > 0:
            self._by_peer[peer.key] = held
        else:
            self._by_peer.pop(peer.key, None)

    def stats(self) -> dict[str, int]:
        """The counters, by name."""
        return {
            "body_bytes_held": self.used,
            "body_bytes_peak": self.peak,
            "body_bytes_capacity": self.capacity,
            "bodies_refused": self.refused,
        }

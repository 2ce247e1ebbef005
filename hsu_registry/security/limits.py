# -*- test-case-name: tests.test_quotas -*-
"""
Per-identity rate limits and quotas, so that one caller cannot crowd out the
others: a token bucket on writes (publish, heartbeat, unpublish) and on
expensive reads (catalog, services, watch, blocking queries), and quotas on
what an identity may hold (modules, bytes of metadata).

Admins (root, the registry's own uid, admin grants) are not limited: they are
the operators, and the benchmark's publisher.  Anonymous callers share one
bucket and one quota: they cannot be told apart.
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import frozen

from hsu_registry.errors import QuotaExceeded, TooManyRequests
from hsu_registry.model import Registration

__all__ = ["OwnerUsage", "Quotas", "RateLimiter", "metadata_bytes"]


@frozen
class Quotas:
    """
    The limits per identity.  Rates are requests per second, with a burst of
    that many more at once.

    @ivar max_tracked: the most identities whose buckets are kept; past it
        the least recently seen are forgotten (a full bucket is the same as
        none), so a caller cycling through tokens cannot grow the table.
    """

    write_rate: float = 50.0
    write_burst: int = 200
    read_rate: float = 20.0
    read_burst: int = 50
    max_modules: int = 10_000
    max_metadata_bytes: int = 4 * 1024 * 1024
    max_tracked: int = 10_000


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last


class RateLimiter:
    """
    A token bucket per identity: C{rate} tokens a second, up to C{burst}.
    Memory is bounded by C{max_tracked} identities.
    """

    def __init__(self, rate: float, burst: int, what: str, max_tracked: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.what = what
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, principal: str, now: float) -> None:
        """
        Spend one token of C{principal}'s bucket.

        @raise TooManyRequests: when it is empty, with the seconds until the
            next token (the answer's Retry-After).
        """
        bucket = self._buckets.get(principal)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[principal] = bucket
            if len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(principal)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.last) * self.rate)
            bucket.last = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        wait = (1.0 - bucket.tokens) / self.rate
        raise TooManyRequests(
            f"too many {self.what} from {principal}: at most {self.rate:g} a second "
            f"(bursts of {self.burst}); retry after {wait:.2f}s",
            {"limit": f"{self.what} rate", "retryAfter": round(wait, 3), "identity": principal},
            retry_after=wait,
        )


def metadata_bytes(registration: Registration) -> int:
    """The bytes of metadata keys and values a registration holds, over all its APIs."""
    if b'"metadata":{' not in registration.discover_body:
        return 0  # the common case, without decoding the APIs
    return sum(
        len(key.encode()) + len(value.encode())
        for api in registration.apis
        for key, value in api.metadata
    )


class OwnerUsage:
    """What each owner holds: modules and bytes of metadata, kept up to date by the registry."""

    def __init__(self) -> None:
        self._modules: dict[str, int] = {}
        self._metadata: dict[str, int] = {}

    def usage(self, owner: str) -> tuple[int, int]:
        """C{(modules, metadata bytes)} held by C{owner}."""
        return self._modules.get(owner, 0), self._metadata.get(owner, 0)

    def add(self, registration: Registration) -> None:
        owner = registration.owner
        self._modules[owner] = self._modules.get(owner, 0) + 1
        size = metadata_bytes(registration)
        if size:
            self._metadata[owner] = self._metadata.get(owner, 0) + size

    def remove(self, registration: Registration) -> None:
        owner = registration.owner
        left = self._modules.get(owner, 0) - 1
        if left > 0:
            self._modules[owner] = left
        else:
            self._modules.pop(owner, None)
        size = metadata_bytes(registration)
        if size:
            rest = self._metadata.get(owner, 0) - size
            if rest > 0:
                self._metadata[owner] = rest
            else:
                self._metadata.pop(owner, None)

    def refusal(
        self, quotas: Quotas, new: Registration, previous: Registration | None
    ) -> QuotaExceeded | None:
        """Why holding C{new} (instead of C{previous}) would pass its owner's quotas."""
        modules, metadata = self.usage(new.owner)
        if previous is None and modules + 1 > quotas.max_modules:
            return QuotaExceeded(
                f"{new.owner} already holds its quota of {quotas.max_modules} modules",
                {"limit": "modules per identity", "max": quotas.max_modules},
            )
        added = metadata_bytes(new) - (metadata_bytes(previous) if previous is not None else 0)
        if added > 0 and metadata + added > quotas.max_metadata_bytes:
            return QuotaExceeded(
                f"{new.owner} would hold more than its quota of {quotas.max_metadata_bytes} "
                "bytes of metadata",
                {"limit": "metadata bytes per identity", "max": quotas.max_metadata_bytes},
            )
        return None

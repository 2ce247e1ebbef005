# -*- test-case-name: tests.test_check_targets -*-
"""
How much health checking one identity may ask of the registry.

Health checks make the registry open connections on a publisher's behalf,
so without bounds they are a port scanner and a flood (issue 12): these
limits cap how many checked APIs an identity (a registration's owner, see
L{hsu_registry.model.Registration.owner}) may have, how fast its checks may
start, and how much of the shared concurrency its checks may hold, so that
one identity's checks can never starve another's.

This module imports nothing heavy: options and configuration may read it.
"""

from __future__ import annotations

from attrs import field, frozen
from attrs.validators import ge, gt, le

from hsu_registry.errors import RegistryError

__all__ = [
    "DEFAULT_CHECK_LIMITS",
    "MAX_CHECKED_APIS_PER_IDENTITY",
    "MAX_CHECK_STARTS_PER_SECOND",
    "CheckLimitExceeded",
    "CheckLimits",
]

#: The most APIs with a health check that one identity may have registered.
MAX_CHECKED_APIS_PER_IDENTITY = 256
#: The most checks of one identity started per second (a token bucket).
MAX_CHECK_STARTS_PER_SECOND = 32.0


@frozen
class CheckLimits:
    """
    The per-identity bounds on health checks.

    @ivar max_checked_apis: the most checked APIs an identity may have over
        all its registrations; a publish past it is refused
        (L{CheckLimitExceeded}), and checks past it are not run.
    @ivar starts_per_second: the sustained rate at which one identity's
        checks may start; due checks past it wait their turn.
    @ivar burst: how many checks of one identity may start at once after a
        quiet spell (the token bucket's depth).
    @ivar in_flight_share: the fraction of the registry's check concurrency
        that one identity's checks may hold at once (at least one check), so
        checks that hang until their timeout leave room for everyone else.
    @ivar max_names: the most distinct host names one publish may ask to be
        resolved for its checks (each name is one lookup in the resolver's
        threads).
    @ivar resolve_timeout: seconds a name's lookup may take before the
        publish is refused.
    """

    max_checked_apis: int = field(default=MAX_CHECKED_APIS_PER_IDENTITY, validator=ge(0))
    starts_per_second: float = field(default=MAX_CHECK_STARTS_PER_SECOND, validator=gt(0))
    burst: int = field(default=32, validator=ge(1))
    in_flight_share: float = field(default=0.25, validator=[gt(0), le(1)])
    max_names: int = field(default=16, validator=ge(0))
    resolve_timeout: float = field(default=5.0, validator=gt(0))

    def in_flight_per_identity(self, concurrency: int) -> int:
        """The most checks of one identity in flight at once, of C{concurrency}."""
        return max(1, int(concurrency * self.in_flight_share))


DEFAULT_CHECK_LIMITS = CheckLimits()


class CheckLimitExceeded(RegistryError):
    """
    A publish would give its identity more checked APIs than
    L{CheckLimits.max_checked_apis}: refused as 403, since publishing again
    does not help until the identity drops some of its checks.
    """

    status = 403

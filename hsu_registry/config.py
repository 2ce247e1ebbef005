# -*- test-case-name: tests.test_options -*-
"""
The daemon's configuration as one frozen record, shared by the twistd plugin,
the standalone command and embedders.
"""

from __future__ import annotations

from attrs import field, frozen

from hsu_registry.checks.limits import CheckLimits
from hsu_registry.endpoints import DEFAULT_ENDPOINT
from hsu_registry.model import DEFAULT_LIMITS, Limits
from hsu_registry.security.limits import Quotas
from hsu_registry.watch import WatchLimits
from hsu_registry.web.budget import DEFAULT_MAX_BODY_MEMORY
from hsu_registry.web.deadlines import (
    DEFAULT_BODY_GRACE,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MIN_BODY_RATE,
)
from hsu_registry.web.limits import DEFAULT_MAX_BODY_SIZE

__all__ = ["RegistryConfig"]


@frozen
class RegistryConfig:
    """
    Everything that shapes a registry daemon.  Times are in seconds.

    An empty C{endpoints} builds a daemon that listens nowhere, for
    applications that mount the API under their own Site.
    """

    endpoints: tuple[str, ...] = (DEFAULT_ENDPOINT,)
    stale_after: float = 300.0
    expire_after: float = 600.0
    cleanup_interval: float = 60.0
    flush_interval: float = 5.0
    discover_heartbeat: bool = True
    # Bind registrations published over a unix socket to the publishing
    # process (see hsu_registry.processes); needs Linux's /proc.
    process_binding: bool = True
    process_poll_interval: float = 0.5
    # The most active health checks in flight at once.
    check_concurrency: int = 32
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    # Connections (see hsu_registry.web.connections): None derives each
    # from the open-file limit when the daemon is built.
    max_connections: int | None = None
    max_connections_per_peer: int | None = None
    reserved_connections: int | None = None
    # Deadlines (see hsu_registry.web.deadlines): seconds, and bytes a second.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    min_body_rate: int = DEFAULT_MIN_BODY_RATE
    body_grace: float = DEFAULT_BODY_GRACE
    # Bytes of request bodies held at once, by all connections together.
    max_body_memory: int = DEFAULT_MAX_BODY_MEMORY
    max_modules: int = 100_000
    store: str = "memory"
    access_log: bool = False
    # Seconds the requests under way at a stop may take to be answered.
    drain_timeout: float = 10.0
    limits: Limits = field(default=DEFAULT_LIMITS)
    # Who may do what: None (the default policy), "open" (the original's
    # behaviour, no ownership) or the path of a policy file.
    policy: str | None = None
    # Per-identity rates and quotas (see hsu_registry.security.limits).
    quotas: Quotas = field(factory=Quotas)
    # Per-identity bounds on health checks (see hsu_registry.checks.limits).
    check_limits: CheckLimits = field(factory=CheckLimits)
    # Bounds on the replay buffer, watch streams and held blocking queries
    # (see hsu_registry.watch).
    watch_limits: WatchLimits = field(factory=WatchLimits)
    # Freeze long-lived objects once started (see hsu_registry.gctune): the
    # daemon's commands turn it on; embedders decide for their own process.
    freeze_gc: bool = False

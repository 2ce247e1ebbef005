# -*- test-case-name: tests.test_options -*-
"""
Command-line options, shared by ``twistd hsu-registry`` and the standalone
``hsu-registry`` command: strports endpoints, Go-style durations, limits, and
the seed's ``--transport``/``--tcp-address``/``--socket-path`` flags.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

from hsu_registry import __version__
from hsu_registry.checks.limits import CheckLimits
from hsu_registry.config import RegistryConfig
from hsu_registry.durations import parse_duration
from hsu_registry.endpoints import DEFAULT_ENDPOINT, check_description, tcp_endpoint, unix_endpoint
from hsu_registry.model import DEFAULT_LIMITS, Limits
from hsu_registry.security.limits import Quotas
from hsu_registry.stores import parse_store_spec
from hsu_registry.watch import DEFAULT_WATCH_LIMITS, WatchLimits
from hsu_registry.web.budget import DEFAULT_MAX_BODY_MEMORY
from hsu_registry.web.deadlines import DEFAULT_MIN_BODY_RATE
from hsu_registry.web.limits import DEFAULT_MAX_BODY_SIZE

__all__ = ["Options"]


def _positive_int(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be an integer, not {text!r}") from None
    if value < 1:
        raise usage.UsageError(f"--{name} must be at least 1")
    return value


def _optional_int(name: str, text: str | None, minimum: int) -> int | None:
    """An integer of at least C{minimum}, or L{None} when not given (derived later)."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be an integer, not {text!r}") from None
    if value < minimum:
        raise usage.UsageError(f"--{name} must be at least {minimum}")
    return value


def _positive_rate(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number, not {text!r}") from None
    if not 0 < value < 1e9:
        raise usage.UsageError(f"--{name} must be more than 0 a second")
    return value


class Options(usage.Options):
    """Options of the hsu-registry daemon."""

    synopsis = "[options]"
    longdesc = (
        "A service registry: modules publish the API endpoints they serve and "
        "discover each other's at run time.  Listens on "
        f"{DEFAULT_ENDPOINT} unless told otherwise."
    )

    optParameters: list[list[Any]] = [
        [
            "stale-after",
            None,
            "5m",
            "A module not seen for this long is no longer discoverable (Go duration).",
        ],
        ["expire-after", None, "10m", "A module not seen for this long is removed by the cleanup."],
        ["cleanup-interval", None, "1m", "How often the cleanup runs."],
        [
            "drain-timeout",
            None,
            "10s",
            "On stop, how long requests already received may take to be answered.",
        ],
        [
            "max-body-size",
            None,
            str(DEFAULT_MAX_BODY_SIZE),
            "Largest request body accepted, in bytes (larger: 413).",
        ],
        ["max-modules", None, "100000", "Most modules registered at once (more: 507)."],
        [
            "max-registration-size",
            None,
            str(DEFAULT_LIMITS.max_registration_size),
            "Largest registration (its encoded APIs), in bytes (larger: 413).",
        ],
        [
            "replay-buffer-bytes",
            None,
            str(DEFAULT_WATCH_LIMITS.replay_bytes),
            "Bytes of recent changes kept to replay to reconnecting watchers.",
        ],
        [
            "replay-buffer-changes",
            None,
            str(DEFAULT_WATCH_LIMITS.replay_changes),
            "Most recent changes kept to replay to reconnecting watchers.",
        ],
        [
            "watcher-queue-bytes",
            None,
            str(DEFAULT_WATCH_LIMITS.queue_bytes),
            "Bytes of changes a watcher may fall behind before it is disconnected.",
        ],
        [
            "watcher-queue-events",
            None,
            str(DEFAULT_WATCH_LIMITS.queue_events),
            "Changes a watcher may fall behind before it is disconnected.",
        ],
        [
            "max-watchers",
            None,
            str(DEFAULT_WATCH_LIMITS.max_watchers),
            "Most watch streams open at once (more: 503).",
        ],
        [
            "max-watchers-per-peer",
            None,
            str(DEFAULT_WATCH_LIMITS.max_watchers_per_peer),
            "Most watch streams of one peer (more: 429).",
        ],
        [
            "max-held-queries",
            None,
            str(DEFAULT_WATCH_LIMITS.max_held),
            "Most blocking queries held at once (more: 503).",
        ],
        [
            "max-held-queries-per-peer",
            None,
            str(DEFAULT_WATCH_LIMITS.max_held_per_peer),
            "Most blocking queries of one peer held at once (more: 429).",
        ],
        [
            "check-concurrency",
            None,
            "32",
            "Most health checks of registered APIs in flight at once.",
        ],
        [
            "max-connections",
            None,
            None,
            "Most client connections at once (more: 503).  Default: what the open-file "
            "limit leaves after pidfds, health checks, the daemon's files and the reserve.",
        ],
        [
            "max-connections-per-peer",
            None,
            None,
            "Most connections of one uid (unix socket, loopback TCP) or source address "
            "(other TCP; an IPv6 /64) at once (more: 429).  Default: a quarter of "
            "--max-connections.",
        ],
        [
            "reserved-connections",
            None,
            None,
            "Connections beyond --max-connections for root and the registry's own user; "
            "other peers may use half of them, for one GET /api/v1/health each.  Default: "
            "a sixteenth of the descriptors left for connections, from 4 to 64.",
        ],
        [
            "header-timeout",
            None,
            "10s",
            "Time for a request line and headers, from the request's first byte (more: 408).",
        ],
        [
            "idle-timeout",
            None,
            "1m",
            "A kept-alive connection on which no request begins for this long is closed.",
        ],
        [
            "min-body-rate",
            None,
            str(DEFAULT_MIN_BODY_RATE),
            "Bytes a second a request body must arrive at, over each --body-grace (slower: 408).",
        ],
        [
            "body-grace",
            None,
            "10s",
            "The period over which a request body's rate is measured, from the end of its headers.",
        ],
        [
            "max-body-memory",
            None,
            str(DEFAULT_MAX_BODY_MEMORY),
            "Bytes of request bodies held at once by all connections together (more: 503).",
        ],
        [
            "store",
            None,
            "memory",
            "Where registrations are kept: memory, or sqlite:PATH to survive restarts.",
        ],
        [
            "flush-interval",
            None,
            "5s",
            "How often heartbeats (last-seen times) are written to a durable store.",
        ],
        [
            "transport",
            None,
            None,
            "The seed's flag: 'tcp' (with --tcp-address) or 'unix' (with --socket-path).",
        ],
        [
            "write-rate",
            None,
            "50",
            "Writes (publish, heartbeat, unpublish) a second per identity, in bursts of "
            "4x that (more: 429); admins are not limited.",
        ],
        [
            "read-rate",
            None,
            "20",
            "Expensive reads (catalog, services, watch, blocking queries) a second per "
            "identity, in bursts of 2.5x that (more: 429).",
        ],
        ["max-modules-per-identity", None, "10000", "Most modules one identity may hold."],
        [
            "max-metadata-per-identity",
            None,
            str(4 * 1024 * 1024),
            "Most bytes of metadata (keys and values) one identity's modules may hold.",
        ],
        [
            "max-checks-per-identity",
            None,
            "256",
            "Most APIs with a health check one identity may have (more: 403).",
        ],
        [
            "check-rate-per-identity",
            None,
            "32",
            "Health checks of one identity started a second, at most.",
        ],
        [
            "check-share-per-identity",
            None,
            "0.25",
            "Fraction of --check-concurrency one identity's checks may hold at once.",
        ],
        [
            "policy",
            None,
            None,
            "Who may read, publish and administer: a policy file (TOML or JSON), or 'open' "
            "for the original's behaviour (no ownership).  Default: anyone reads and "
            "publishes, registrations belong to their creators.",
        ],
        ["tcp-address", None, None, "The seed's flag: HOST:PORT to listen on over TCP."],
        ["socket-path", None, None, "The seed's flag: unix socket path to listen on."],
    ]
    optFlags: list[list[Any]] = [
        ["access-log", None, "Log every request (costs about 15% of throughput)."],
        [
            "discover-heartbeat",
            None,
            "Discovery refreshes the module it finds, as in the original (the default).",
        ],
        [
            "no-discover-heartbeat",
            None,
            "Discovery does not refresh a module (modules must publish or PUT heartbeats).",
        ],
        [
            "no-process-binding",
            None,
            "Do not bind registrations published over a unix socket to the publishing process.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["endpoints"] = []

    def opt_endpoint(self, description: str) -> None:
        """
        A strports endpoint to listen on; repeat for several.  Default:
        tcp:17951:interface=127.0.0.1.  Example: unix:/var/run/hsu/registry.sock:mode=600
        """
        try:
            check_description(description)
        except ValueError as e:
            raise usage.UsageError(f"--endpoint={description}: {e}") from None
        self["endpoints"].append(description)

    def opt_version(self) -> None:
        """Print the version and exit."""
        sys.stdout.write(f"hsu-registry {__version__}\n")
        raise SystemExit(0)

    def _seed_endpoints(self) -> list[str]:
        transport = self["transport"]
        tcp_address, socket_path = self["tcp-address"], self["socket-path"]
        if transport is None:
            if tcp_address is not None and socket_path is not None:
                raise usage.UsageError("give --transport with both --tcp-address and --socket-path")
            if tcp_address is not None:
                transport = "tcp"
            elif socket_path is not None:
                transport = "unix"
        try:
            if transport == "tcp":
                return [tcp_endpoint(tcp_address or "127.0.0.1:17951")]
            if transport == "unix":
                return [unix_endpoint(socket_path or "/var/run/hsu/registry.sock")]
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if transport is not None:
            raise usage.UsageError(f"--transport must be 'tcp' or 'unix', not {transport!r}")
        return []

    def _duration(self, name: str) -> float:
        try:
            value = parse_duration(self[name])
        except ValueError as e:
            raise usage.UsageError(f"--{name}: {e}") from None
        if value <= 0:
            raise usage.UsageError(f"--{name} must be longer than zero")
        return value

    def _check_limits(self) -> CheckLimits:
        rate = _positive_rate("check-rate-per-identity", self["check-rate-per-identity"])
        share = _positive_rate("check-share-per-identity", self["check-share-per-identity"])
        if share > 1:
            raise usage.UsageError("--check-share-per-identity must be at most 1")
        return CheckLimits(
            max_checked_apis=_positive_int(
                "max-checks-per-identity", self["max-checks-per-identity"]
            ),
            starts_per_second=rate,
            burst=max(1, int(rate)),
            in_flight_share=share,
        )

    def _watch_limits(self) -> WatchLimits:
        limits = WatchLimits(
            replay_bytes=_positive_int("replay-buffer-bytes", self["replay-buffer-bytes"]),
            replay_changes=_positive_int("replay-buffer-changes", self["replay-buffer-changes"]),
            queue_bytes=_positive_int("watcher-queue-bytes", self["watcher-queue-bytes"]),
            queue_events=_positive_int("watcher-queue-events", self["watcher-queue-events"]),
            max_watchers=_positive_int("max-watchers", self["max-watchers"]),
            max_watchers_per_peer=_positive_int(
                "max-watchers-per-peer", self["max-watchers-per-peer"]
            ),
            max_held=_positive_int("max-held-queries", self["max-held-queries"]),
            max_held_per_peer=_positive_int(
                "max-held-queries-per-peer", self["max-held-queries-per-peer"]
            ),
        )
        # A watcher within its bounds must find its next change in the buffer.
        if limits.queue_bytes > limits.replay_bytes:
            raise usage.UsageError("--watcher-queue-bytes must not exceed --replay-buffer-bytes")
        if limits.queue_events > limits.replay_changes:
            raise usage.UsageError("--watcher-queue-events must not exceed --replay-buffer-changes")
        return limits

    def _connection_bounds(self) -> dict[str, Any]:
        """The bounds on connections, their deadlines and their bodies."""
        max_body_memory = _positive_int("max-body-memory", self["max-body-memory"])
        if max_body_memory < _positive_int("max-body-size", self["max-body-size"]):
            raise usage.UsageError("--max-body-memory must not be less than --max-body-size")
        return {
            "max_connections": _optional_int("max-connections", self["max-connections"], 1),
            "max_connections_per_peer": _optional_int(
                "max-connections-per-peer", self["max-connections-per-peer"], 1
            ),
            "reserved_connections": _optional_int(
                "reserved-connections", self["reserved-connections"], 0
            ),
            "header_timeout": self._duration("header-timeout"),
            "idle_timeout": self._duration("idle-timeout"),
            "min_body_rate": _positive_int("min-body-rate", self["min-body-rate"]),
            "body_grace": self._duration("body-grace"),
            "max_body_memory": max_body_memory,
        }

    def postOptions(self) -> None:
        if self["discover-heartbeat"] and self["no-discover-heartbeat"]:
            raise usage.UsageError("give one of --discover-heartbeat and --no-discover-heartbeat")
        endpoints = list(self["endpoints"]) + self._seed_endpoints()
        stale_after = self._duration("stale-after")
        expire_after = self._duration("expire-after")
        if expire_after < stale_after:
            raise usage.UsageError("--expire-after must not be shorter than --stale-after")
        store = self["store"]
        try:
            # The syntax only: whether the file can serve is the store's to
            # say when the daemon is built (a failure of the environment,
            # exit code 1, not a usage error).
            parse_store_spec(store)
        except ValueError as e:
            raise usage.UsageError(f"--store: {e}") from None
        write_rate = _positive_rate("write-rate", self["write-rate"])
        read_rate = _positive_rate("read-rate", self["read-rate"])
        policy = self["policy"]
        if policy is not None and policy != "open":
            from hsu_registry.security.policy import PolicyError, load_policy

            try:
                load_policy(policy)
            except PolicyError as e:
                raise usage.UsageError(f"--policy: {e}") from None
        self.config = RegistryConfig(
            endpoints=tuple(endpoints) or (DEFAULT_ENDPOINT,),
            stale_after=stale_after,
            expire_after=expire_after,
            cleanup_interval=self._duration("cleanup-interval"),
            drain_timeout=self._duration("drain-timeout"),
            flush_interval=self._duration("flush-interval"),
            max_body_size=_positive_int("max-body-size", self["max-body-size"]),
            max_modules=_positive_int("max-modules", self["max-modules"]),
            store=store,
            access_log=bool(self["access-log"]),
            **self._connection_bounds(),
            freeze_gc=True,
            discover_heartbeat=not self["no-discover-heartbeat"],
            process_binding=not self["no-process-binding"],
            check_concurrency=_positive_int("check-concurrency", self["check-concurrency"]),
            policy=policy,
            check_limits=self._check_limits(),
            watch_limits=self._watch_limits(),
            limits=Limits(
                max_registration_size=_positive_int(
                    "max-registration-size", self["max-registration-size"]
                )
            ),
            quotas=Quotas(
                write_rate=write_rate,
                write_burst=max(1, int(write_rate * 4)),
                read_rate=read_rate,
                read_burst=max(1, int(read_rate * 2.5)),
                max_modules=_positive_int(
                    "max-modules-per-identity", self["max-modules-per-identity"]
                ),
                max_metadata_bytes=_positive_int(
                    "max-metadata-per-identity", self["max-metadata-per-identity"]
                ),
            ),
        )

# -*- test-case-name: tests.test_catalog -*-
"""
The catalog's JSON: a registration with its times and state, built by
extending the registration's pre-encoded discover answer rather than encoding
its APIs again.
"""

from __future__ import annotations

import datetime
import json

from hsu_registry.model import Registration
from hsu_registry.processes.table import ProcessIdentity

__all__ = ["module_entry", "rfc3339"]


def rfc3339(seconds: float) -> str:
    """A POSIX time as RFC 3339 UTC with milliseconds: C{2026-11-29T00:58:38.123Z}."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def module_entry(
    registration: Registration,
    last_seen: float,
    now: float,
    stale_after: float,
    bound: ProcessIdentity | None = None,
) -> bytes:
    """
    C{{"moduleID", "apis", "processID", "registeredAt", "lastSeen", "owner",
    "processBound", "state"}} (C{owner}: the principal of the identity that
    created it, C{unknown} when not recorded), C{boundPID} when the registration is bound to
    a process (it is then ready for as long as that process runs) and, when
    the state is not C{ready}, a C{reason}.
    """
    body = registration.discover_body
    tail = (
        f',"processID":{registration.process_id},'
        f'"registeredAt":"{rfc3339(registration.registered_at)}",'
        f'"lastSeen":"{rfc3339(last_seen)}",'
        f'"owner":{json.dumps(registration.owner or "unknown")},'
    )
    if bound is not None:
        tail += f'"processBound":true,"boundPID":{bound.pid},'
    else:
        tail += '"processBound":false,'
    if bound is None and now - last_seen > stale_after:
        reason = json.dumps(f"not seen since {rfc3339(last_seen)} (stale after {stale_after:g}s)")
        tail += f'"state":"stale","reason":{reason}}}'
    else:
        tail += '"state":"ready"}'
    return body[:-1] + tail.encode("utf-8")

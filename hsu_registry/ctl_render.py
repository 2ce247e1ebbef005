# -*- test-case-name: tests.test_ctl -*-
"""
What C{hsu-registry-ctl} prints: the registry's answers as aligned tables
for a person, and as the registry's own JSON shapes for C{--json}.  Pure
functions of the answers (and of the time given), so the command's flow in
L{hsu_registry.ctl} stays apart from how it shows things.
"""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence

from hsu_registry.client.model import RegisteredModule, RemoteModuleAPI, ServiceProvider
from hsu_registry.durations import format_duration


def _answer_json(api: RemoteModuleAPI) -> dict[str, object]:
    """An API as the registry answered it: the published shape and its status."""
    out = api.to_json()
    if api.status is not None:
        out["status"] = api.status
    if api.check_output is not None:
        out["checkOutput"] = api.check_output
    return out


def _module_json(module: RegisteredModule) -> dict[str, object]:
    """A catalog entry as the registry answered it (C{GET /api/v1/modules})."""
    out: dict[str, object] = {
        "moduleID": module.module_id,
        "apis": [_answer_json(api) for api in module.apis],
        "processID": module.process_id,
        "registeredAt": _rfc3339(module.registered_at),
        "lastSeen": _rfc3339(module.last_seen),
    }
    if module.owner is not None:
        out["owner"] = module.owner
    out["processBound"] = module.process_bound
    if module.process_bound and module.bound_pid is not None:
        out["boundPID"] = module.bound_pid
    out["state"] = module.state
    if module.reason is not None:
        out["reason"] = module.reason
    return out


def _provider_json(provider: ServiceProvider) -> dict[str, object]:
    """A provider as the registry answered it (C{GET /api/v1/services/{serviceID}})."""
    return {
        "moduleID": provider.module_id,
        "processID": provider.process_id,
        "apis": [_answer_json(api) for api in provider.apis],
        "state": provider.state,
    }


def _rfc3339(moment: datetime.datetime) -> str:
    """The registry's own time format: RFC 3339 UTC with milliseconds."""
    utc = moment.astimezone(datetime.timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns of text lined up under their headings, two spaces apart."""
    lines = [header, *rows]
    widths = [max(len(row[column]) for row in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )


def _metadata_text(api: RemoteModuleAPI) -> str:
    return ",".join(f"{k}={v}" for k, v in (api.metadata or {}).items()) or "-"


def _apis_table(module_id: str, apis: Sequence[RemoteModuleAPI]) -> str:
    if not apis:
        return f"module {module_id} publishes no APIs"
    header: tuple[str, ...] = ("PROTOCOL", "PORT", "ADDRESS", "SERVICES", "METADATA")
    checked = any(api.status is not None for api in apis)
    if checked:
        header += ("STATUS",)
    rows = [
        (
            api.protocol,
            str(api.server_port),
            api.address or "-",
            ",".join(api.service_ids),
            _metadata_text(api),
        )
        + ((api.status or "-",) if checked else ())
        for api in apis
    ]
    return _table(header, rows)


def _none_passing(module_id: str, apis: Sequence[RemoteModuleAPI]) -> str:
    """
    Why C{discover --passing} found nothing: the module publishes no APIs,
    or (told apart, as it means wait or look at the checks) none passes yet.
    """
    if not apis:
        return f"module {module_id} publishes no APIs"
    statuses = Counter(api.status or "unchecked" for api in apis)
    if len(statuses) == 1:
        summary = next(iter(statuses))
    else:
        summary = ", ".join(f"{number} {status}" for status, number in statuses.items())
    label = "status" if len(apis) == 1 else "statuses"
    return (
        f"module {module_id} has {_count(len(apis), 'API')} "
        f"but none is passing yet ({label}: {summary})"
    )


def _process_text(process_id: int, bound: bool = False, bound_pid: int | None = None) -> str:
    """A registration's process: '-' for none (0), and whether it lives with it."""
    text = str(process_id) if process_id else "-"
    if bound:
        text += " (bound)" if bound_pid in (None, process_id) else f" (bound to {bound_pid})"
    return text


def _modules_table(modules: Sequence[RegisteredModule], now: datetime.datetime) -> str:
    """
    The catalog, one module a line; its APIs as C{service@port/protocol}
    (one per service served), its age since it first registered, and the
    state last, as a stale module's reason can be long.
    """
    if not modules:
        return "no modules registered"
    header = ("MODULE", "PROCESS", "OWNER", "APIS", "AGE", "STATE")
    rows = [
        (
            module.module_id,
            _process_text(module.process_id, module.process_bound, module.bound_pid),
            module.owner or "-",
            ",".join(
                f"{service}@{api.server_port}/{api.protocol}"
                for api in module.apis
                for service in api.service_ids
            )
            or "-",
            format_duration((now - module.registered_at).total_seconds()),
            f"{module.state}: {module.reason}" if module.reason else module.state,
        )
        for module in modules
    ]
    return _table(header, rows)


def _providers_table(providers: Sequence[ServiceProvider]) -> str:
    """A service's providers, one line for each of their APIs that serves it."""
    header: tuple[str, ...] = ("MODULE", "PROCESS", "STATE", "PROTOCOL", "PORT", "ADDRESS")
    header += ("METADATA",)
    checked = any(api.status is not None for provider in providers for api in provider.apis)
    if checked:
        header += ("STATUS",)
    rows = [
        (
            provider.module_id,
            _process_text(provider.process_id),
            provider.state,
            api.protocol,
            str(api.server_port),
            api.address or "-",
            _metadata_text(api),
        )
        + ((api.status or "-",) if checked else ())
        for provider in providers
        for api in provider.apis
    ]
    return _table(header, rows)


# -- running -----------------------------------------------------------------

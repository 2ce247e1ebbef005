# -*- test-case-name: tests.test_client -*-
"""
The registry's HTTP protocol without I/O: the request each client method
makes, and how an answer becomes a result or a typed error.  The Twisted
client and the blocking client both use it, so they behave the same.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from attrs import frozen

from hsu_registry.client.errors import (
    ModuleNotFound,
    RegistryError,
    RegistryRejected,
    RegistryUnavailable,
)
from hsu_registry.client.model import (
    RegisteredModule,
    RemoteAPI,
    RemoteModuleAPI,
    ServiceProvider,
)
from hsu_registry.durations import parse_duration
from hsu_registry.errors import InvalidRequest
from hsu_registry.model import validate_id

__all__ = [
    "Call",
    "Health",
    "discover_call",
    "health_call",
    "heartbeat_call",
    "modules_call",
    "publish_call",
    "services_call",
    "unpublish_call",
]


@frozen
class Health:
    """The registry's health answer."""

    status: str
    registered_modules: int
    total_apis: int
    uptime: str
    #: The daemon's version (None from a registry that does not say, as the original).
    version: str | None = None

    @property
    def uptime_seconds(self) -> float:
        return parse_duration(self.uptime)


@frozen
class Call:
    """One request to the registry: method, path (already encoded) and body."""

    operation: str
    method: str
    path: str
    body: bytes | None = None
    module_id: str | None = None

    def interpret(self, status: int, body: bytes) -> Any:
        """
        Turn an answer into the operation's result.

        @raise RegistryError: the typed error for anything but success.
        """
        parsed = _json(body)
        if status == 200:
            if parsed is _INVALID:
                raise RegistryUnavailable(f"the registry's {self.operation} answer is not JSON")
            try:
                return _RESULTS[self.operation](self, parsed)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise RegistryUnavailable(
                    f"the registry's {self.operation} answer is malformed: {e}"
                ) from None
        message, context = _error(parsed, status)
        if (
            status == 404
            and self.operation in ("discover", "heartbeat")
            and message == "module not found"
        ):
            assert self.module_id is not None
            raise ModuleNotFound(self.module_id)
        if 400 <= status < 500:
            raise RegistryRejected(message, status, context)
        raise RegistryUnavailable(message, status, context)


_INVALID = object()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return _INVALID


def _error(parsed: Any, status: int) -> tuple[str, dict[str, Any]]:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        context = parsed.get("context")
        return parsed["error"], context if isinstance(context, dict) else {}
    return f"the registry answered HTTP {status}", {}


def _nothing(call: Call, parsed: Any) -> None:
    return None


def _apis(call: Call, parsed: Any) -> list[RemoteModuleAPI]:
    return [RemoteModuleAPI.from_json(api) for api in parsed["apis"]]


def _health(call: Call, parsed: Any) -> Health:
    return Health(
        status=str(parsed["status"]),
        registered_modules=int(parsed["registeredModules"]),
        total_apis=int(parsed["totalAPIs"]),
        uptime=str(parsed["uptime"]),
        version=str(parsed["version"]) if parsed.get("version") is not None else None,
    )


def _modules(call: Call, parsed: Any) -> list[RegisteredModule]:
    return [RegisteredModule.from_json(entry) for entry in parsed["modules"]]


def _providers(call: Call, parsed: Any) -> list[ServiceProvider]:
    return [ServiceProvider.from_json(entry) for entry in parsed["providers"]]


_RESULTS = {
    "publish": _nothing,
    "unpublish": _nothing,
    "heartbeat": _nothing,
    "discover": _apis,
    "health": _health,
    "modules": _modules,
    "services": _providers,
}


def _segment(module_id: str) -> str:
    """
    The module ID as a URL path segment.

    @raise ValueError: for an ID the registry could never have accepted.
    """
    try:
        validate_id(module_id, "module_id")
    except InvalidRequest as e:
        raise ValueError(e.message) from None
    return quote(module_id, safe="")


def check_timeout(timeout: float) -> float:
    """
    @raise ValueError: unless C{timeout} is a number of seconds in (0, 86400].
    """
    if not 0 < timeout <= 86400:  # also refuses NaN
        raise ValueError(f"timeout must be more than 0 and at most 86400 seconds, not {timeout!r}")
    return float(timeout)


def publish_call(remote_api: RemoteAPI, process_id: int) -> Call:
    body = json.dumps(remote_api.publish_body(process_id), separators=(",", ":")).encode()
    return Call("publish", "POST", "/api/v1/publish", body, remote_api.module_id)


def discover_call(module_id: str, passing: bool = False) -> Call:
    path = f"/api/v1/discover/{_segment(module_id)}"
    if passing:
        path += "?passing=true"
    return Call("discover", "GET", path, None, module_id)


def unpublish_call(module_id: str, process_id: int | None) -> Call:
    path = f"/api/v1/unpublish/{_segment(module_id)}"
    if process_id is not None:
        path += f"?processID={int(process_id)}"
    return Call("unpublish", "DELETE", path, None, module_id)


def heartbeat_call(module_id: str, process_id: int | None) -> Call:
    path = f"/api/v1/heartbeat/{_segment(module_id)}"
    if process_id is not None:
        path += f"?processID={int(process_id)}"
    return Call("heartbeat", "PUT", path, None, module_id)


def health_call() -> Call:
    return Call("health", "GET", "/api/v1/health")


def modules_call() -> Call:
    """The catalog request: every registration."""
    return Call("modules", "GET", "/api/v1/modules")


def services_call(service_id: str, passing: bool = False) -> Call:
    """
    The request for the providers of C{service_id}.

    @raise ValueError: for a service ID the registry could never have accepted.
    """
    try:
        validate_id(service_id, "service_id")
    except InvalidRequest as e:
        raise ValueError(e.message) from None
    path = f"/api/v1/services/{quote(service_id, safe='')}"
    if passing:
        path += "?passing=true"
    return Call("services", "GET", path)


def unavailable(address: str, reason: object) -> RegistryError:
    """The error for a registry that could not be reached."""
    return RegistryUnavailable(f"registry at {address} is unavailable: {reason}")

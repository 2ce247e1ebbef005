# -*- test-case-name: tests.test_client_model -*-
"""
The client's view of registrations, as the seed's Go client names them:
L{RemoteAPI} (a module and its APIs) and L{RemoteModuleAPI} (one endpoint);
and of the catalog's answers: L{RegisteredModule} (one registration) and
L{ServiceProvider} (a module serving a service).

They are validated on construction with the server's own rules, so a record
that can be built can be published.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from hsu_registry.errors import InvalidRequest
from hsu_registry.model import STATUSES, ModuleAPI, parse_api, validate_id

__all__ = ["RegisteredModule", "RemoteAPI", "RemoteModuleAPI", "ServiceProvider"]


def _service_ids(value: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _metadata(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    if not value:
        return None
    return MappingProxyType(dict(value))


def _check(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if value is None:
        return None
    return MappingProxyType(dict(value))


@frozen
class RemoteModuleAPI:
    """
    One API endpoint a module serves.

    C{check} asks the registry to check it, as the publish body's C{check}
    object: C{{"tcp": True}} or C{{"http": "/healthz"}}, with optional
    C{"interval"} and C{"timeout"} durations such as C{"10s"}.  C{status} is
    what the registry last found (C{unknown}, C{passing} or C{critical}) and
    C{check_output} what that check said, in answers only; neither is ever
    published.

    @raise ValueError: on construction, when the server would refuse it.
    """

    service_ids: tuple[str, ...] = field(converter=_service_ids)
    server_port: int
    protocol: str
    address: str | None = None
    metadata: Mapping[str, str] | None = field(default=None, converter=_metadata, hash=False)
    check: Mapping[str, Any] | None = field(default=None, converter=_check, hash=False)
    status: str | None = None
    check_output: str | None = None

    def __attrs_post_init__(self) -> None:
        try:
            parse_api(self.to_json(), "api")
        except InvalidRequest as e:
            raise ValueError(e.message) from None

    def to_json(self) -> dict[str, Any]:
        """The publish body's shape, with empty optional fields omitted."""
        out = ModuleAPI(
            service_ids=self.service_ids,
            server_port=self.server_port,
            protocol=self.protocol,
            address=self.address,
            metadata=tuple((self.metadata or {}).items()),
        ).to_json()
        if self.check is not None:
            out["check"] = dict(self.check)
        return out

    @classmethod
    def from_json(cls, raw: Any) -> RemoteModuleAPI:
        """
        Read one API entry of a discover answer.

        @raise ValueError: when it is not a valid entry.
        """
        try:
            api = parse_api(raw, "api")
        except InvalidRequest as e:
            raise ValueError(e.message) from None
        status = raw.get("status") if isinstance(raw, Mapping) else None
        output = raw.get("checkOutput") if isinstance(raw, Mapping) else None
        return cls(
            service_ids=api.service_ids,
            server_port=api.server_port,
            protocol=api.protocol,
            address=api.address,
            metadata=dict(api.metadata) or None,
            check=api.check.to_json() if api.check is not None else None,
            status=status if status in STATUSES else None,
            check_output=output if isinstance(output, str) else None,
        )


def _api_tuple(value: Iterable[RemoteModuleAPI]) -> tuple[RemoteModuleAPI, ...]:
    return tuple(value)


@frozen
class RemoteAPI:
    """
    A module and the APIs it publishes.

    @raise ValueError: on construction, when the server would refuse it.
    """

    module_id: str
    apis: tuple[RemoteModuleAPI, ...] = field(converter=_api_tuple)

    def __attrs_post_init__(self) -> None:
        try:
            validate_id(self.module_id, "module_id")
        except InvalidRequest as e:
            raise ValueError(e.message) from None
        for api in self.apis:
            if not isinstance(api, RemoteModuleAPI):
                raise ValueError("apis must be RemoteModuleAPI instances")

    def publish_body(self, process_id: int) -> dict[str, Any]:
        """The JSON body of a publish request for this module."""
        return {
            "moduleID": self.module_id,
            "processID": process_id,
            "apis": [api.to_json() for api in self.apis],
        }


def _integer(raw: Mapping[str, Any], key: str) -> int:
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer")
    return value


def _text(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


def _moment(raw: Mapping[str, Any], key: str) -> datetime.datetime:
    text = _text(raw, key)
    if text.endswith("Z"):  # Python 3.10's fromisoformat does not read it
        text = text[:-1] + "+00:00"
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{key} has no time zone")
    return moment.astimezone(datetime.timezone.utc)


def _answered_apis(raw: Mapping[str, Any]) -> tuple[RemoteModuleAPI, ...]:
    apis = raw["apis"]
    if not isinstance(apis, list):
        raise ValueError("apis must be a list")
    return tuple(RemoteModuleAPI.from_json(api) for api in apis)


@frozen
class RegisteredModule:
    """
    One registration of the registry's catalog (C{GET /api/v1/modules}): a
    module's APIs with who registered it, when, and whether it is still
    considered alive, so an operator can see the whole registry at once.

    C{state} is C{ready}, or C{stale} with a C{reason}; C{bound_pid} is the
    process the registration lives with when C{process_bound}.
    """

    module_id: str
    apis: tuple[RemoteModuleAPI, ...] = field(converter=_api_tuple)
    process_id: int
    registered_at: datetime.datetime
    last_seen: datetime.datetime
    state: str
    reason: str | None = None
    process_bound: bool = False
    bound_pid: int | None = None
    #: The identity that owns the registration (C{uid:1000}, C{x509:...}).
    owner: str | None = None

    @classmethod
    def from_json(cls, raw: Any) -> RegisteredModule:
        """
        Read one entry of the catalog answer.

        @raise ValueError: when it is not a valid entry.
        """
        if not isinstance(raw, Mapping):
            raise ValueError("a catalog entry must be an object")
        reason = raw.get("reason")
        bound_pid = raw.get("boundPID")
        owner = raw.get("owner")
        return cls(
            module_id=_text(raw, "moduleID"),
            apis=_answered_apis(raw),
            process_id=_integer(raw, "processID"),
            registered_at=_moment(raw, "registeredAt"),
            last_seen=_moment(raw, "lastSeen"),
            state=_text(raw, "state"),
            reason=reason if isinstance(reason, str) else None,
            process_bound=raw.get("processBound") is True,
            bound_pid=bound_pid if isinstance(bound_pid, int) else None,
            owner=owner if isinstance(owner, str) else None,
        )


@frozen
class ServiceProvider:
    """
    A module serving a service (C{GET /api/v1/services/{serviceID}}): the
    module, its process, its state (C{ready} or C{stale}) and those of its
    APIs that serve the service, for callers that look up what they need
    rather than who provides it.
    """

    module_id: str
    process_id: int
    apis: tuple[RemoteModuleAPI, ...] = field(converter=_api_tuple)
    state: str

    @classmethod
    def from_json(cls, raw: Any) -> ServiceProvider:
        """
        Read one provider of a service answer.

        @raise ValueError: when it is not a valid provider.
        """
        if not isinstance(raw, Mapping):
            raise ValueError("a provider must be an object")
        return cls(
            module_id=_text(raw, "moduleID"),
            process_id=_integer(raw, "processID"),
            apis=_answered_apis(raw),
            state=_text(raw, "state"),
        )

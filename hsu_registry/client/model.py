# -*- test-case-name: tests.test_client_model -*-
"""
The client's view of registrations, as the seed's Go client names them:
L{RemoteAPI} (a module and its APIs) and L{RemoteModuleAPI} (one endpoint).

They are validated on construction with the server's own rules, so a record
that can be built can be published.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from hsu_registry.errors import InvalidRequest
from hsu_registry.model import STATUSES, ModuleAPI, parse_api, validate_id

__all__ = ["RemoteAPI", "RemoteModuleAPI"]


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

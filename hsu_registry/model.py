# -*- test-case-name: tests.test_model -*-
"""
The data model: frozen records for API entries and registrations, the
validation of publish bodies, and the JSON encoding of answers.

Parsing follows the Go original's decoder where existing clients depend on it
(object keys matched case-insensitively, unknown keys ignored, ``null`` for an
optional field meaning absent) and is strict everywhere else: every string is
bounded, every number typed, and every ID must be addressable through the URL
API, so nothing that publish accepts can become unreachable.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from hsu_registry.checks.spec import CheckSpec, parse_check
from hsu_registry.errors import InvalidRequest

__all__ = [
    "CRITICAL",
    "DEFAULT_CHECK_HOST",
    "PASSING",
    "STATUSES",
    "UNKNOWN",
    "UNKNOWN_OWNER",
    "CheckTarget",
    "Limits",
    "ModuleAPI",
    "PlainRegistration",
    "PublishRequest",
    "Registration",
    "RegistrationTooLarge",
    "encode_discover",
    "encode_json",
    "parse_api",
    "parse_process_id",
    "parse_publish_body",
    "validate_id",
]


@frozen
class Limits:
    """
    Every bound on what a publish may contain; the defaults are documented in
    the README and each one is tested.
    """

    max_id_length: int = 256
    max_protocol_length: int = 64
    max_address_length: int = 256
    max_apis: int = 128
    max_service_ids: int = 64
    max_metadata_entries: int = 64
    max_metadata_key_length: int = 128
    max_metadata_value_length: int = 1024
    max_process_id: int = 2**32 - 1
    #: The largest registration, in bytes of its encoded discover answer:
    #: the change log and the watch streams hold registrations, not request
    #: bodies (which --max-body-size bounds).
    max_registration_size: int = 128 * 1024


DEFAULT_LIMITS = Limits()

#: What encoding may add to an API beyond its bytes in the body (a default
#: check interval and timeout, its status): a body this much per API under
#: the registration limit needs no encoding to be measured.
_ENCODING_SLACK_PER_API = 256


class RegistrationTooLarge(InvalidRequest):
    """A publish whose registration would be over L{Limits.max_registration_size}: a 413."""

    status = 413

    def __init__(self, limit: int, size: int | None = None) -> None:
        context: dict[str, int] = {"maxRegistrationSize": limit}
        if size is not None:
            context["size"] = size
        super().__init__(f"the registration is larger than the limit of {limit} bytes", context)


#: The health of an API with a check: not checked yet, last check passed,
#: last check failed.  An API without a check has no status.
UNKNOWN = "unknown"
PASSING = "passing"
CRITICAL = "critical"
STATUSES = (UNKNOWN, PASSING, CRITICAL)

#: Where an API published without an address is checked: the registry's host.
DEFAULT_CHECK_HOST = "127.0.0.1"


@frozen
class CheckTarget:
    """What a health check probes: a host, a port, and how (the check)."""

    host: str
    port: int
    check: CheckSpec


@frozen
class ModuleAPI:
    """
    One API endpoint of a module: the services it serves, where and how.

    ``address`` of L{None} means "the registry's host"; ``metadata`` is a tuple
    of (key, value) pairs in the order published.  An API published with a
    ``check`` carries the C{status} its last check found (L{UNKNOWN} until
    the first) and, once checked, that check's C{output} (``HTTP 503``,
    ``refused``, ``timeout``...: a fixed vocabulary, never bytes from the
    target); one without has neither.
    """

    service_ids: tuple[str, ...]
    server_port: int
    protocol: str
    address: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    check: CheckSpec | None = None
    status: str | None = None
    output: str | None = None

    @property
    def passing(self) -> bool:
        """Whether C{?passing=true} lists it: its check passes, or it has none."""
        return self.check is None or self.status == PASSING

    def check_target(self) -> CheckTarget | None:
        """
        What this API's check probes, or L{None} without a check: two APIs
        with the same target share their status, whatever else differs.
        """
        if self.check is None:
            return None
        return CheckTarget(self.address or DEFAULT_CHECK_HOST, self.server_port, self.check)

    def to_json(self) -> dict[str, Any]:
        """The seed's JSON shape, with empty optional fields omitted."""
        out: dict[str, Any] = {
            "serviceIDs": list(self.service_ids),
            "serverPort": self.server_port,
            "protocol": self.protocol,
        }
        if self.address:
            out["address"] = self.address
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        if self.check is not None:
            out["check"] = self.check.to_json()
            if self.check.ip:
                # The address a named API's checks connect to, resolved once
                # at publish (never re-resolved: see hsu_registry.checks.targets).
                out["checkAddress"] = self.check.ip
            out["status"] = self.status or UNKNOWN
            if self.output:
                out["checkOutput"] = self.output
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModuleAPI:
        """Read back an entry that L{to_json} wrote (no validation: it was validated then)."""
        return cls(
            service_ids=tuple(raw["serviceIDs"]),
            server_port=raw["serverPort"],
            protocol=raw["protocol"],
            address=raw.get("address"),
            metadata=tuple(raw.get("metadata", {}).items()),
            check=CheckSpec.from_json(raw["check"], ip=raw.get("checkAddress"))
            if "check" in raw
            else None,
            status=raw.get("status"),
            output=raw.get("checkOutput"),
        )


@frozen
class PublishRequest:
    """A validated publish body."""

    module_id: str
    process_id: int
    apis: tuple[ModuleAPI, ...]


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, as Go's encoder writes it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_discover(module_id: str, apis: tuple[ModuleAPI, ...]) -> bytes:
    """The body of a discover answer, encoded once per registration."""
    return encode_json({"moduleID": module_id, "apis": [api.to_json() for api in apis]})


# A registration as the registry and the memory store hold it: (module ID,
# process ID, registration time, discover answer, number of APIs, owner).  Only
# atomic values, so the cyclic garbage collector stops tracking each one at
# its first collection, and full collections stay short however many modules
# are registered; the APIs live in the encoded discover answer.
PlainRegistration = tuple[str, int, float, bytes, int, str]

#: The owner of a registration whose creator is not known (stored before
#: owners were recorded): the first identity allowed to publish it claims it.
UNKNOWN_OWNER = ""


@frozen
class Registration:
    """
    A module's registration.

    Its APIs are kept once, encoded as the discover answer (which discovery
    serves as it is); L{apis} decodes them.  The registry keeps the mutable
    last-seen time beside the record, so a heartbeat allocates nothing.
    """

    module_id: str
    process_id: int
    registered_at: float
    discover_body: bytes = field(repr=False)
    api_count: int
    #: The principal of the identity that created it (see
    #: hsu_registry.security.identity): only it, or an admin, may change it.
    owner: str = UNKNOWN_OWNER

    @classmethod
    def create(
        cls,
        module_id: str,
        process_id: int,
        apis: tuple[ModuleAPI, ...],
        registered_at: float,
        owner: str = UNKNOWN_OWNER,
    ) -> Registration:
        """A registration of C{apis}, encoding its discover answer."""
        return cls(
            module_id,
            process_id,
            registered_at,
            encode_discover(module_id, apis),
            len(apis),
            owner,
        )

    @property
    def has_checks(self) -> bool:
        """
        Whether any API has a health check, without decoding the APIs:
        C{"check":{} can only be the key of an API's check object (metadata
        values are strings, and a quote inside one is escaped).
        """
        return b'"check":{' in self.discover_body

    @property
    def apis(self) -> tuple[ModuleAPI, ...]:
        """The APIs, decoded from the discover answer at each access."""
        return tuple(ModuleAPI.from_json(raw) for raw in json.loads(self.discover_body)["apis"])

    def plain(self) -> PlainRegistration:
        """This record in the form the registry holds (see L{PlainRegistration})."""
        return (
            self.module_id,
            self.process_id,
            self.registered_at,
            self.discover_body,
            self.api_count,
            self.owner,
        )

    @classmethod
    def from_plain(cls, plain: PlainRegistration) -> Registration:
        return cls(*plain)


# -- parsing -----------------------------------------------------------------


def _fold(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Key lookup the way Go's encoding/json matches fields: case-insensitive, last wins."""
    return {key.lower(): value for key, value in obj.items()}


def _check_text(value: str, what: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode (lone surrogate)") from None


def validate_id(value: Any, what: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """
    Check a module or service ID: a string of 1 to ``max_id_length``
    characters that survives a trip through a URL path segment, so no ``/``,
    no whitespace or control characters, and not ``.`` or ``..``.
    """
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    if not value:
        raise InvalidRequest(f"{what} must not be empty")
    if len(value) > limits.max_id_length:
        raise InvalidRequest(f"{what} is longer than {limits.max_id_length} characters")
    _check_text(value, what)
    if value in (".", ".."):
        raise InvalidRequest(f"{what} must not be '.' or '..'")
    for char in value:
        if char == "/" or char.isspace() or unicodedata.category(char) in ("Cc", "Cf"):
            raise InvalidRequest(
                f"{what} contains {char!r}; IDs may not contain '/', "
                "whitespace or control characters"
            )
    return value


# Unicode's control characters (category Cc) are exactly these: a regular
# expression scans a large value in C, where a per-character category lookup
# cost about 110 ms per MB of metadata on the reactor.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _bounded_text(value: Any, what: str, max_length: int, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    if not value and not allow_empty:
        raise InvalidRequest(f"{what} must not be empty")
    if len(value) > max_length:
        raise InvalidRequest(f"{what} is longer than {max_length} characters")
    _check_text(value, what)
    if _CONTROL.search(value):
        raise InvalidRequest(f"{what} contains control characters")
    return value


def _integer(value: Any, what: str) -> int:
    # bool is an int subclass, and 50051.0 is a float: Go refuses both.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{what} must be an integer")
    return value


def parse_api(raw: Any, where: str, limits: Limits = DEFAULT_LIMITS) -> ModuleAPI:
    """Validate one API entry (a decoded JSON object) into a L{ModuleAPI}."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object")
    obj = _fold(raw)

    service_ids = obj.get("serviceids")
    if service_ids is None:
        raise InvalidRequest(f"{where}.serviceIDs is required")
    if not isinstance(service_ids, list):
        raise InvalidRequest(f"{where}.serviceIDs must be a list of strings")
    if not service_ids:
        raise InvalidRequest(f"{where}.serviceIDs must not be empty")
    if len(service_ids) > limits.max_service_ids:
        raise InvalidRequest(f"{where}.serviceIDs has more than {limits.max_service_ids} entries")
    sids = tuple(
        validate_id(sid, f"{where}.serviceIDs[{i}]", limits) for i, sid in enumerate(service_ids)
    )

    port = obj.get("serverport")
    if port is None:
        raise InvalidRequest(f"{where}.serverPort is required")
    port = _integer(port, f"{where}.serverPort")
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"{where}.serverPort must be between 1 and 65535")

    protocol = obj.get("protocol")
    if protocol is None:
        raise InvalidRequest(f"{where}.protocol is required")
    protocol = _bounded_text(protocol, f"{where}.protocol", limits.max_protocol_length)

    address = obj.get("address")
    if address is not None:
        address = (
            _bounded_text(address, f"{where}.address", limits.max_address_length, allow_empty=True)
            or None
        )

    metadata: tuple[tuple[str, str], ...] = ()
    raw_meta = obj.get("metadata")
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise InvalidRequest(f"{where}.metadata must be an object of strings")
        if len(raw_meta) > limits.max_metadata_entries:
            raise InvalidRequest(
                f"{where}.metadata has more than {limits.max_metadata_entries} entries"
            )
        metadata = tuple(
            (
                _bounded_text(key, f"{where}.metadata key", limits.max_metadata_key_length),
                _bounded_text(
                    value,
                    f"{where}.metadata[{key!r}]",
                    limits.max_metadata_value_length,
                    allow_empty=True,
                ),
            )
            for key, value in raw_meta.items()
        )

    check = parse_check(obj.get("check"), f"{where}.check")
    return ModuleAPI(
        service_ids=sids,
        server_port=port,
        protocol=protocol,
        address=address,
        metadata=metadata,
        check=check,
        status=UNKNOWN if check is not None else None,
    )


def _last_wins_in_order(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """
    Build an object whose keys stand in the order of their last occurrence, so
    that folding keys case-insensitively lets the last one in the document win,
    as Go's decoder does.
    """
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.pop(key, None)
        obj[key] = value
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_publish_body(body: bytes, limits: Limits = DEFAULT_LIMITS) -> PublishRequest:
    """
    Validate a publish body into a L{PublishRequest}.

    @raise InvalidRequest: naming the first field that is wrong.
    @raise RegistrationTooLarge: when the registration would be over
        C{limits.max_registration_size}.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not UTF-8 (byte {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        raw = json.loads(
            text, parse_constant=_refuse_constant, object_pairs_hook=_last_wins_in_order
        )
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    except ValueError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest("request body must be a JSON object")
    obj = _fold(raw)

    if obj.get("moduleid") is None:
        raise InvalidRequest("moduleID is required")
    module_id = validate_id(obj["moduleid"], "moduleID", limits)

    process_id = obj.get("processid")
    if process_id is None:
        process_id = 0
    process_id = _integer(process_id, "processID")
    if not 0 <= process_id <= limits.max_process_id:
        raise InvalidRequest(f"processID must be between 0 and {limits.max_process_id}")

    # Go's client sends ``"apis": null`` for a module with no APIs (a nil
    # slice), and the original registers it: null, like absent, is none.
    apis = obj.get("apis")
    if apis is None:
        apis = []
    if not isinstance(apis, list):
        raise InvalidRequest("apis must be a list")
    if len(apis) > limits.max_apis:
        raise InvalidRequest(f"apis has more than {limits.max_apis} entries")
    parsed = tuple(parse_api(api, f"apis[{i}]", limits) for i, api in enumerate(apis))
    if len(body) + _ENCODING_SLACK_PER_API * len(parsed) > limits.max_registration_size:
        size = len(encode_discover(module_id, parsed))
        if size > limits.max_registration_size:
            raise RegistrationTooLarge(limits.max_registration_size, size)
    return PublishRequest(module_id=module_id, process_id=process_id, apis=parsed)


def parse_process_id(values: list[bytes] | None, limits: Limits = DEFAULT_LIMITS) -> int | None:
    """
    Parse the optional ``processID`` query parameter: L{None} when absent.

    @raise InvalidRequest: when repeated, not a decimal integer, or out of range.
    """
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest("processID is given more than once")
    raw = values[0]
    if not raw.isdigit() or len(raw) > 10:
        raise InvalidRequest(
            "processID must be a non-negative integer",
            {"processID": raw.decode("utf-8", "replace")},
        )
    value = int(raw)
    if value > limits.max_process_id:
        raise InvalidRequest(f"processID must be between 0 and {limits.max_process_id}")
    return value

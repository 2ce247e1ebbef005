# -*- test-case-name: tests.test_checks -*-
"""
The ``check`` object of an API entry: what to probe (a TCP connect or an HTTP
GET of a path), how often, and how long a probe may take.

Validation is strict and names the offending field, because a check that the
registry silently misreads would mark a healthy service critical.
"""

from __future__ import annotations

from typing import Any

from attrs import evolve, field, frozen
from attrs.validators import in_

from hsu_registry.durations import parse_duration
from hsu_registry.errors import InvalidRequest

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_TIMEOUT",
    "MAX_HTTP_PATH_LENGTH",
    "MAX_INTERVAL",
    "MAX_TIMEOUT",
    "MIN_INTERVAL",
    "MIN_TIMEOUT",
    "CheckSpec",
    "go_duration",
    "parse_check",
]

DEFAULT_INTERVAL = 10.0
"""Seconds between checks when ``interval`` is omitted."""
MIN_INTERVAL = 1.0
MAX_INTERVAL = 3600.0
DEFAULT_TIMEOUT = 1.0
"""Seconds a check may take when ``timeout`` is omitted."""
MIN_TIMEOUT = 0.01
MAX_TIMEOUT = 60.0
MAX_HTTP_PATH_LENGTH = 1024

_KEYS = ("tcp", "http", "interval", "timeout")
_NS = 1_000_000_000


def go_duration(seconds: float) -> str:
    """
    Format seconds the way Go's ``Duration.String`` does, to the nanosecond:
    ``500ms``, ``1.5s``, ``1m30s``, ``1h0m0s``.

    Unlike L{hsu_registry.durations.format_duration} it keeps fractions, so
    that sub-second check timeouts survive a trip through JSON.
    """
    ns = round(seconds * _NS)
    if ns <= 0:
        return "0s"
    if ns < _NS:
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return _fraction(ns, size) + unit
    hours, rest = divmod(ns, 3600 * _NS)
    minutes, rest = divmod(rest, 60 * _NS)
    text = _fraction(rest, _NS) + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def _fraction(value: int, size: int) -> str:
    whole, frac = divmod(value, size)
    if not frac:
        return str(whole)
    digits = str(frac).rjust(len(str(size)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


@frozen
class CheckSpec:
    """
    An active health check of one API: a TCP connect (C{path} is L{None}) or
    an HTTP GET of C{path}, every C{interval} seconds (counted from the end of
    the previous check), critical when it fails or takes over C{timeout}.

    C{ip} is the address checks connect to when the API's address is a host
    name (or a non-canonical IPv6 literal): the registry resolves the name
    once, when the API is published, and pins the answer here (see
    L{hsu_registry.checks.targets.CheckTargets.vet}), so that later checks
    never look the name up again.  It is never read from a publish body, is
    not part of the C{check} object (L{to_json}), and does not take part in
    equality: the same check of the same place keeps its status whatever the
    name resolved to.
    """

    kind: str = field(validator=in_(("tcp", "http")))
    path: str | None
    interval: float
    timeout: float
    ip: str | None = field(default=None, eq=False)

    def pinned(self, ip: str | None) -> CheckSpec:
        """This check, connecting to C{ip} (L{None}: to the API's address)."""
        return self if ip == self.ip else evolve(self, ip=ip)

    def to_json(self) -> dict[str, Any]:
        """The normalized JSON form, which L{parse_check} reads back unchanged."""
        out: dict[str, Any] = {"tcp": True} if self.kind == "tcp" else {"http": self.path}
        out["interval"] = go_duration(self.interval)
        out["timeout"] = go_duration(self.timeout)
        return out

    @classmethod
    def from_json(cls, raw: Any, ip: str | None = None) -> CheckSpec:
        """
        Read back what L{to_json} wrote.

        @param ip: the pinned address (L{ip}), which the C{check} object does
            not carry: whoever stores it beside the object passes it back.
        @raise InvalidRequest: when C{raw} is not a valid check (L{None} included).
        """
        spec = parse_check(raw, "check")
        if spec is None:
            raise InvalidRequest("check must be an object, not null")
        return spec.pinned(ip if isinstance(ip, str) and ip else None)


def parse_check(raw: Any, where: str) -> CheckSpec | None:
    """
    Validate the decoded ``check`` object of an API entry.

    Keys are matched case-insensitively and a ``null`` value means absent, as
    everywhere in a publish body; unknown keys are refused so that a typo
    (``"intervall"``) does not silently fall back to a default.

    @param raw: the decoded JSON value; L{None} means "no check".
    @param where: the field's position for messages, e.g. C{apis[0].check}.
    @return: the check, or L{None} for no check.
    @raise InvalidRequest: naming the offending field.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object (or null for no check)")
    obj: dict[str, Any] = {}
    for key, value in raw.items():
        if key.lower() not in _KEYS:
            raise InvalidRequest(
                f"{where} has unknown key {key!r}; allowed keys: {', '.join(_KEYS)}"
            )
        obj[key.lower()] = value
    tcp, http = obj.get("tcp"), obj.get("http")
    if tcp is None and http is None:
        raise InvalidRequest(f"{where} needs one of tcp or http")
    if tcp is not None and http is not None:
        raise InvalidRequest(f"{where} may have only one of tcp and http")
    if tcp is not None and tcp is not True:
        raise InvalidRequest(f"{where}.tcp must be true (omit check for no check)")
    path = None if http is None else _http_path(http, f"{where}.http")
    interval = _duration(
        obj.get("interval"), f"{where}.interval", DEFAULT_INTERVAL, MIN_INTERVAL, MAX_INTERVAL
    )
    timeout = _duration(
        obj.get("timeout"), f"{where}.timeout", DEFAULT_TIMEOUT, MIN_TIMEOUT, MAX_TIMEOUT
    )
    if timeout > interval:
        raise InvalidRequest(
            f"{where}.timeout ({go_duration(timeout)}) must not exceed "
            f"the interval ({go_duration(interval)})"
        )
    return CheckSpec(
        kind="tcp" if path is None else "http", path=path, interval=interval, timeout=timeout
    )


def _http_path(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f'{what} must be a path string such as "/healthz"')
    if not value.startswith("/"):
        raise InvalidRequest(f"{what} must start with '/'")
    if len(value) > MAX_HTTP_PATH_LENGTH:
        raise InvalidRequest(f"{what} is longer than {MAX_HTTP_PATH_LENGTH} characters")
    for char in value:
        if not "!" <= char <= "~":
            raise InvalidRequest(
                f"{what} contains {char!r}; use printable ASCII without spaces "
                "(percent-encode anything else)"
            )
    if "#" in value:
        raise InvalidRequest(f"{what} must not contain a fragment ('#')")
    return value


def _duration(value: Any, what: str, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidRequest(f'{what} must be a duration string such as "10s" or "500ms"')
    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise InvalidRequest(f"{what}: {e}") from None
    # Whole nanoseconds, as Go holds them, so that to_json and back is exact.
    seconds = round(seconds * _NS) / _NS
    if not low <= seconds <= high:
        raise InvalidRequest(f"{what} must be between {go_duration(low)} and {go_duration(high)}")
    return seconds

# -*- test-case-name: tests.test_policy -*-
"""
Who may do what: the policy file, and the default without one.

A policy is a list of grants.  Each grant names identities (C{who}) and what
they may do: C{publish} module IDs matching patterns (with service IDs
matching C{services}), C{read} (discover, catalog, services, watch),
C{admin} (change any registration), and C{check_networks} (CIDRs a health
check of theirs may connect to beyond loopback and the host's own
addresses).  Ownership is not in the policy: a registration belongs to the
identity that created it, whatever the policy says (see
L{hsu_registry.registry}).

Without a file, anyone may read and publish (the original's behaviour), the
registry's own uid and root are admins, and ownership holds.  C{--policy=open}
also drops ownership, for those who really want the original's behaviour.

The file is TOML (C{.toml}) or JSON (any other name)::

    [[grant]]
    who = ["group:hsu", "x509:spiffe://example.org/*"]
    publish = ["*"]

    [[grant]]
    who = ["any"]
    read = true

    [[grant]]
    who = ["token:deployer"]
    publish = ["deploy-*"]
    services = ["deploy.*"]
    check_networks = ["10.0.0.0/8"]

    [tokens]
    deployer = "sha256:<hex digest of the token>"

Identities in C{who}: C{any}, C{anonymous}, C{uid:N}, C{user:NAME},
C{gid:N}, C{group:NAME} (the group's members and those whose primary group
it is), C{x509:PATTERN} (a certificate identity; C{*} matches any run of
characters), C{token:NAME}.  Names are resolved once, when the file is
loaded, so no request waits on the user database.
"""

from __future__ import annotations

import grp
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import sys
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any

from attrs import field, frozen

from hsu_registry.security.identity import Identity

__all__ = [
    "DEFAULT_POLICY_NAME",
    "Grant",
    "Network",
    "Policy",
    "PolicyError",
    "default_policy",
    "describe_change",
    "load_policy",
    "open_policy",
    "operator_uids",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_POLICY_NAME = "(default: anyone reads and publishes, owners hold)"


class PolicyError(Exception):
    """The policy file cannot be used; the message says where and why, in one line."""


@frozen
class _Who:
    """One C{who} entry, resolved: what kind of identity it matches, and how."""

    kind: str  # any, anonymous, uid, gid, x509, token
    value: str = ""
    uids: frozenset[int] = frozenset()

    def matches(self, identity: Identity) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "anonymous":
            return identity.anonymous
        if self.kind == "uid":
            return identity.uid is not None and identity.uid in self.uids
        if self.kind == "gid":
            return identity.uid is not None and (
                identity.uid in self.uids or str(identity.gid) == self.value
            )
        if self.kind in ("x509", "token"):
            return identity.kind == self.kind and fnmatchcase(identity.name, self.value)
        return False


@frozen
class Grant:
    """What the identities of C{who} may do."""

    who: tuple[_Who, ...]
    publish: tuple[str, ...] = ()
    services: tuple[str, ...] = ("*",)
    read: bool = False
    admin: bool = False
    check_networks: tuple[Network, ...] = ()

    def applies(self, identity: Identity) -> bool:
        return any(who.matches(identity) for who in self.who)


@frozen
class Policy:
    """
    A loaded policy.  Decisions take an L{Identity} and return at once: no
    I/O, no lookups beyond the grants.

    @ivar source: where it came from (a path, or the default's description).
    @ivar open: ownership is not enforced (C{--policy=open}).
    """

    grants: tuple[Grant, ...]
    source: str
    open: bool = False
    tokens: Mapping[str, str] = field(factory=dict)  # sha256 hex digest -> token name

    def _applying(self, identity: Identity) -> Iterable[Grant]:
        return (grant for grant in self.grants if grant.applies(identity))

    @property
    def everyone_reads(self) -> bool:
        """Whether a grant lets anybody, anonymous included, read (the default)."""
        return any(
            (grant.read or grant.publish or grant.admin)
            and any(who.kind == "any" for who in grant.who)
            for grant in self.grants
        )

    def is_admin(self, identity: Identity) -> bool:
        """Whether C{identity} may change any registration, whoever owns it."""
        return any(grant.admin for grant in self._applying(identity))

    def may_read(self, identity: Identity) -> bool:
        """Whether C{identity} may discover, list and watch (publishing implies it)."""
        return any(grant.read or grant.admin or grant.publish for grant in self._applying(identity))

    def publish_refusal(
        self, identity: Identity, module_id: str, service_ids: Iterable[str]
    ) -> str | None:
        """
        Why C{identity} may not publish C{module_id} serving C{service_ids},
        or L{None} when a grant allows it.
        """
        services = set(service_ids)
        grants = list(self._applying(identity))
        if any(grant.admin for grant in grants):
            return None
        modules = [g for g in grants if any(fnmatchcase(module_id, p) for p in g.publish)]
        if not modules:
            return f"{identity} may not publish module {module_id!r}"
        for grant in modules:
            if all(any(fnmatchcase(s, p) for p in grant.services) for s in services):
                return None
        return f"{identity} may not publish these service IDs as module {module_id!r}"

    def check_networks(self, identity: Identity) -> tuple[Network, ...]:
        """The networks beyond loopback and the host that C{identity}'s checks may reach."""
        networks: list[Network] = []
        for grant in self._applying(identity):
            networks.extend(grant.check_networks)
        return tuple(networks)

    def token_identity(self, token: str) -> Identity | None:
        """The identity a bearer token stands for, or L{None} for an unknown token."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        for known, name in self.tokens.items():
            if hmac.compare_digest(known, digest):
                return Identity("token", name)
        return None

    def describe(self) -> str:
        """One line for the log: where it came from and how many grants it has."""
        if self.open:
            return "open (no ownership: anyone may change any registration)"
        return f"{self.source}: {len(self.grants)} grants, {len(self.tokens)} tokens"


def operator_uids(registry_uid: int | None = None) -> frozenset[int]:
    """Root and the registry's own uid: admins whatever the policy says."""
    return frozenset({0, os.geteuid() if registry_uid is None else registry_uid})


def _admins(registry_uid: int) -> Grant:
    return Grant(who=(_Who("uid", "admin", operator_uids(registry_uid)),), admin=True)


def default_policy(registry_uid: int | None = None) -> Policy:
    """Anyone may read and publish; the registry's own uid and root are admins."""
    uid = os.geteuid() if registry_uid is None else registry_uid
    everyone = Grant(who=(_Who("any"),), publish=("*",), read=True)
    return Policy((everyone, _admins(uid)), DEFAULT_POLICY_NAME)


def open_policy(registry_uid: int | None = None) -> Policy:
    """The original's behaviour: anyone may read, publish and change anything."""
    policy = default_policy(registry_uid)
    return Policy(policy.grants, "open", open=True)


# -- loading -------------------------------------------------------------------

_GRANT_KEYS = {"who", "publish", "services", "read", "admin", "check_networks"}


def load_policy(path: str, registry_uid: int | None = None) -> Policy:
    """
    Read and check the policy file at C{path} (synchronously: at start-up
    and on SIGHUP, never in a request).

    @raise PolicyError: naming the file and the first thing wrong with it.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyError(f"cannot read the policy {path}: {e.strerror or e}") from None
    try:
        data = _parse(path, raw)
    except ValueError as e:
        raise PolicyError(f"the policy {path} is not valid: {e}") from None
    try:
        return _build(data, path, os.geteuid() if registry_uid is None else registry_uid)
    except (ValueError, TypeError, KeyError) as e:
        raise PolicyError(f"the policy {path} is not valid: {e}") from None


def _parse(path: str, raw: bytes) -> Any:
    if path.endswith(".toml"):
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        return tomllib.loads(raw.decode("utf-8"))
    return json.loads(raw)


def _build(data: Any, path: str, registry_uid: int) -> Policy:
    if not isinstance(data, dict):
        raise ValueError("expected a table (object) at the top")
    unknown = set(data) - {"grant", "tokens"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} (expected grant, tokens)")
    grants = data.get("grant", [])
    if not isinstance(grants, list):
        raise ValueError("grant must be a list of tables ([[grant]])")
    built = tuple(_grant(entry, i) for i, entry in enumerate(grants))
    tokens = _tokens(data.get("tokens", {}))
    # The registry's own uid and root stay admins whatever the file says.
    return Policy((*built, _admins(registry_uid)), path, tokens=tokens)


def _grant(entry: Any, index: int) -> Grant:
    where = f"grant {index + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is not a table")
    unknown = set(entry) - _GRANT_KEYS
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
    who = tuple(_who(item, where) for item in _strings(entry.get("who"), f"{where}.who"))
    if not who:
        raise ValueError(f"{where}.who names nobody")
    return Grant(
        who=who,
        publish=_strings(entry.get("publish", []), f"{where}.publish"),
        services=_strings(entry.get("services", ["*"]), f"{where}.services"),
        read=_flag(entry.get("read", False), f"{where}.read"),
        admin=_flag(entry.get("admin", False), f"{where}.admin"),
        check_networks=tuple(
            _network(text, f"{where}.check_networks")
            for text in _strings(entry.get("check_networks", []), f"{where}.check_networks")
        ),
    )


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings")
    return tuple(value)


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false")
    return value


def _network(text: str, where: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a CIDR such as 10.0.0.0/8") from None


def _who(text: str, where: str) -> _Who:
    if text in ("any", "anonymous"):
        return _Who(text)
    kind, sep, value = text.partition(":")
    if not sep or not value:
        raise ValueError(f"{where}.who: {text!r} is not KIND:VALUE (uid, user, gid, group, ...)")
    if kind == "uid":
        return _Who("uid", value, frozenset({_number(value, where)}))
    if kind == "user":
        try:
            return _Who("uid", value, frozenset({pwd.getpwnam(value).pw_uid}))
        except KeyError:
            raise ValueError(f"{where}.who: no user {value!r} on this host") from None
    if kind in ("gid", "group"):
        try:
            group = grp.getgrgid(_number(value, where)) if kind == "gid" else grp.getgrnam(value)
        except KeyError:
            raise ValueError(f"{where}.who: no group {value!r} on this host") from None
        return _Who("gid", str(group.gr_gid), _members(group))
    if kind in ("x509", "token"):
        return _Who(kind, value)
    raise ValueError(f"{where}.who: unknown kind {kind!r} in {text!r}")


def _number(text: str, where: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{where}.who: {text!r} is not a number")
    return int(text)


def _members(group: grp.struct_group) -> frozenset[int]:
    """The uids of a group: its listed members, and those whose primary group it is."""
    uids = set()
    for name in group.gr_mem:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            continue
    uids.update(user.pw_uid for user in pwd.getpwall() if user.pw_gid == group.gr_gid)
    return frozenset(uids)


def _tokens(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError('tokens must be a table of NAME = "sha256:HEX"')
    tokens: dict[str, str] = {}
    for name, digest in value.items():
        if not (isinstance(digest, str) and digest.startswith("sha256:")):
            raise ValueError(f'tokens.{name} must be "sha256:" and the hex digest of the token')
        hexdigest = digest[len("sha256:") :].lower()
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise ValueError(f"tokens.{name} is not a SHA-256 hex digest")
        tokens[hexdigest] = str(name)
    return tokens


def describe_change(before: Policy, after: Policy) -> str:
    """What a reload changed, in one line for the log."""
    if before == after:
        return "no change"
    added = [g for g in after.grants if g not in before.grants]
    removed = [g for g in before.grants if g not in after.grants]
    tokens_added = sorted(set(after.tokens.values()) - set(before.tokens.values()))
    tokens_removed = sorted(set(before.tokens.values()) - set(after.tokens.values()))
    parts = [
        f"grants added for {_whos(added)}" if added else "",
        f"grants removed for {_whos(removed)}" if removed else "",
        f"tokens added: {', '.join(tokens_added)}" if tokens_added else "",
        f"tokens removed: {', '.join(tokens_removed)}" if tokens_removed else "",
    ]
    return "; ".join(p for p in parts if p) or "tokens rotated"


def _whos(grants: Iterable[Grant]) -> str:
    return ", ".join(
        sorted(
            {f"{who.kind}:{who.value}" if who.value else who.kind for g in grants for who in g.who}
        )
    )

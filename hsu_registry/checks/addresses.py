# -*- test-case-name: tests.test_check_targets -*-
"""
Which addresses a health check may connect to.

A check connects to the address its API was published with, so the address
is what an attacker controls (issue 12).  Here it is read strictly (only
canonical IP literals and host names: no C{2130706433}, C{0x7f.1},
C{127.1} or octal forms, which the C library would quietly accept) and
judged: never an unspecified, multicast, link-local (cloud metadata),
broadcast, reserved or IPv4-embedding IPv6 address; loopback and the host's
own addresses by default; anything else only inside networks the policy
grants the registration's identity.

The host's own addresses come from C{/proc/net/fib_trie} (the kernel's
"host LOCAL" routes) and C{/proc/net/if_inet6}: no DNS lookup, nothing that
blocks.  Elsewhere only loopback counts as the host's own.

Pure functions only: L{hsu_registry.checks.targets} applies them at publish
time (and resolves names), L{hsu_registry.checks.service} again before
checking.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from twisted.logger import Logger

__all__ = [
    "Address",
    "AddressRefused",
    "Network",
    "host_addresses",
    "parse_address",
    "refusal",
]

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

log = Logger()

_LOOPBACK: frozenset[Address] = frozenset({IPv4Address("127.0.0.1"), IPv6Address("::1")})

#: The last label of a name that inet_aton would read as a number: a name
#: like this is an IP address in disguise (2130706433, 0x7f.1, 127.1).
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_MAX_NAME = 253

_THIS_NETWORK = IPv4Network("0.0.0.0/8")
_BROADCAST = IPv4Address("255.255.255.255")
#: IPv6 ranges that carry an IPv4 address a translator or tunnel may reach,
#: which would bypass every IPv4 rule here.
_EMBEDDING: tuple[tuple[IPv6Network, str], ...] = (
    (IPv6Network("::/96"), "IPv4-compatible"),
    (IPv6Network("64:ff9b::/96"), "NAT64"),
    (IPv6Network("64:ff9b:1::/48"), "NAT64"),
    (IPv6Network("2002::/16"), "6to4"),
    (IPv6Network("2001::/32"), "Teredo"),
)


class AddressRefused(Exception):
    """
    An address a check may not connect to.

    @ivar reason: why, as a phrase completing "address X ...", such as
        C{"is link-local (where cloud metadata services answer)"}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_address(text: str) -> Address | str:
    """
    Read an API's address as a check would use it.

    @return: the IP address of a canonical literal (an IPv4-mapped IPv6
        address as its IPv4 address, so the IPv4 rules apply to it), or the
        host name, lower case and IDNA-encoded, to be resolved.
    @raise AddressRefused: for a numeric form that is not a canonical IP
        literal, a zone index, brackets, or anything else that is neither an
        IP address nor a host name.
    """
    if not text:
        raise AddressRefused("is empty")
    if "%" in text:
        raise AddressRefused("has a zone index ('%'); give an address without one")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip
    if ":" in text or "[" in text:
        raise AddressRefused("is not a valid IPv6 address (give it without brackets)")
    name = text[:-1] if text.endswith(".") else text
    if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
        raise AddressRefused(
            "is a non-canonical numeric address (hexadecimal, octal, a bare number or "
            "too few parts); write an IPv4 address as four decimal parts, such as 127.0.0.1"
        )
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise AddressRefused("is neither an IP address nor a valid host name") from None
    if len(ascii_name) > _MAX_NAME or not all(
        _LABEL.fullmatch(label) for label in ascii_name.split(".")
    ):
        raise AddressRefused("is neither an IP address nor a valid host name")
    return ascii_name.lower()


def refusal(
    ip: Address,
    principal: str,
    own: Iterable[Address] = _LOOPBACK,
    extra: Sequence[Network] = (),
) -> str | None:
    """
    Why a check of C{principal}'s may not connect to C{ip}, or L{None} when
    it may.

    Never allowed, whatever the policy: unspecified, C{0.0.0.0/8},
    multicast, link-local, broadcast, reserved and IPv4-embedding IPv6
    addresses.  Always allowed: loopback, and the host's own addresses
    (C{own}).  Anything else only inside C{extra}, the networks the policy
    grants C{principal}.

    @param ip: the address, as L{parse_address} returned it.
    @return: a phrase completing "address X ...", or L{None}.
    """
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return (
            "is unspecified (it means every address of this host); "
            "give 127.0.0.1, or leave the address out"
        )
    if isinstance(ip, IPv4Address) and ip in _THIS_NETWORK:
        return "is in 0.0.0.0/8, which names no host"
    if ip.is_multicast:
        return "is a multicast address"
    if ip.is_link_local:
        return "is link-local (where cloud metadata services answer)"
    if ip == _BROADCAST:
        return "is the broadcast address"
    if ip.is_loopback:
        return None
    if isinstance(ip, IPv6Address):
        for network, kind in _EMBEDDING:
            if ip in network:
                return f"embeds an IPv4 address ({kind}); give the IPv4 address"
    if ip.is_reserved:
        return "is a reserved address"
    if ip in own:
        return None
    if any(ip.version == network.version and ip in network for network in extra):
        return None
    kind = "public" if ip.is_global else "private"
    who = principal or "an unknown identity"
    return (
        f"is a {kind} address, which health checks of {who} may not reach "
        "(only loopback, this host's own addresses and networks the policy grants)"
    )


def host_addresses(
    fib_trie: str = "/proc/net/fib_trie", if_inet6: str = "/proc/net/if_inet6"
) -> frozenset[Address]:
    """
    This host's own addresses, as the kernel lists them, without DNS: the
    "/32 host LOCAL" entries of C{fib_trie} and every address of
    C{if_inet6}, plus loopback.  A file that cannot be read counts as empty
    (logged): then only loopback is the host's own.
    """
    found: set[Address] = set(_LOOPBACK)
    found.update(_fib_local(_read(fib_trie)))
    found.update(_inet6(_read(if_inet6)))
    return frozenset(found)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError as e:
        log.warn(
            "Cannot read {path} ({error}): health checks treat only loopback "
            "as this host's own addresses",
            path=path,
            error=str(e),
        )
        return ""


def _fib_local(text: str) -> Iterable[Address]:
    """The addresses of C{/32 host LOCAL} leaves in C{/proc/net/fib_trie}."""
    leaf: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            leaf = stripped[3:].strip()
        elif leaf is not None and stripped.split() == ["/32", "host", "LOCAL"]:
            try:
                yield IPv4Address(leaf)
            except ValueError:
                pass


def _inet6(text: str) -> Iterable[Address]:
    """The addresses of C{/proc/net/if_inet6}: 32 hex digits first on each line."""
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                yield IPv6Address(int(fields[0], 16))
            except ValueError:
                pass

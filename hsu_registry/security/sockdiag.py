# -*- test-case-name: tests.test_identity -*-
"""
The uid behind a loopback TCP connection, from the kernel.

The client's end of a loopback connection is a socket on this host, and the
kernel knows which uid owns it: C{ss -e} shows it, through C{sock_diag}
netlink.  One C{SOCK_DIAG_BY_FAMILY} request names the 4-tuple and gets that
one socket's C{inet_diag_msg} back (about 20 us, however many connections the
host has), so the original's unmodified Go client over TCP gets a real
identity too.  C{/proc/net/tcp} holds the same (8th column) but is a table to
scan, so it is only the fallback where netlink is not allowed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = ["loopback_peer_uid"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_REQUEST = struct.Struct("=BBBBI")  # struct inet_diag_req_v2, before its sockid
_NO_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)
# struct inet_diag_msg: 4 bytes, the 48-byte sockid, expires, rqueue, wqueue, uid.
_UID_OFFSET = _HEADER.size + 4 + 48 + 12


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address.split("%")[0]).packed.ljust(16, b"\0")


def _sock_diag_uid(family: int, peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    sockid = (
        struct.pack("!HH", peer[1], local[1])
        + _packed(peer[0])
        + _packed(local[0])
        + struct.pack("=I", 0)
        + _NO_COOKIE
    )
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    message = _HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as netlink:
        netlink.settimeout(1.0)  # the kernel answers at once; never hang the reactor
        netlink.send(message + request)
        answer = netlink.recv(8192)
    _, kind, _, _, _ = _HEADER.unpack_from(answer)
    if kind == _NLMSG_ERROR or len(answer) < _UID_OFFSET + 4:
        return None
    (uid,) = struct.unpack_from("=I", answer, _UID_OFFSET)
    return int(uid)


def _proc_net_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """The same from /proc/net/tcp and tcp6 (the 8th column of the peer's row)."""
    wanted = {_proc_address(peer[0], peer[1], six) for six in (False, True)}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, "rb") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if fields[1].decode() in wanted and fields[2].decode().endswith(
                        f":{local[1]:04X}"
                    ):
                        return int(fields[7])
        except OSError:
            continue
    return None


def _proc_address(host: str, port: int, six: bool) -> str:
    address = ipaddress.ip_address(host.split("%")[0])
    if six and address.version == 4:
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    elif not six and isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return ""
        address = address.ipv4_mapped
    packed = address.packed
    # /proc prints each 32-bit word in host byte order.
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    text = "".join(word[::-1].hex().upper() for word in words)
    return f"{text}:{port:04X}"


def loopback_peer_uid(peer: tuple[str, int], local: tuple[str, int]) -> int | None:
    """
    The uid owning the client end C{peer} of a loopback TCP connection to
    C{local}; L{None} when the peer is not on loopback or the kernel cannot say.
    """
    try:
        address = ipaddress.ip_address(peer[0].split("%")[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        return _sock_diag_uid(family, peer, local)
    except OSError:
        return _proc_net_uid(peer, local)

# -*- test-case-name: tests.test_identity -*-
"""
The identity of a caller, as the kernel (or a certificate, or a token) says,
never as the caller claims.

- Unix socket: the peer's uid, gid and PID from C{SO_PEERCRED}.
- Loopback TCP: the uid owning the client's end of the connection
  (L{hsu_registry.security.sockdiag}), so unmodified clients get one too.
- An C{mtls:} endpoint: the client certificate's identity (see
  L{hsu_registry.security.tls}).
- Anything else: C{anonymous}.

An identity's principal (C{uid:1000}, C{anonymous}...) is what a
registration's owner is recorded as: the same uid over the unix socket and
over loopback TCP is the same owner.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import ISSLTransport

from hsu_registry.security.sockdiag import loopback_peer_uid

__all__ = ["ANONYMOUS", "Identity", "connection_identity", "identity_of_principal"]

_SO_PEERCRED = getattr(socket, "SO_PEERCRED", None)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@frozen
class Identity:
    """
    Who a request comes from.

    @ivar kind: C{uid} (the kernel's word), C{x509} (a client certificate),
        C{token} (a bearer token) or C{anonymous}.
    @ivar name: the uid as text, the certificate's identity, the token's name.
    @ivar pid: the peer process, on a unix socket only.
    """

    kind: str
    name: str = ""
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None

    @property
    def principal(self) -> str:
        """What ownership and policy match on: C{uid:1000}, C{x509:...}, C{anonymous}."""
        return "anonymous" if self.kind == "anonymous" else f"{self.kind}:{self.name}"

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"

    def __str__(self) -> str:
        return self.principal


ANONYMOUS = Identity("anonymous")


def _unix_identity(handle: Any) -> Identity | None:
    if _SO_PEERCRED is None:
        return None
    try:
        raw = handle.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return Identity("uid", str(uid), uid=uid, gid=gid, pid=pid if pid > 0 else None)


def connection_identity(transport: Any) -> Identity:
    """
    The kernel's word on who is at the other end of C{transport}: a uid for
    unix-socket and loopback TCP peers, else L{ANONYMOUS} (remote TCP,
    in-memory transports, anything that cannot say).
    """
    if ISSLTransport.providedBy(transport):
        # An mtls: endpoint's verified client (OpenSSL is imported only then).
        from hsu_registry.security.tls import certificate_identity

        return certificate_identity(transport) or ANONYMOUS
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return ANONYMOUS
    try:
        handle = get_handle()
        family = getattr(handle, "family", None)
    except Exception:
        return ANONYMOUS
    if family == socket.AF_UNIX:
        return _unix_identity(handle) or ANONYMOUS
    if family in (socket.AF_INET, socket.AF_INET6):
        try:
            peer = handle.getpeername()
            local = handle.getsockname()
        except OSError:
            return ANONYMOUS
        uid = loopback_peer_uid((peer[0], peer[1]), (local[0], local[1]))
        if uid is not None:
            return Identity("uid", str(uid), uid=uid)
    return ANONYMOUS


def identity_of_principal(principal: str) -> Identity:
    """
    The identity a registration's owner names (C{uid:1000}, C{x509:...}),
    for decisions made after the request is gone (the health checker's).
    """
    kind, _, name = principal.partition(":")
    if kind == "uid" and name.isdigit():
        return Identity("uid", name, uid=int(name))
    if kind in ("x509", "token") and name:
        return Identity(kind, name)
    return ANONYMOUS

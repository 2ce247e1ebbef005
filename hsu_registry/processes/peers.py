# -*- test-case-name: tests.test_processes -*-
"""
The process on the other end of a unix-socket connection, from the kernel's
C{SO_PEERCRED}: the PID it had when it connected, which it cannot forge.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

__all__ = ["peer_pid"]

_SO_PEERCRED = getattr(socket, "SO_PEERCRED", None)
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_pid(transport: Any) -> int | None:
    """
    The PID of the peer of C{transport} when it is a unix-socket connection
    on a platform with C{SO_PEERCRED}; L{None} for TCP, in-memory transports
    and anything else that cannot say.
    """
    if _SO_PEERCRED is None:
        return None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
        if getattr(handle, "family", None) != socket.AF_UNIX:
            return None
        raw = handle.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, _uid, _gid = _UCRED.unpack(raw)
    return pid if pid > 0 else None

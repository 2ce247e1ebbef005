# -*- test-case-name: tests.test_processes -*-
"""
The process table as Linux's C{/proc} shows it: a process's parent, state
and start time, read from C{/proc/<pid>/stat}.

C{/proc} is served from kernel memory, not from a disk: a read costs a few
microseconds and never waits on I/O, so reading it on the reactor thread is
as cheap as a system call.
"""

from __future__ import annotations

import os

from attrs import frozen
from zope.interface import Interface, implementer

__all__ = ["IProcessTable", "ProcTable", "ProcessIdentity", "ProcessStat", "parse_stat"]


@frozen
class ProcessIdentity:
    """
    One process, for as long as it lives: its PID and its start time (clock
    ticks since boot), which a later process reusing the PID cannot share.
    """

    pid: int
    start_time: int


@frozen
class ProcessStat:
    """What the registry needs of C{/proc/<pid>/stat}."""

    pid: int
    ppid: int
    state: str
    start_time: int

    @property
    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.pid, self.start_time)

    @property
    def running(self) -> bool:
        """False for a zombie (exited, not yet reaped) or a dead task."""
        return self.state not in ("Z", "X", "x")


def parse_stat(pid: int, data: bytes) -> ProcessStat | None:
    """
    Parse the text of C{/proc/<pid>/stat}.  The command name (field 2) may
    hold spaces and parentheses, so fields are counted from its last C{)}.
    """
    end = data.rfind(b")")
    if end < 0:
        return None
    fields = data[end + 2 :].split()
    try:
        # Fields 3 (state), 4 (ppid) and 22 (start time), counted from 1.
        return ProcessStat(pid, int(fields[1]), fields[0].decode("ascii"), int(fields[19]))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


class IProcessTable(Interface):
    """Looks processes up by PID."""

    def stat(pid: int) -> ProcessStat | None:
        """
        @return: the process's L{ProcessStat}, or L{None} when no process has
            that PID.
        """

    def owner(pid: int) -> int | None:
        """
        @return: the uid the process runs as (the owner of its C{/proc}
            entry), or L{None} when no process has that PID.
        """


@implementer(IProcessTable)
class ProcTable:
    """The host's process table, read from C{/proc} (or another mount of it)."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def stat(self, pid: int) -> ProcessStat | None:
        if pid <= 0:
            return None
        # os.read rather than open(): no buffered file object, about half the
        # cost, on a path taken by every publish over a unix socket.
        try:
            fd = os.open(f"{self.root}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no such process, or /proc not mounted
            return None
        try:
            data = os.read(fd, 4096)
        except OSError:  # the process went away between open and read
            return None
        finally:
            os.close(fd)
        return parse_stat(pid, data)

    def owner(self, pid: int) -> int | None:
        if pid <= 0:
            return None
        try:
            return os.stat(f"{self.root}/{pid}").st_uid
        except OSError:
            return None

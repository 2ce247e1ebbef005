# -*- test-case-name: tests.test_processes -*-
"""
Calls back when a watched process exits.

Each watched process gets a pidfd (Linux 5.3 and later), registered with the
reactor as a reader: the kernel makes it readable the moment the process
exits, so detection costs nothing while processes live and one reactor turn
when one dies, however many are watched.  Pidfds take at most half of the
open-file limit, so that the listeners can always accept connections; beyond
that, and where a pidfd cannot be had at all (a kernel before 5.3), the
process is polled instead, a C{/proc} read per process every
C{poll_interval}.  Either way a process is
known by PID and start time: a PID reused by a newer process is a different
process.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hsu_registry.interfaces import IProcessMonitor
from hsu_registry.processes.table import IProcessTable, ProcessIdentity, ProcTable

__all__ = ["ProcessMonitor"]


def _half_the_file_limit() -> int:
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 512
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft // 2, 1)


OnExit = Callable[[ProcessIdentity], object]


@implementer(IReadDescriptor)
class _PidfdReader:
    """A pidfd in the reactor: readable once its process has exited."""

    def __init__(self, fd: int, identity: ProcessIdentity, monitor: ProcessMonitor) -> None:
        self.fd = fd
        self.identity = identity
        self.monitor = monitor

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"pidfd({self.identity.pid})"

    def doRead(self) -> None:
        self.monitor._exited(self.identity)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped the descriptor (a hang-up without data): the
        # process is gone all the same.
        self.monitor._exited(self.identity)


@implementer(IProcessMonitor)
class ProcessMonitor:
    """
    Watches processes and calls C{on_exit(identity)} once, from the reactor,
    when one exits (or when it turns out to be gone already).

    @param reactor: an C{IReactorFDSet} and C{IReactorTime} (a plain clock
        is enough with C{use_pidfd=False}).
    @param table: where processes are looked up (C{/proc} by default).
    @param poll_interval: seconds between passes over the processes that
        are polled rather than watched through a pidfd.
    @param use_pidfd: whether to use pidfds at all.
    @param max_pidfds: the most pidfds held at once (default: half the
        soft open-file limit).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        table: IProcessTable | None = None,
        poll_interval: float = 0.5,
        use_pidfd: bool = True,
        max_pidfds: int | None = None,
    ) -> None:
        self._reactor = reactor
        self._table: IProcessTable = table if table is not None else ProcTable()
        self.poll_interval = poll_interval
        self._use_pidfd = use_pidfd and hasattr(os, "pidfd_open")
        self.max_pidfds = max_pidfds if max_pidfds is not None else _half_the_file_limit()
        self._watched: dict[ProcessIdentity, OnExit] = {}
        self._readers: dict[ProcessIdentity, _PidfdReader] = {}
        self._polled: dict[ProcessIdentity, None] = {}
        self._poller: LoopingCall | None = None
        self._warned = False

    def __len__(self) -> int:
        return len(self._watched)

    @property
    def pidfds(self) -> int:
        """How many processes are watched through a pidfd."""
        return len(self._readers)

    @property
    def polled(self) -> int:
        """How many processes are polled."""
        return len(self._polled)

    def identify(
        self, peer: int, process_id: int, uid: int | None = None
    ) -> ProcessIdentity | None:
        """
        The process a registration should be bound to, when the process ID a
        module published is its peer's own PID or the PID of the peer's
        direct parent of the same uid (a module publishing on behalf of the
        process that supervises it publishes the parent's); L{None}
        otherwise.  Never PID 1: a process re-parented to init would bind a
        registration that never goes stale.
        """
        if process_id <= 1 or peer <= 1:
            return None
        stat = self._table.stat(peer)
        if stat is None or not stat.running:
            return None
        if process_id == peer:
            return stat.identity
        if process_id == stat.ppid:
            parent = self._table.stat(stat.ppid)
            if parent is None or not parent.running:
                return None
            if uid is not None and self._table.owner(stat.ppid) != uid:
                return None
            return parent.identity
        return None

    def alive(self, identity: ProcessIdentity) -> bool:
        """Whether the process is running and is the one that had that PID."""
        stat = self._table.stat(identity.pid)
        return stat is not None and stat.running and stat.start_time == identity.start_time

    def watch(self, identity: ProcessIdentity, on_exit: OnExit) -> None:
        """Call C{on_exit(identity)} when the process exits (replacing an earlier callback)."""
        if identity in self._watched:
            self._watched[identity] = on_exit
            return
        self._watched[identity] = on_exit
        if self._use_pidfd and len(self._readers) >= self.max_pidfds:
            self._warn_once(
                "{count} pidfds held, the most allowed (half the open-file limit);"
                " polling further processes every {interval}s",
                count=len(self._readers),
            )
        elif self._use_pidfd:
            try:
                fd = os.pidfd_open(identity.pid)
            except ProcessLookupError:
                self._gone_soon(identity)
                return
            except OSError as e:
                self._warn_once(
                    "Cannot open a pidfd for process {pid} ({error}); polling processes"
                    " every {interval}s instead",
                    pid=identity.pid,
                    error=e.strerror,
                )
            else:
                # The PID may have changed hands between the lookup and the
                # pidfd: the pidfd names whoever has it now.
                if not self.alive(identity):
                    os.close(fd)
                    self._gone_soon(identity)
                    return
                reader = _PidfdReader(fd, identity, self)
                self._readers[identity] = reader
                self._reactor.addReader(reader)
                return
        self._polled[identity] = None
        if self._poller is None:
            self._poller = LoopingCall(self.poll)
            self._poller.clock = self._reactor
            self._poller.start(self.poll_interval, now=False).addErrback(
                lambda f: self.log.failure("The process poller stopped", f)
            )

    def unwatch(self, identity: ProcessIdentity) -> None:
        """Stop watching C{identity}; no call back follows."""
        self._watched.pop(identity, None)
        self._release(identity)

    def poll(self) -> None:
        """One pass over the polled processes (the pidfd ones need none)."""
        for identity in list(self._polled):
            if not self.alive(identity):
                self._exited(identity)

    def close(self) -> None:
        """Stop watching everything (the daemon is stopping)."""
        for identity in list(self._watched):
            self.unwatch(identity)

    def _release(self, identity: ProcessIdentity) -> None:
        reader = self._readers.pop(identity, None)
        if reader is not None:
            self._reactor.removeReader(reader)
            os.close(reader.fd)
        if identity in self._polled:
            del self._polled[identity]
            if not self._polled and self._poller is not None:
                poller, self._poller = self._poller, None
                if poller.running:
                    poller.stop()

    def _warn_once(self, message: str, **fields: object) -> None:
        if not self._warned:
            self._warned = True
            self.log.warn(message, interval=self.poll_interval, **fields)

    def _gone_soon(self, identity: ProcessIdentity) -> None:
        # Never call back from inside watch(): its caller is mid-change.
        self._reactor.callLater(0, self._exited, identity)

    def _exited(self, identity: ProcessIdentity) -> None:
        on_exit = self._watched.pop(identity, None)
        self._release(identity)
        if on_exit is None:
            return  # unwatched meanwhile, or already reported
        try:
            on_exit(identity)
        except Exception:
            self.log.failure("Handling the exit of process {pid} failed", pid=identity.pid)

"""
Tests for L{hsu_registry.processes} and process-bound registrations: the
C{/proc} reader, peer credentials, the process monitor (pidfds with real
child processes, polling on a L{task.Clock}) and the registry's bindings.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from hsu_registry.interfaces import IProcessMonitor
from hsu_registry.processes import monitor as monitor_module
from hsu_registry.processes.monitor import ProcessMonitor
from hsu_registry.processes.peers import peer_pid
from hsu_registry.processes.table import (
    IProcessTable,
    ProcessIdentity,
    ProcessStat,
    ProcTable,
    parse_stat,
)
from hsu_registry.registry import Change, ChangeKind, Registry
from hsu_registry.security.identity import Identity
from hsu_registry.stores.memory import MemoryStore
from hsu_registry.testing import ControllableStore
from hsu_registry.web.api import RegistryAPI

from .helpers import publish_body, publish_request

HAS_PROC = os.path.isdir("/proc/self")
HAS_PIDFD = hasattr(os, "pidfd_open")


@implementer(IProcessTable)
def _unix(pid: int | None, uid: int = 1000) -> Identity:
    """A caller as the kernel describes it: over a unix socket (with PID) or loopback TCP."""
    return Identity("uid", str(uid), uid=uid, gid=uid, pid=pid)


class FakeTable:
    """A process table the tests write: PIDs, parents, states, start times."""

    def __init__(self) -> None:
        self.processes: dict[int, ProcessStat] = {}
        self.uids: dict[int, int] = {}

    def add(
        self, pid: int, ppid: int = 1, start: int = 100, state: str = "S", uid: int = 1000
    ) -> ProcessIdentity:
        self.processes[pid] = ProcessStat(pid, ppid, state, start)
        self.uids[pid] = uid
        return ProcessIdentity(pid, start)

    def kill(self, pid: int) -> None:
        del self.processes[pid]

    def stat(self, pid: int) -> ProcessStat | None:
        return self.processes.get(pid)

    def owner(self, pid: int) -> int | None:
        return self.uids.get(pid) if pid in self.processes else None


class ParseStatTests(SynchronousTestCase):
    def test_command_with_spaces_and_parentheses(self) -> None:
        """Fields are counted from the last C{)}, whatever the command name holds."""
        data = b"42 (a) b (c)) S 7 42 42 0 -1 4194304 1 0 0 0 0 0 0 0 20 0 1 0 98765 1 2\n"
        self.assertEqual(parse_stat(42, data), ProcessStat(42, 7, "S", 98765))

    def test_garbage(self) -> None:
        """Unparseable text gives L{None}, not an exception."""
        self.assertIsNone(parse_stat(1, b"nonsense"))
        self.assertIsNone(parse_stat(1, b"1 (x) S 2"))

    def test_running(self) -> None:
        """Zombies and dead tasks are not running."""
        self.assertTrue(ProcessStat(1, 0, "S", 1).running)
        self.assertTrue(ProcessStat(1, 0, "R", 1).running)
        self.assertFalse(ProcessStat(1, 0, "Z", 1).running)
        self.assertFalse(ProcessStat(1, 0, "X", 1).running)


class ProcTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not HAS_PROC:
            raise unittest_skip("no /proc on this host")

    def test_own_process(self) -> None:
        """This test's own process, its parent and a stable start time."""
        table = ProcTable()
        verifyObject(IProcessTable, table)
        mine = table.stat(os.getpid())
        assert mine is not None
        self.assertEqual((mine.pid, mine.ppid), (os.getpid(), os.getppid()))
        self.assertTrue(mine.running)
        again = table.stat(os.getpid())
        assert again is not None
        self.assertEqual(again.start_time, mine.start_time)
        parent = table.stat(os.getppid())
        assert parent is not None
        self.assertLessEqual(parent.start_time, mine.start_time)

    def test_no_such_process(self) -> None:
        """A PID no process has, and nonsense PIDs, give L{None}."""
        table = ProcTable()
        self.assertIsNone(table.stat(0))
        self.assertIsNone(table.stat(-5))
        self.assertIsNone(table.stat(2**22 + 1))  # above any pid_max
        self.assertIsNone(ProcTable("/nonexistent").stat(os.getpid()))


def unittest_skip(reason: str) -> Exception:
    from twisted.trial.unittest import SkipTest

    return SkipTest(reason)


class PeerTests(SynchronousTestCase):
    def test_unix_socket_peer(self) -> None:
        """Over a unix socket the peer's PID comes from the kernel."""
        if not hasattr(socket, "SO_PEERCRED"):
            raise unittest_skip("no SO_PEERCRED on this platform")
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(left.close)
        self.addCleanup(right.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return left

        self.assertEqual(peer_pid(Transport()), os.getpid())

    def test_not_a_unix_socket(self) -> None:
        """TCP sockets, in-memory transports and closed sockets give L{None}."""
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(tcp.close)

        class Transport:
            def __init__(self, handle: Any) -> None:
                self.handle = handle

            def getHandle(self) -> Any:
                return self.handle

        self.assertIsNone(peer_pid(Transport(tcp)))
        self.assertIsNone(peer_pid(StringTransport()))
        self.assertIsNone(peer_pid(None))
        closed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        closed.close()
        self.assertIsNone(peer_pid(Transport(closed)))


class PollingMonitorTests(SynchronousTestCase):
    """The monitor's polling path, on a clock and a process table the test writes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.table = FakeTable()
        self.monitor = ProcessMonitor(
            self.clock, table=self.table, poll_interval=0.5, use_pidfd=False
        )
        self.exited: list[ProcessIdentity] = []

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IProcessMonitor, self.monitor))

    def test_identify(self) -> None:
        """The peer itself or its parent; nothing else, nothing dead, never PID 0."""
        self.table.add(1000, ppid=900, start=50)
        self.table.add(900, ppid=1, start=10)
        self.table.add(1100, ppid=1000, start=60, state="Z")
        self.assertEqual(self.monitor.identify(1000, 1000), ProcessIdentity(1000, 50))
        self.assertEqual(self.monitor.identify(1000, 900), ProcessIdentity(900, 10))
        self.assertIsNone(self.monitor.identify(1000, 1234))  # someone else
        self.assertIsNone(self.monitor.identify(1000, 0))
        self.assertIsNone(self.monitor.identify(1100, 1100))  # a zombie
        self.assertIsNone(self.monitor.identify(4242, 4242))  # gone
        self.table.kill(900)
        self.assertIsNone(self.monitor.identify(1000, 900))

    def test_exit_noticed_by_the_next_pass(self) -> None:
        """A process that exits is reported once, by the next poll."""
        identity = self.table.add(1000)
        self.monitor.watch(identity, self.exited.append)
        self.assertEqual((len(self.monitor), self.monitor.polled), (1, 1))
        self.clock.advance(0.5)
        self.assertEqual(self.exited, [])
        self.table.kill(1000)
        self.clock.advance(0.5)
        self.assertEqual(self.exited, [identity])
        self.assertEqual((len(self.monitor), self.monitor.polled), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the poller stopped
        self.clock.advance(5)
        self.assertEqual(self.exited, [identity])

    def test_pid_reuse(self) -> None:
        """A newer process with the same PID is not the watched one."""
        identity = self.table.add(1000, start=100)
        self.monitor.watch(identity, self.exited.append)
        self.table.kill(1000)
        self.table.add(1000, start=200)  # the PID, taken by a newer process
        self.clock.advance(0.5)
        self.assertEqual(self.exited, [identity])

    def test_zombie(self) -> None:
        """An exited process not yet reaped counts as exited."""
        identity = self.table.add(1000)
        self.monitor.watch(identity, self.exited.append)
        self.table.add(1000, state="Z")
        self.clock.advance(0.5)
        self.assertEqual(self.exited, [identity])

    def test_unwatch(self) -> None:
        """An unwatched process is not reported, and the poller stops."""
        identity = self.table.add(1000)
        self.monitor.watch(identity, self.exited.append)
        self.monitor.unwatch(identity)
        self.table.kill(1000)
        self.clock.advance(1)
        self.assertEqual(self.exited, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failing_callback_is_logged(self) -> None:
        """A callback that raises is logged; the other processes are still reported."""
        first, second = self.table.add(1000), self.table.add(1001)

        def boom(_: ProcessIdentity) -> None:
            raise RuntimeError("boom")

        self.monitor.watch(first, boom)
        self.monitor.watch(second, self.exited.append)
        self.table.kill(1000)
        self.table.kill(1001)
        self.clock.advance(0.5)
        self.assertEqual(self.exited, [second])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_close(self) -> None:
        """close() forgets every process."""
        self.monitor.watch(self.table.add(1000), self.exited.append)
        self.monitor.watch(self.table.add(1001), self.exited.append)
        self.monitor.close()
        self.assertEqual(len(self.monitor), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class _Child(ProcessProtocol):
    """A child process the test can wait on."""

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[BaseException] = Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready" in self.output and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value)


class RealProcessMonitorTests(TestCase):
    """The monitor against real child processes, on the real reactor."""

    timeout = 30

    def setUp(self) -> None:
        if not HAS_PROC:
            raise unittest_skip("no /proc on this host")

    def spawn(self) -> tuple[_Child, Any]:
        child = _Child()
        code = "import sys, time; print('ready', flush=True); time.sleep(120)"
        transport = reactor.spawnProcess(child, sys.executable, _python(code), env=None)

        def reap() -> Deferred[BaseException] | None:
            if child.ended.called:
                return None
            transport.signalProcess("KILL")
            return child.ended

        self.addCleanup(reap)
        return child, transport

    async def test_pidfd_reports_kill(self) -> None:
        """SIGKILL of a watched child is reported through its pidfd."""
        if not HAS_PIDFD:
            raise unittest_skip("no pidfd_open")
        child, transport = self.spawn()
        await child.ready
        monitor = ProcessMonitor(reactor)
        self.addCleanup(monitor.close)
        identity = monitor.identify(transport.pid, transport.pid)
        assert identity is not None
        exited: Deferred[ProcessIdentity] = Deferred()
        monitor.watch(identity, exited.callback)
        self.assertEqual((monitor.pidfds, monitor.polled), (1, 0))
        os.kill(transport.pid, signal.SIGKILL)
        self.assertEqual(await exited, identity)
        self.assertEqual(monitor.pidfds, 0)
        self.assertIsInstance(await child.ended, ProcessTerminated)

    async def test_polling_reports_kill(self) -> None:
        """Without pidfds, the next pass notices a real child's death."""
        child, transport = self.spawn()
        await child.ready
        clock = Clock()
        monitor = ProcessMonitor(clock, use_pidfd=False)
        identity = monitor.identify(transport.pid, transport.pid)
        assert identity is not None
        exited: list[ProcessIdentity] = []
        monitor.watch(identity, exited.append)
        clock.advance(0.5)
        self.assertEqual(exited, [])
        os.kill(transport.pid, signal.SIGKILL)
        await child.ended  # reaped: no /proc entry left
        clock.advance(0.5)
        self.assertEqual(exited, [identity])

    async def test_already_gone(self) -> None:
        """Watching a process that has exited reports it on the next reactor turn."""
        if not HAS_PIDFD:
            raise unittest_skip("no pidfd_open")
        child = _Child()
        transport = reactor.spawnProcess(child, sys.executable, _python("pass"), env=None)
        pid = transport.pid
        self.assertIsInstance(await child.ended, ProcessDone)
        monitor = ProcessMonitor(reactor)
        exited: Deferred[ProcessIdentity] = Deferred()
        monitor.watch(ProcessIdentity(pid, 1), exited.callback)
        self.assertEqual(await exited, ProcessIdentity(pid, 1))
        self.assertEqual(len(monitor), 0)

    async def test_pid_taken_by_another_process(self) -> None:
        """A pidfd that names a newer holder of the PID is reported as an exit."""
        if not HAS_PIDFD:
            raise unittest_skip("no pidfd_open")
        monitor = ProcessMonitor(reactor)
        mine = monitor.identify(os.getpid(), os.getpid())
        assert mine is not None
        older = ProcessIdentity(mine.pid, mine.start_time - 1)  # "the previous owner"
        exited: Deferred[ProcessIdentity] = Deferred()
        monitor.watch(older, exited.callback)
        self.assertEqual(await exited, older)
        self.assertEqual(monitor.pidfds, 0)

    def test_pidfds_bounded(self) -> None:
        """
        Past C{max_pidfds} (by default half the open-file limit) processes are
        polled, so pidfds never take the descriptors the listeners need.
        """
        if not HAS_PIDFD:
            raise unittest_skip("no pidfd_open")
        self.assertGreaterEqual(ProcessMonitor(reactor).max_pidfds, 1)
        monitor = ProcessMonitor(reactor, max_pidfds=1)
        self.addCleanup(monitor.close)
        mine = monitor.identify(os.getpid(), os.getpid())
        parent = monitor.identify(os.getpid(), os.getppid())
        assert mine is not None and parent is not None
        monitor.watch(mine, lambda _: None)
        monitor.watch(parent, lambda _: None)
        self.assertEqual((monitor.pidfds, monitor.polled), (1, 1))

    def test_falls_back_to_polling(self) -> None:
        """When no pidfd can be had (descriptor limit), the process is polled."""

        def no_more(pid: int) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        self.patch(monitor_module.os, "pidfd_open", no_more)
        clock = Clock()
        table = FakeTable()
        monitor = ProcessMonitor(clock, table=table)
        exited: list[ProcessIdentity] = []
        monitor.watch(table.add(1000), exited.append)
        monitor.watch(table.add(1001), exited.append)
        self.assertEqual((monitor.pidfds, monitor.polled), (0, 2))
        table.kill(1001)
        clock.advance(0.5)
        self.assertEqual(exited, [ProcessIdentity(1001, 100)])


class BindingTests(SynchronousTestCase):
    """Process-bound registrations in the registry, on a clock and a fake table."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.table = FakeTable()
        self.monitor = ProcessMonitor(self.clock, self.table, use_pidfd=False)
        self.store = ControllableStore()
        self.registry = Registry(
            self.store, self.clock, stale_after=300, expire_after=600, processes=self.monitor
        )
        self.changes: list[Change] = []
        self.registry.subscribe(self.changes.append)
        self.me = self.table.add(1234, ppid=1000, start=500)
        self.parent = self.table.add(1000, ppid=1, start=400)

    def publish(self, module_id: str = "echo", process_id: int = 1234, **kw: Any) -> None:
        # The same uid over loopback TCP (no PID) unless the test says otherwise.
        kw.setdefault("identity", _unix(None))
        self.successResultOf(self.registry.publish(publish_request(module_id, process_id), **kw))

    def test_bound_to_peer(self) -> None:
        """Published over a unix socket as its own PID: bound to that process."""
        self.publish(identity=_unix(1234))
        self.assertEqual(self.registry.binding("echo"), self.me)
        self.assertEqual((len(self.monitor), self.registry.bound_processes), (1, 1))

    def test_never_pid_1(self) -> None:
        """
        A process re-parented to init, publishing processID 1 over the unix
        socket, is not bound to PID 1 (which would never go stale): it lives
        by heartbeats, like any unbound registration.
        """
        self.table.add(1, ppid=0, start=1, uid=0)
        self.table.add(1500, ppid=1, start=700, uid=0)
        self.publish("orphan", process_id=1, identity=_unix(1500, uid=0))
        self.assertIsNone(self.registry.binding("orphan"))
        self.clock.advance(601)
        self.successResultOf(self.registry.expire())
        self.assertIsNone(self.registry.get("orphan"))

    def test_parent_of_other_uid_not_bound(self) -> None:
        """A child naming a parent that runs as another uid is not bound to it."""
        self.table.add(2000, ppid=1, start=800, uid=0)
        self.table.add(2001, ppid=2000, start=900, uid=1000)
        self.publish(process_id=2000, identity=_unix(2001))
        self.assertIsNone(self.registry.binding("echo"))

    def test_bound_to_parent(self) -> None:
        """Published by a child on behalf of its parent: bound to the parent."""
        self.table.add(1300, ppid=1234, start=600)
        self.publish(process_id=1234, identity=_unix(1300))
        self.assertEqual(self.registry.binding("echo"), self.me)

    def test_not_bound(self) -> None:
        """Over TCP, for another process, or as process 0: not bound."""
        self.publish("tcp")
        self.publish("other", process_id=4321, identity=_unix(1234))
        self.publish("zero", process_id=0, identity=_unix(1234))
        for module_id in ("tcp", "other", "zero"):
            self.assertIsNone(self.registry.binding(module_id))
        self.assertEqual(len(self.monitor), 0)

    def test_exit_expires_at_once(self) -> None:
        """When the process exits its registrations go, each an C{expired} change."""
        self.publish("a", identity=_unix(1234))
        self.publish("b", identity=_unix(1234))
        self.publish("c")  # not bound
        self.assertEqual(len(self.monitor), 1)  # one watch for the process
        self.table.kill(1234)
        self.clock.advance(0.5)
        self.assertIsNone(self.registry.get("a"))
        self.assertIsNone(self.registry.get("b"))
        self.assertIsNotNone(self.registry.get("c"))
        expired = [(c.kind, c.module_id) for c in self.changes[3:]]
        self.assertEqual(expired, [(ChangeKind.EXPIRED, "a"), (ChangeKind.EXPIRED, "b")])
        stored = [
            record.registration.module_id for record in self.successResultOf(self.store.load())
        ]
        self.assertEqual(stored, ["c"])
        self.assertEqual((len(self.monitor), self.registry.bound_processes), (0, 0))

    def test_many_exits_are_removed_in_batches(self) -> None:
        """
        Thousands of bound modules going at once, from one process or from
        many exiting in the same turn, are removed C{expire_batch} per reactor
        turn, so the reactor writes watch events out between batches.
        """
        self.registry.expire_batch = 2
        for name in "abc":
            self.publish(name, identity=_unix(1234))
        for pid, name in ((2001, "d"), (2002, "e")):
            self.table.add(pid, start=pid)
            self.publish(name, process_id=pid, identity=_unix(pid))
        turns: list[list[str]] = []
        drain = self.registry._drain_exits

        def counted() -> None:
            turns.append([])
            drain()

        self.patch(self.registry, "_drain_exits", counted)
        self.registry.subscribe(
            lambda c: turns[-1].append(c.module_id) if c.kind is ChangeKind.EXPIRED else None
        )
        for pid in (1234, 2001, 2002):
            self.table.kill(pid)
        self.monitor.poll()
        self.assertEqual(len(self.registry), 5)  # nothing removed inside the poll's turn
        self.clock.advance(0)
        self.assertEqual(turns, [["a", "b"], ["c", "d"], ["e"]])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_publish_landing_after_the_exit(self) -> None:
        """
        A publish by the process that the store acknowledges only after the
        process exited binds to a process nobody watched any more: it is
        watched anew, found dead, and removed; nothing is left behind.
        """
        self.publish("a", identity=_unix(1234))
        self.store.holding = True
        pending = self.registry.publish(publish_request("b", 1234), identity=_unix(1234))
        self.table.kill(1234)
        self.monitor.poll()
        self.clock.advance(0)  # "a"'s removal waits on the store too
        self.store.release()
        self.successResultOf(pending)
        self.clock.advance(0)
        self.store.release()
        self.clock.advance(0.5)  # the new watch's first pass
        self.store.release()
        self.assertEqual((self.registry.get("a"), self.registry.get("b")), (None, None))
        self.assertEqual((len(self.monitor), self.registry.bound_processes), (0, 0))
        self.assertEqual(self.registry._bound, {})

    def test_bound_modules_are_seen_at_each_cleanup_pass(self) -> None:
        """
        Bound modules are recorded as seen at each cleanup pass (and stored at
        the next flush), so a registry restarted from a durable store finds
        them fresh; a flush alone does not rewrite them.
        """
        store = MemoryStore()
        registry = Registry(store, self.clock, stale_after=300, processes=self.monitor)
        self.successResultOf(registry.publish(publish_request("m", 1234), identity=_unix(1234)))
        published_at = self.clock.seconds()
        self.successResultOf(registry.flush_heartbeats())
        self.clock.advance(3600)

        def stored_seen() -> float:
            (stored,) = self.successResultOf(store.load())
            return stored.last_seen

        self.successResultOf(registry.flush_heartbeats())
        self.assertEqual(stored_seen(), published_at)
        self.successResultOf(registry.expire())
        self.successResultOf(registry.flush_heartbeats())
        self.assertEqual(stored_seen(), self.clock.seconds())
        restarted = Registry(store, self.clock, stale_after=300)
        self.successResultOf(restarted.load())
        self.assertFalse(restarted.is_stale("m", self.clock.seconds()))
        self.assertEqual(restarted.last_seen("m"), self.clock.seconds())

    def test_pid_reuse_does_not_keep_it_alive(self) -> None:
        """
        A newer process with the dead one's PID, heartbeating as that PID over
        TCP, does not keep the dead process's registration.
        """
        self.publish(identity=_unix(1234))
        self.table.kill(1234)
        self.table.add(1234, ppid=1, start=900)
        self.registry.heartbeat("echo", 1234, identity=_unix(None))  # over TCP: no PID
        self.clock.advance(0.5)
        self.assertIsNone(self.registry.get("echo"))

    def test_newer_process_rebinds(self) -> None:
        """The module published again by a newer process is bound to that one."""
        self.publish(identity=_unix(1234))
        self.table.kill(1234)
        newer = self.table.add(1234, ppid=1, start=900)
        self.publish(identity=_unix(1234))  # same content: a heartbeat, rebinding
        self.assertEqual(self.registry.binding("echo"), newer)
        self.clock.advance(0.5)
        self.assertIsNotNone(self.registry.get("echo"))
        self.assertEqual(self.registry.binding("echo"), newer)

    def test_never_stale_while_running(self) -> None:
        """A bound module needs no heartbeat: it is discoverable while its process runs."""
        self.publish(identity=_unix(1234))
        self.clock.advance(3600)
        self.assertFalse(self.registry.is_stale("echo", self.clock.seconds()))
        self.assertEqual(self.registry.discover("echo").module_id, "echo")
        self.registry.discover_heartbeat = False
        self.clock.advance(3600)
        self.assertEqual(self.successResultOf(self.registry.expire()), [])
        self.assertIsNotNone(self.registry.get("echo"))

    def test_heartbeat_over_unix_binds(self) -> None:
        """After a registry restart, the owner's next heartbeat binds again."""
        self.publish()
        self.assertIsNone(self.registry.binding("echo"))
        self.registry.heartbeat("echo", 1234, identity=_unix(1234))
        self.assertEqual(self.registry.binding("echo"), self.me)
        self.registry.heartbeat("echo", None, identity=_unix(1234))
        self.assertEqual(self.registry.binding("echo"), self.me)

    def test_other_owner_unbinds(self) -> None:
        """Published again by another process, the binding to the first one goes."""
        self.publish(identity=_unix(1234))
        self.publish(process_id=777)
        self.assertIsNone(self.registry.binding("echo"))
        self.assertEqual(len(self.monitor), 0)
        self.table.kill(1234)
        self.clock.advance(0.5)
        self.assertIsNotNone(self.registry.get("echo"))

    def test_same_owner_over_tcp_keeps_binding(self) -> None:
        """The bound process publishing new content over TCP stays bound."""
        self.publish(identity=_unix(1234))
        self.successResultOf(
            self.registry.publish(publish_request("echo", 1234, apis=2), _unix(None))
        )
        self.assertEqual(self.registry.binding("echo"), self.me)

    def test_unpublish_unwatches(self) -> None:
        """Unpublishing the last module of a process stops watching it."""
        self.publish(identity=_unix(1234))
        self.successResultOf(self.registry.unpublish("echo", 1234, _unix(None)))
        self.assertEqual((len(self.monitor), self.registry.bound_processes), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_store_failure_falls_back_to_time(self) -> None:
        """
        When the store cannot remove a dead process's module, it stays, now
        unbound, and ages out by time like any other.
        """
        self.publish(identity=_unix(1234))
        self.store.failing = True
        self.store.failure_type = RuntimeError
        self.table.kill(1234)
        self.clock.advance(0.5)
        self.assertIsNotNone(self.registry.get("echo"))
        self.assertIsNone(self.registry.binding("echo"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.store.failing = False
        self.clock.advance(601)
        self.successResultOf(self.registry.expire())
        self.assertIsNone(self.registry.get("echo"))


class BoundAPITests(SynchronousTestCase):
    """The HTTP API binds what unix-socket peers publish and shows the binding."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.table = FakeTable()
        self.me = self.table.add(1234, ppid=1, start=500)
        self.monitor = ProcessMonitor(self.clock, self.table, use_pidfd=False)
        self.registry = Registry(ControllableStore(), self.clock, processes=self.monitor)
        self.peer: int | None = 1234
        api = RegistryAPI(self.registry, identify=lambda request: _unix(self.peer))
        self.treq: Any = StubTreq(api.resource())

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        response = self.successResultOf(
            self.treq.request(method, "http://registry.invalid/api/v1" + path, data=body)
        )
        return response.code, json.loads(self.successResultOf(response.content()))

    def test_module_shows_binding(self) -> None:
        """C{GET /api/v1/modules/{id}} says whether and to which PID a module is bound."""
        self.assertEqual(self.request("POST", "/publish", publish_body("bound"))[0], 200)
        self.peer = None
        self.assertEqual(self.request("POST", "/publish", publish_body("free"))[0], 200)
        code, bound = self.request("GET", "/modules/bound")
        self.assertEqual(code, 200)
        self.assertEqual((bound["processBound"], bound["boundPID"]), (True, 1234))
        code, free = self.request("GET", "/modules/free")
        self.assertEqual((free["processBound"], "boundPID" in free), (False, False))
        _, catalog = self.request("GET", "/modules")
        flags = {m["moduleID"]: m["processBound"] for m in catalog["modules"]}
        self.assertEqual(flags, {"bound": True, "free": False})

    def test_bound_ready_until_exit(self) -> None:
        """Ready without heartbeats while the process runs; gone within a pass of its exit."""
        self.request("POST", "/publish", publish_body("bound"))
        self.clock.advance(3600)
        self.assertEqual(self.request("GET", "/discover/bound")[0], 200)
        _, service = self.request("GET", "/services/service1")
        self.assertEqual(service["providers"][0]["state"], "ready")
        self.table.kill(1234)
        self.clock.advance(0.5)
        self.assertEqual(self.request("GET", "/modules/bound")[0], 404)
        self.assertEqual(self.request("GET", "/discover/bound")[0], 404)

    def test_heartbeat_binds(self) -> None:
        """A heartbeat from the owner over a unix socket binds its registration."""
        self.peer = None
        self.request("POST", "/publish", publish_body("m"))
        self.peer = 1234
        self.assertEqual(self.request("PUT", "/heartbeat/m?processID=1234")[0], 200)
        self.assertEqual(self.registry.binding("m"), self.me)

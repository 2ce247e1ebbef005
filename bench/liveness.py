"""
Process liveness: how fast the daemon forgets a module whose process died,
and what watching processes costs it.

``python -m bench.liveness [--quick] [--rounds N] [--modules N] [--idle S]
[--no-polling] [--timeout S] [--json PATH]``

A module that publishes over the daemon's unix socket with its own PID (or
its parent's) as C{processID} is bound to that process (C{SO_PEERCRED}, PID
and start time): when the process exits, its registrations are removed at
once (a pidfd per process in the reactor; without pidfds, C{/proc} polled
every 0.5 s), each an C{expired} change.  The installed C{hsu-registry} runs
in its own processes, listening on TCP 127.0.0.1 and on a unix socket in a
short C{/tmp} directory, as L{bench.daemon} starts it.  The module processes
are children of this one (C{os.fork()}: each connects to the unix socket
itself, publishes, closes its connection and waits in C{signal.pause()}).

 1. Kill to removal: C{--rounds} rounds, each with one new module process;
    its binding is checked (C{GET /api/v1/modules/ID}: C{processBound} and
    C{boundPID}), then C{time.monotonic()} is taken right before
    C{kill -9}, and the round ends when the C{expired} event of its module
    arrives on a watch stream (C{GET /api/v1/watch} over the unix socket,
    open for all rounds): the daemon's detection, removal and notification.
    This process also holds a pidfd of the module process, to tell when the
    kernel had it exit (the kernel's share of the figure).  Once with pidfds
    (the default) and once with the polling fallback: that daemon runs under
    a seccomp filter denying C{pidfd_open} (C{ENOSYS}, as on a kernel older
    than 5.3), so it falls back by itself (its log says so, and it holds no
    pidfd); no option of the daemon changes.  Its poller starts with the
    first process watched, so there each kill comes a random 0 to 0.5 s
    after the binding (seeded), anywhere in the polling period.
 2. Tracking cost: C{--modules} registrations (each one API) in five
    shapes, each on a fresh daemon: unbound from one process (C{processID}
    0: nothing is bound), bound to one process (one pidfd), unbound from N
    processes, bound to N processes (N pidfds) and bound to N processes
    with the polling fallback.  One process publishes every module in turn
    on one connection; N processes (one module each) all connect first and
    publish at once on a signal (a byte each on a pipe).  For each shape:
    the time to publish everything (req/s), then after a short settle the
    daemon's VmRSS, open descriptors (and pidfds), its CPU time
    (utime+stime of C{/proc/PID/stat}, and C{schedstat}) over C{--idle}
    seconds with everything registered, and for the bound shapes the time
    from killing every module process at once (C{killpg}) to the last
    C{expired} event on a watch stream (and to the last exit, seen by this
    process's pidfds), checked against health's C{registeredModules}.  RSS
    and req/s are also given as ratios to the unbound shape with as many
    processes, measured in the same run.

This process raises its soft open-file limit to the hard one first (the
daemon inherits it: it needs a descriptor per connection and per pidfd).
The module processes form one process group per batch and are killed and
reaped on every way out, and get C{PR_SET_PDEATHSIG}; the daemons are
stopped, and the whole run is bounded (C{--timeout}).  Progress goes to
stderr, the table to stdout, everything to JSON (by default
C{bench/results/liveness.json}).  C{--quick} (5 rounds, 1 000 modules, 0.5 s
idle, no polled shape) checks the harness in a few seconds; its figures mean
little.
C{python -m bench} runs this module as its C{liveness} section.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import operator
import os
import platform
import random
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from types import FrameType, TracebackType
from typing import Any, NoReturn

from bench.daemon import (
    BENCH_DIR,
    Server,
    Workspace,
    await_server,
    cpu_times,
    log_tail,
    open_files_limit,
    raise_open_files,
    read_status_kib,
    spawn_daemon,
    stop_process,
)
from bench.probe import Connection, request, request_bytes
from bench.section import fmt, progress, section_main
from bench.sse import SSEParser, Stamp, watch_request
from bench.stats import median, percentile

__all__ = ["main", "render", "run"]

DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "liveness.json")
#: The bound on the whole run (--timeout), s, with --quick and without.
TIMEOUT_S = {True: 120.0, False: 480.0}
#: Descriptors kept beyond one connection and one pidfd per module process.
FD_MARGIN = 512
#: Longest wait for module processes to connect, to publish, and for removals.
PHASE_TIMEOUT = 120.0
#: Longest wait for one round's removal (the polling fallback needs 0.5 s).
ROUND_TIMEOUT = 10.0
#: How long a daemon has to listen, and to exit on SIGTERM.
LISTEN_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: The daemon's default interval of the polling fallback, s.
POLL_INTERVAL = 0.5
#: The one API every benchmark module publishes.
API = '[{"serviceIDs":["svc"],"serverPort":9999,"protocol":"http"}]'
#: Seconds between health requests once the daemon has dropped a watch stream.
FALLBACK_POLL = 0.002
#: What a pidfd looks like in /proc/PID/fd.
PIDFD_LINK = "anon_inode:[pidfd]"
#: The daemon's warning when it cannot have a pidfd (hsu_registry.processes.monitor).
NO_PIDFD_WARNING = "Cannot open a pidfd"
#: The daemon's warning when it drops a watcher (hsu_registry.web.watch).
DROPPED_WATCHER = "Disconnecting a watcher"
EXPIRED_LOG = "its process"
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)

#: Run as C{python -c NO_PIDFD_EXEC COMMAND ARGS...}: deny C{pidfd_open}
#: (syscall 434 on every architecture) with ENOSYS through a seccomp filter,
#: then exec the command, which keeps the filter.  Plain classic BPF:
#: load the syscall number, compare, return ERRNO or ALLOW.
NO_PIDFD_EXEC = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
program = struct.pack(
    "=HBBIHBBIHBBIHBBI",
    0x20, 0, 0, 0,                 # ld [0]: seccomp_data.nr
    0x15, 0, 1, 434,               # jeq #434 (pidfd_open), next, skip one
    0x06, 0, 0, 0x00050000 | 38,   # ret SECCOMP_RET_ERRNO | ENOSYS
    0x06, 0, 0, 0x7FFF0000,        # ret SECCOMP_RET_ALLOW
)
code = ctypes.create_string_buffer(program, len(program))
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Program(4, ctypes.addressof(code))
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit("no_new_privs: " + os.strerror(ctypes.get_errno()))
if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    sys.exit("seccomp: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""
#: The argv prefix that runs a daemon under that filter.
NO_PIDFD_WRAPPER = (sys.executable, "-c", NO_PIDFD_EXEC)


class BenchTimeout(RuntimeError):
    """The whole run took longer than its bound."""


# -- what a module process sends ---------------------------------------------


def publish_request(module_id: str, process_id: int) -> bytes:
    """A C{POST /api/v1/publish} of C{module_id} with one API, as HTTP/1.1 bytes."""
    body = f'{{"moduleID":"{module_id}","processID":{process_id},"apis":{API}}}'.encode("ascii")
    return request_bytes("POST", "/api/v1/publish", body)


def _report(fd: int, line: str) -> None:
    # Under PIPE_BUF bytes: one atomic write, never mixed with a sibling's.
    os.write(fd, (line[:500].replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _module_process(
    parent: int,
    pgid: int,
    socket_path: str,
    module_ids: list[str],
    bound: bool,
    go_fd: int,
    report_fd: int,
) -> NoReturn:
    """
    The forked child: join the batch's process group, die with the parent,
    keep nothing of the parent's but two pipe ends, connect, report
    C{ready}, wait for a byte on C{go_fd}, publish every module (with its own
    PID as C{processID} when C{bound}, else 0), report C{done}, close the
    connection and wait to be killed.  Never returns.
    """
    try:
        gc.disable()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        try:
            os.setpgid(0, pgid)
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        low = 3
        for keep in sorted((go_fd, report_fd)):
            os.closerange(low, keep)
            low = keep + 1
        os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        pid = os.getpid()
        conn = Connection(socket_path, timeout=PHASE_TIMEOUT)
        _report(report_fd, f"ready {pid}")
        if os.read(go_fd, 1) != b"g":
            raise RuntimeError("no go byte")
        process_id = pid if bound else 0
        for module_id in module_ids:
            status, _, body = conn.exchange(publish_request(module_id, process_id))
            if status != 200:
                raise RuntimeError(f"publish {module_id} answered {status}: {body[:200]!r}")
        conn.close()
        _report(report_fd, f"done {pid}")
        while True:
            signal.pause()
    except BaseException as e:
        try:
            _report(report_fd, f"error {os.getpid()} {type(e).__name__}: {e}")
        except BaseException:
            pass
    finally:
        os._exit(1)


class ModuleProcesses:
    """
    A batch of forked module processes in one process group.  L{close} (also
    on leaving a C{with} block, however) kills every one still alive and
    reaps them all.
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.pids: list[int] = []
        self.pgid = 0
        self.ready = 0
        self.done = 0
        self.errors: list[str] = []
        self._reaped: set[int] = set()
        self._buffer = b""
        self.go_r, self.go_w = os.pipe()
        self.report_r, self.report_w = os.pipe()
        try:
            import fcntl

            # Room for every child's lines while this process is busy forking.
            fcntl.fcntl(self.report_r, fcntl.F_SETPIPE_SZ, 1 << 20)
        except (ImportError, AttributeError, OSError):
            pass
        self._poll = select.poll()
        self._poll.register(self.report_r, select.POLLIN)

    def __enter__(self) -> ModuleProcesses:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def fork(self, module_ids: list[str], bound: bool) -> int:
        """One more module process publishing C{module_ids}; its PID."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _module_process(
                parent,
                self.pgid,
                self.socket_path,
                module_ids,
                bound,
                self.go_r,
                self.report_w,
            )
        self.pids.append(pid)
        try:
            os.setpgid(pid, self.pgid or pid)  # also here: no race with the child's own call
        except OSError:
            pass
        if not self.pgid:
            self.pgid = pid
        return pid

    def fork_many(self, batches: Iterable[list[str]], bound: bool) -> None:
        """A module process per batch of module IDs (gc frozen: fewer pages copied)."""
        gc.collect()
        gc.freeze()
        try:
            for number, module_ids in enumerate(batches):
                self.fork(module_ids, bound)
                if number % 256 == 255:
                    self._read(0)
        finally:
            gc.unfreeze()

    def _read(self, timeout: float) -> None:
        if not self._poll.poll(max(0, int(timeout * 1000))):
            return
        data = os.read(self.report_r, 1 << 20)
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            kind, _, rest = line.decode("utf-8", "replace").partition(" ")
            if kind == "ready":
                self.ready += 1
            elif kind == "done":
                self.done += 1
            else:
                self.errors.append(rest)

    def wait(self, what: str, count: int, timeout: float, check: Callable[[], None]) -> None:
        """Wait until C{count} module processes have reported C{what} (ready or done)."""
        deadline = time.monotonic() + timeout
        while (self.ready if what == "ready" else self.done) < count:
            if self.errors:
                raise RuntimeError(
                    f"{len(self.errors)} module processes failed, the first: {self.errors[0]}"
                )
            check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = self.ready if what == "ready" else self.done
                raise RuntimeError(f"only {got} of {count} module processes {what} in {timeout}s")
            self._read(min(remaining, 0.5))

    def go(self) -> None:
        """Let every module process publish (one byte each)."""
        payload = b"g" * len(self.pids)
        while payload:
            payload = payload[os.write(self.go_w, payload) :]

    def kill_all(self) -> None:
        """SIGKILL the whole group at once."""
        os.killpg(self.pgid, signal.SIGKILL)

    def private_kib(self, sample: int = 16) -> float | None:
        """The mean private memory (smaps_rollup) of up to C{sample} module processes."""
        values = []
        for pid in self.pids[:sample]:
            try:
                with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
                    total = 0
                    for line in f:
                        if line.startswith(("Private_Clean:", "Private_Dirty:")):
                            total += int(line.split()[1])
                values.append(total)
            except (OSError, ValueError):
                pass
        return sum(values) / len(values) if values else None

    def close(self) -> None:
        """Kill and reap every module process; close the pipes (the run's alarm waits)."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            self._close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _close(self) -> None:
        if self.pgid:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except OSError:
                pass
        for pid in self.pids:
            if pid not in self._reaped:
                try:
                    os.kill(pid, signal.SIGKILL)  # one that never joined the group
                except OSError:
                    pass
        for pid in self.pids:
            if pid in self._reaped:
                continue
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self._reaped.add(pid)
        for fd in (self.go_r, self.go_w, self.report_r, self.report_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.go_r = self.go_w = self.report_r = self.report_w = -1


# -- the watch stream ----------------------------------------------------------


class StreamEnded(RuntimeError):
    """The daemon ended or cut the watch stream."""


@dataclass(frozen=True)
class Removal:
    """
    How a kill went: when it was sent and when the removals were all seen
    (C{time.monotonic()}), when each process's exit was seen (L{None}
    without pidfds), and how many expired events the stream had brought
    when the daemon ended it (L{None}: it did not).
    """

    began: float
    done_at: float
    exits: list[float] | None
    dropped_after: int | None


class WatchStream:
    """
    C{GET /api/v1/watch} over the unix socket, read with blocking calls:
    the time each C{expired} and C{published} event arrived, by module.
    """

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(socket_path)
        self.sock.sendall(watch_request("localhost"))
        self.hello = False
        self.published: dict[str, float] = {}
        self.expired: dict[str, float] = {}
        self.parser = SSEParser()
        self._handled = 0  # the parser's events taken into account

    def close(self) -> None:
        self.sock.close()

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError("the watch stream did not bring the events expected in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            raise RuntimeError(
                "the watch stream did not bring the events expected in time"
            ) from None
        now = time.monotonic()
        if not data:
            raise StreamEnded("the daemon ended the watch stream")
        self._feed(data, now)

    def wait(self, done: Callable[[], bool], timeout: float) -> None:
        """Read until C{done()} (or fail after C{timeout} seconds)."""
        deadline = time.monotonic() + timeout
        while not done():
            self._recv(deadline)

    def kill_and_wait(
        self,
        kill: Callable[[], object],
        pids: list[int],
        done: Callable[[], bool],
        timeout: float,
        fallback: Callable[[], bool] | None = None,
    ) -> Removal:
        """
        Take a pidfd of each of C{pids} (this process's own, to see when
        the kernel has them exit), take C{time.monotonic()}, call C{kill},
        then read the stream until C{done()} and every process has exited.
        Should the daemon end the stream first, C{fallback()} is called
        every L{FALLBACK_POLL} seconds instead until it is true (without a
        C{fallback}: L{StreamEnded}).
        """
        poller = select.epoll()
        pidfds: list[int] = []
        try:
            if hasattr(os, "pidfd_open"):
                try:
                    for pid in pids:
                        pidfds.append(os.pidfd_open(pid))
                        poller.register(pidfds[-1], select.EPOLLIN)
                except OSError:
                    for fd in pidfds:
                        os.close(fd)
                    pidfds = []
            tracked = len(pidfds) == len(pids)
            expected = len(pidfds)
            sock = self.sock.fileno()
            poller.register(sock, select.EPOLLIN)
            self.sock.setblocking(False)
            exits: list[float] = []
            dropped: int | None = None
            done_at: float | None = None
            began = time.monotonic()
            kill()
            deadline = began + timeout
            while done_at is None or len(exits) < expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"{len(exits)} of {expected} exits seen and the removals were not seen "
                        f"within {timeout:g}s"
                    )
                if dropped is not None and done_at is None:
                    remaining = min(remaining, FALLBACK_POLL)
                events = poller.poll(remaining)
                now = time.monotonic()
                for fd, _ in events:
                    if fd != sock:
                        exits.append(now)
                        poller.unregister(fd)
                        pidfds.remove(fd)
                        os.close(fd)
                    elif dropped is None:
                        try:
                            self._drain(now)
                        except StreamEnded:
                            if fallback is None:
                                raise
                            dropped = len(self.expired)
                            poller.unregister(sock)
                if done_at is not None:
                    continue
                if dropped is None:
                    if done():
                        done_at = now
                elif fallback is not None and fallback():
                    done_at = time.monotonic()
            return Removal(began, done_at, exits if tracked else None, dropped)
        finally:
            for fd in pidfds:
                os.close(fd)
            poller.close()
            self.sock.setblocking(True)

    def _drain(self, now: float) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError as e:
                raise StreamEnded(f"the daemon cut the watch stream: {e}") from None
            if not data:
                raise StreamEnded("the daemon ended the watch stream")
            self._feed(data, now)
            if self.parser.ended:
                raise StreamEnded("the daemon ended the watch stream")

    def wait_module(self, events: dict[str, float], module_id: str, timeout: float) -> None:
        """Read until C{module_id} is in C{events} (L{published} or L{expired})."""
        self.wait(lambda: module_id in events, timeout)

    def _feed(self, data: bytes, now: float) -> None:
        parser = self.parser
        checked = parser.head_done
        parser.feed(Stamp(0, now), data)
        if parser.error is not None:
            raise RuntimeError(f"the watch stream is broken: {parser.error}")
        if parser.head_done and not checked:
            content_type = parser.headers.get("content-type", "")
            if parser.status != 200 or "text/event-stream" not in content_type:
                raise RuntimeError(f"the watch answered {parser.status} ({content_type!r})")
            if not parser.chunked:
                raise RuntimeError("the watch stream is not chunked")
        for event in parser.events[self._handled :]:
            if event.event == "hello":
                self.hello = True
            elif event.event in ("expired", "published") and event.data:
                module_id = json.loads(event.data)["moduleID"]
                (self.expired if event.event == "expired" else self.published)[module_id] = (
                    event.stamp.read
                )
        self._handled = len(parser.events)


# -- the daemon ----------------------------------------------------------------


def _get_json(daemon: Server, path: str) -> tuple[int, Any]:
    answer = request(daemon.target("unix"), "GET", path)
    try:
        return answer.status, json.loads(answer.body)
    except ValueError:
        return answer.status, answer.body.decode("utf-8", "replace")


def registered(daemon: Server) -> int:
    status, body = _get_json(daemon, "/api/v1/health")
    if status != 200:
        raise RuntimeError(f"health answered {status}: {body}")
    return int(body["registeredModules"])


def check_bound(daemon: Server, module_id: str, pid: int | None) -> None:
    """C{module_id} is registered, bound to C{pid} (or not bound, when L{None})."""
    status, entry = _get_json(daemon, f"/api/v1/modules/{module_id}")
    if status != 200:
        raise RuntimeError(f"GET /api/v1/modules/{module_id} answered {status}: {entry}")
    if pid is None:
        if entry.get("processBound") is not False:
            raise RuntimeError(f"{module_id} is bound though published unbound: {entry}")
    elif entry.get("processBound") is not True or entry.get("boundPID") != pid:
        raise RuntimeError(f"{module_id} is not bound to process {pid}: {entry}")


def open_fds(pid: int) -> tuple[int, int]:
    """How many descriptors a process holds, and how many of them are pidfds."""
    total = pidfds = 0
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        total += 1
        try:
            if os.readlink(os.path.join(directory, name)) == PIDFD_LINK:
                pidfds += 1
        except OSError:
            pass
    return total, pidfds


# -- the measurements ----------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int
    modules: int
    idle: float
    settle: float
    polling: bool
    polled_shape: bool
    timeout: float
    quick: bool


def _summary_ms(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {
        "rounds": len(samples),
        "median_ms": median(ordered),
        "p90_ms": percentile(ordered, 90),
        "max_ms": ordered[-1],
        "min_ms": ordered[0],
        "samples_ms": samples,
    }


def measure_kill(daemon: Server, rounds: int, polling: bool) -> dict[str, Any]:
    """
    Kill to removal, one new module process per round (see the module's
    docstring).  The polling daemon's poller starts with the first process
    watched: each round's process is killed a random 0 to 0.5 s after its
    binding, so that the kill falls anywhere in the polling period.
    """
    socket_path = daemon.target("unix").path
    watch = WatchStream(socket_path)
    samples: list[float] = []
    exits: list[float] = []
    delays = random.Random(rounds)
    try:
        watch.wait(lambda: watch.hello, ROUND_TIMEOUT)
        for number in range(rounds):
            module_id = f"live-{daemon.name}-{number}"
            with ModuleProcesses(socket_path) as children:
                pid = children.fork([module_id], bound=True)
                children.wait("ready", 1, ROUND_TIMEOUT, daemon.check_alive)
                children.go()
                children.wait("done", 1, ROUND_TIMEOUT, daemon.check_alive)
                check_bound(daemon, module_id, pid)
                watch.wait_module(watch.published, module_id, ROUND_TIMEOUT)
                if polling:
                    time.sleep(delays.uniform(0.0, POLL_INTERVAL))
                removal = watch.kill_and_wait(
                    partial(os.kill, pid, signal.SIGKILL),
                    [pid],
                    partial(operator.contains, watch.expired, module_id),
                    ROUND_TIMEOUT,
                )
                samples.append((watch.expired[module_id] - removal.began) * 1000.0)
                if removal.exits:
                    exits.append((removal.exits[0] - removal.began) * 1000.0)
            status, _ = _get_json(daemon, f"/api/v1/modules/{module_id}")
            if status != 404:
                raise RuntimeError(f"{module_id} is still registered ({status}) after its removal")
    finally:
        watch.close()
    log = daemon.read_log()
    result = _summary_ms(samples)
    result["exit_median_ms"] = median(exits) if len(exits) == len(samples) else None
    result["exit_samples_ms"] = exits
    result["expired_log_lines"] = log.count(EXPIRED_LOG)
    result["pidfd_warning"] = NO_PIDFD_WARNING in log
    return result


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    bound: bool
    many: bool
    polling: bool = False

    @property
    def baseline(self) -> str:
        return "unbound_many" if self.many else "unbound_one"


SHAPES = (
    Shape("unbound_one", "unbound, 1 process", bound=False, many=False),
    Shape("one_process", "bound to 1 process", bound=True, many=False),
    Shape("unbound_many", "unbound, N processes", bound=False, many=True),
    Shape("many_processes", "bound to N processes", bound=True, many=True),
    Shape("many_processes_polled", "bound to N, polled", bound=True, many=True, polling=True),
)


def measure_shape(daemon: Server, shape: Shape, settings: Settings) -> dict[str, Any]:
    """One shape of the tracking cost (see the module's docstring)."""
    n = settings.modules
    ids = [f"{shape.key}-{number}" for number in range(n)]
    pid = daemon.pid
    result: dict[str, Any] = {
        "label": shape.label,
        "bound": shape.bound,
        "monitor": ("polling" if shape.polling else "pidfd") if shape.bound else None,
        "modules": n,
        "processes": n if shape.many else 1,
        "baseline": None if not shape.bound else shape.baseline,
    }
    result["idle_rss_kib"] = read_status_kib(pid, "VmRSS")
    result["fds_before"] = open_fds(pid)[0]
    socket_path = daemon.target("unix").path
    with ModuleProcesses(socket_path) as children:
        began = time.monotonic()
        if shape.many:
            children.fork_many(([module_id] for module_id in ids), shape.bound)
        else:
            children.fork_many([ids], shape.bound)
        result["fork_s"] = time.monotonic() - began
        children.wait("ready", len(children.pids), PHASE_TIMEOUT, daemon.check_alive)
        result["connected_s"] = time.monotonic() - began
        began = time.monotonic()
        children.go()
        children.wait("done", len(children.pids), PHASE_TIMEOUT, daemon.check_alive)
        publish_s = time.monotonic() - began
        result["publish_s"] = publish_s
        result["publish_rps"] = n / publish_s
        result["registered"] = registered(daemon)
        if result["registered"] != n:
            raise RuntimeError(f"{shape.key}: {result['registered']} of {n} modules registered")
        for number in sorted({0, len(children.pids) - 1}):
            check_bound(
                daemon,
                ids[number if shape.many else 0],
                children.pids[number] if shape.bound else None,
            )
        time.sleep(settings.settle)  # the daemon sees the connections close
        result["rss_kib"] = read_status_kib(pid, "VmRSS")
        result["fds"], result["pidfds"] = open_fds(pid)
        result["module_process_private_kib"] = children.private_kib()
        before = cpu_times(pid)
        time.sleep(settings.idle)
        after = cpu_times(pid)
        result["idle_s"] = settings.idle
        result["idle_cpu_ms"] = after[0] - before[0]
        result["idle_cpu_sched_ms"] = after[1] - before[1]
        if shape.bound:
            watch = WatchStream(socket_path)
            try:
                watch.wait(lambda: watch.hello, ROUND_TIMEOUT)
                removal = watch.kill_and_wait(
                    children.kill_all,
                    children.pids,
                    lambda: len(watch.expired) >= n,
                    PHASE_TIMEOUT,
                    fallback=lambda: registered(daemon) == 0,
                )
            finally:
                watch.close()
            began = removal.began
            exits = removal.exits
            result["last_exit_ms"] = (max(exits) - began) * 1000.0 if exits else None
            result["watch_dropped_after"] = removal.dropped_after
            result["removal_seen_by"] = "watch" if removal.dropped_after is None else "health"
            if removal.dropped_after is None:
                result["removal_ms"] = (max(watch.expired.values()) - began) * 1000.0
            else:
                result["removal_ms"] = (removal.done_at - began) * 1000.0
            result["expired_events"] = len(set(watch.expired) & set(ids))
            result["removal_per_module_us"] = result["removal_ms"] * 1000.0 / n
            result["removal_per_process_ms"] = result["removal_ms"] / result["processes"]
            result["first_removal_ms"] = (
                (min(watch.expired.values()) - began) * 1000.0 if watch.expired else None
            )
            result["remaining"] = registered(daemon)
            if result["remaining"] != 0 or (
                removal.dropped_after is None and result["expired_events"] != n
            ):
                raise RuntimeError(
                    f"{shape.key}: {result['expired_events']} of {n} expired events, "
                    f"{result['remaining']} still registered"
                )
    log = daemon.read_log()
    result["expired_log_lines"] = log.count(EXPIRED_LOG)
    result["pidfd_warning"] = NO_PIDFD_WARNING in log
    result["watchers_dropped"] = log.count(DROPPED_WATCHER)
    return result


def _ratios(shapes: dict[str, dict[str, Any]]) -> None:
    for cell in shapes.values():
        base = shapes.get(cell["baseline"] or "")
        if base is None:
            cell["rss_ratio"] = cell["publish_rps_ratio"] = cell["extra_bytes_per_module"] = None
            continue
        cell["rss_ratio"] = cell["rss_kib"] / base["rss_kib"]
        cell["publish_rps_ratio"] = cell["publish_rps"] / base["publish_rps"]
        cell["extra_bytes_per_module"] = (
            (cell["rss_kib"] - base["rss_kib"]) * 1024.0 / cell["modules"]
        )


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise BenchTimeout("the run did not finish within its --timeout")


def run(settings: Settings) -> dict[str, Any]:
    """Start the daemons, measure, stop everything; the results."""
    needed = 2 * settings.modules + FD_MARGIN
    soft, hard = raise_open_files(needed, to_hard=True)
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()),
            "open_files_limit": [soft, hard],
            "quick": settings.quick,
        },
        "settings": {
            "rounds": settings.rounds,
            "modules": settings.modules,
            "idle_s": settings.idle,
            "settle_s": settings.settle,
            "polling": settings.polling,
            "polled_shape": settings.polled_shape,
            "poll_interval_s": POLL_INTERVAL,
        },
        "notes": [],
    }
    notes: list[str] = results["notes"]
    began = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    try:
        with Workspace() as workspace:
            location, version, digest = workspace.installed_package()
            results["meta"].update(
                hsu_registry=location, hsu_registry_version=version, hsu_registry_digest=digest
            )
            # Every daemon starts at once, before any measurement: their
            # start-ups overlap nothing but each other.
            wanted = [("kill-pidfd", False)]
            if settings.polling:
                wanted.append(("kill-polling", True))
            wanted += [
                (shape.key, shape.polling)
                for shape in SHAPES
                if settings.polled_shape or not shape.polling
            ]
            progress(f"liveness: starting {len(wanted)} daemons")
            spawned = {
                name: spawn_daemon(workspace, name, wrapper=NO_PIDFD_WRAPPER if polling else ())
                for name, polling in wanted
            }
            polled = {name for name, polling in wanted if polling}
            try:
                _run(spawned, polled, settings, results, notes)
            finally:
                for process, _ in spawned.values():
                    stop_process(process, timeout=STOP_TIMEOUT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    results["meta"]["elapsed_s"] = time.monotonic() - began
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    return results


def _run(
    spawned: dict[str, tuple[subprocess.Popen[bytes], str]],
    polled: set[str],
    settings: Settings,
    results: dict[str, Any],
    notes: list[str],
) -> None:
    daemons: dict[str, Server] = {}
    for name, (process, log_path) in spawned.items():
        try:
            daemons[name] = await_server(name, process, log_path, 2, timeout=LISTEN_TIMEOUT)
        except RuntimeError as e:
            if name not in polled:
                raise
            stop_process(process, timeout=STOP_TIMEOUT)
            if not any("polling fallback" in note for note in notes):
                notes.append(f"the polling fallback was not measured: {e}")
    polling = settings.polling and "kill-polling" in daemons
    for daemon in daemons.values():
        limit = open_files_limit(daemon.pid)
        results["meta"].setdefault("daemon_open_files_limit", limit)
        if limit is not None and limit < 2 * settings.modules + FD_MARGIN:
            raise RuntimeError(f"daemon {daemon.name} may open only {limit} files")
        if daemon.name in polled:
            # The filter is in place when the daemon cannot have a pidfd.
            if open_fds(daemon.pid)[1]:
                raise RuntimeError(f"daemon {daemon.name} holds pidfds under the filter")

    kill: dict[str, Any] = {}
    results["kill"] = kill
    progress(f"liveness: {settings.rounds} kills, pidfd")
    kill["pidfd"] = measure_kill(daemons["kill-pidfd"], settings.rounds, polling=False)
    if kill["pidfd"]["pidfd_warning"]:
        notes.append("the default daemon could not open a pidfd: it polled")
    if polling:
        progress(f"liveness: {settings.rounds} kills, polling fallback")
        kill["polling"] = measure_kill(daemons["kill-polling"], settings.rounds, polling=True)
        if not kill["polling"]["pidfd_warning"]:
            raise RuntimeError("the daemon under the no-pidfd filter did not fall back to polling")
    else:
        kill["polling"] = None

    shapes: dict[str, dict[str, Any]] = {}
    results["tracking"] = {"modules": settings.modules, "shapes": shapes}
    for shape in SHAPES:
        if shape.key not in daemons:
            continue
        progress(f"liveness: {settings.modules} modules, {shape.label}")
        cell = measure_shape(daemons[shape.key], shape, settings)
        shapes[shape.key] = cell
        if shape.bound and not shape.polling and cell["pidfd_warning"]:
            notes.append(f"{shape.key}: the daemon could not open every pidfd (it polled some)")
        if shape.bound and cell["pidfds"] != (0 if shape.polling else cell["processes"]):
            notes.append(
                f"{shape.key}: the daemon held {cell['pidfds']} pidfds for "
                f"{cell['processes']} processes"
            )
        if cell.get("watch_dropped_after") is not None:
            notes.append(
                f"{shape.key}: the daemon dropped the watch stream "
                f"({cell['watchers_dropped']} 'Disconnecting a watcher' in its log) when every "
                "module process was killed: the removal was seen through health"
            )
        daemons[shape.key].stop(STOP_TIMEOUT)  # its memory is measured: no need to keep it
    _ratios(shapes)
    results["meta"]["daemon_log_tail"] = log_tail(daemons["kill-pidfd"].log_path, 400)


# -- the table -----------------------------------------------------------------


def _removal(cell: dict[str, Any]) -> str:
    if cell.get("removal_seen_by") == "health":
        return fmt(cell["removal_ms"], "7.1f") + "h"
    return fmt(cell.get("removal_ms"), "8.1f")


def render(results: dict[str, Any], notes: bool = True) -> str:
    """The results as a small table (with their notes unless C{notes} is false)."""
    s = results["settings"]
    meta = results["meta"]
    lines = [
        "Process liveness: registrations bound to the publishing process (published over the "
        "unix socket with its own PID as processID);",
        f"{meta['cpus']} CPUs shared with the client.  Kill -9 of a module process to its "
        "removal, seen as 'event: expired' on a watch stream",
        "(GET /api/v1/watch, unix socket), ms; one new process per round (with polling, killed "
        f"a random 0-{s['poll_interval_s']:g} s after its binding);",
        "exit med = the median to the process's exit seen by this client's own pidfd (the "
        "kernel's share).",
        f"  {'monitor':<38} {'rounds':>6} {'median':>8} {'p90':>8} {'max':>8} {'min':>8} "
        f"{'exit med':>8}",
    ]
    kill = results.get("kill", {})
    for key, label in (
        ("pidfd", "pidfd (default)"),
        ("polling", f"polling fallback (/proc every {s['poll_interval_s']:g} s)"),
    ):
        cell = kill.get(key)
        if cell is None:
            lines.append(f"  {label:<38} skipped")
            continue
        lines.append(
            f"  {label:<38} {cell['rounds']:>6} {cell['median_ms']:8.2f} {cell['p90_ms']:8.2f} "
            f"{cell['max_ms']:8.2f} {cell['min_ms']:8.2f} {fmt(cell['exit_median_ms'], '8.2f')}"
        )
    if kill.get("polling") is not None:
        lines.append(
            "  polling: the daemon runs under a seccomp filter denying pidfd_open (as on a "
            "kernel before 5.3) and falls back by itself."
        )
    tracking = results.get("tracking")
    if tracking:
        n = tracking["modules"]
        lines += [
            f"Cost of process tracking: {n} registrations of 1 API in each shape, a fresh daemon "
            f"each; N = {n} processes of one module each.",
            "Publish: 1 process sends its publishes in turn on one connection, N processes at "
            "once on their own (closed each after).  x base = / the",
            "unbound shape with as many processes; B/reg+ = RSS bytes per registration over it; "
            f"idle CPU = utime+stime over {s['idle_s']:g} s (10 ms ticks);",
            "removal = killpg of every module process to the last expired event, last exit = to "
            "the last exit seen by this client; per mod = removal / modules.",
            f"  {'shape':<22} {'procs':>5} {'pidfds':>6} {'fds':>6} {'RSS MiB':>7} {'x base':>6} "
            f"{'B/reg+':>6} {'publish s':>9} {'req/s':>7} {'x base':>6} {'idle CPU':>8} "
            f"{'removal':>8} {'last exit':>9} {'per mod':>7}",
            f"  {'':<22} {'':>5} {'':>6} {'':>6} {'':>7} {'':>6} {'':>6} {'':>9} {'':>7} {'':>6} "
            f"{'ms':>8} {'ms':>8} {'ms':>9} {'us':>7}",
        ]
        for cell in tracking["shapes"].values():
            lines.append(
                f"  {cell['label']:<22} {cell['processes']:>5} {cell['pidfds']:>6} "
                f"{cell['fds']:>6} {cell['rss_kib'] / 1024:7.1f} {fmt(cell['rss_ratio'], '6.2f')} "
                f"{fmt(cell['extra_bytes_per_module'], '6.0f')} {cell['publish_s']:9.2f} "
                f"{cell['publish_rps']:7.0f} {fmt(cell['publish_rps_ratio'], '6.2f')} "
                f"{cell['idle_cpu_ms']:8.0f} {_removal(cell)} "
                f"{fmt(cell.get('last_exit_ms'), '9.1f')} "
                f"{fmt(cell.get('removal_per_module_us'), '7.1f')}"
            )
        private = [
            cell["module_process_private_kib"]
            for cell in tracking["shapes"].values()
            if cell["processes"] > 1 and cell["module_process_private_kib"] is not None
        ]
        if private:
            lines.append(
                f"  The module processes (forked from this client): about {median(private):.0f} "
                "KiB private memory each (smaps_rollup, a sample)."
            )
        dropped = [
            f"{cell['label']}: {cell['watch_dropped_after']}"
            for cell in tracking["shapes"].values()
            if cell.get("watch_dropped_after") is not None
        ]
        if dropped:
            lines += [
                "  h = the daemon dropped the watch stream, a burst of expired changes outgrowing "
                "its limit of events queued for a watcher;",
                f"  removal = then when health's registeredModules reached 0 (polled every "
                f"{FALLBACK_POLL * 1000:g} ms).  Expired events received before the drop:",
                "  " + "; ".join(dropped) + ".",
            ]
        if not s["polled_shape"]:
            lines.append("  bound to N, polled: skipped" + (" (--quick)" if meta["quick"] else ""))
    if notes:
        for note in results.get("notes", []):
            lines.append(f"note: {note}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> tuple[Settings, str]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.liveness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=None, help="kills per monitor (default 20)")
    parser.add_argument(
        "--modules", type=int, default=None, help="registrations per shape (default 5000)"
    )
    parser.add_argument(
        "--idle", type=float, default=None, help="seconds of idle CPU measured (default 5)"
    )
    parser.add_argument(
        "--no-polling", action="store_true", help="skip the polling fallback (kills and shape)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="5 rounds, 1 000 modules, 0.5 s idle, no polled shape",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"bound on the whole run, s (default {TIMEOUT_S[False]:g})",
    )
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = parser.parse_args(argv)
    quick = args.quick
    settings = Settings(
        rounds=args.rounds if args.rounds is not None else (5 if quick else 20),
        modules=args.modules if args.modules is not None else (1000 if quick else 5000),
        idle=args.idle if args.idle is not None else (0.5 if quick else 5.0),
        settle=0.3 if quick else 1.0,
        polling=not args.no_polling,
        polled_shape=not args.no_polling and not quick,
        timeout=args.timeout if args.timeout is not None else TIMEOUT_S[quick],
        quick=quick,
    )
    if settings.rounds < 1 or settings.modules < 1 or settings.idle < 0:
        parser.error("--rounds and --modules must be at least 1, --idle not negative")
    return settings, args.json


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    section_main("liveness", argv, _parse, run, render)


if __name__ == "__main__":
    main()

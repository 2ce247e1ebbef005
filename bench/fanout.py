"""
Watch fan-out: how the daemon copes with many idle watchers and held
blocking queries, and how fast one change reaches all of them.

``python -m bench.fanout [--watchers 1000] [--queries 1000] [--publishes 20]
[--solo-publishes 5] [--read-during-fanout] [--quick] [--timeout S] [--json PATH]``

The installed C{hsu-registry} runs in its own process, listening on an
ephemeral TCP port on 127.0.0.1 only; this process is the client (asyncio,
standard library only), after raising its open-file limit (which the daemon
inherits) to fit every connection.  Connections are opened in batches well
below the daemon's listen backlog (1024), each batch waited for.

 1. Warm-up: one watcher and one blocking query are opened, answered by a
    change and closed, so that code paths run once before the baseline.
 2. Memory: the daemon's VmRSS before, with N idle SSE watchers
    (C{GET /api/v1/watch}, C{Accept: text/event-stream}; each has had its
    C{hello}), and with N watchers and M held blocking queries
    (C{GET /api/v1/modules?index=<X-HSU-Index>&wait=60s}).  A query is
    I{held} when the daemon has accepted its connection and read its request
    (C{/proc/net/tcp}: the daemon's socket is among its file descriptors and
    has nothing left to read) and it has not been answered.  The daemon's
    side of each connection is found by both ends' addresses (127.0.0.1 and
    the daemon's port, 127.0.0.1 and the connection's own port), not by the
    port number alone: any other socket on the machine may have the same
    number on another address (or be another process's connection to the
    daemon); those are counted apart, never waited for.  A wait for the
    daemon to settle ends after C{SETTLE_TIMEOUT} seconds without progress;
    when the daemon spent most of them waiting for a CPU (its C{schedstat}),
    the section is not measured, with that reason in its JSON and table,
    instead of failing; otherwise the daemon's failure to accept or read is
    an error that says so.
 3. Fan-out, watchers only: C{--solo-publishes} changes (a new module each),
    published over a separate persistent connection while only the watchers
    are open.
 4. Fan-out, watchers and held queries: C{--publishes} changes; after each,
    the queries are sent again with the new index and held again.
    For each change: the time from writing the publish to its 200 answer,
    to the first and the last watcher having the whole event, and to the
    first and the last query answer; the daemon's CPU time for it
    (C{/proc/PID/schedstat}).  Arrivals are timed by the kernel's receive
    stamp (C{SO_TIMESTAMPNS}, read with C{recvmsg}): over loopback that is
    when the daemon sent the bytes, whatever this one-threaded client was
    busy with.  By default the client reads nothing while the daemon fans a
    change out (it waits, with epoll, until every socket has data), so that
    on a 2-CPU machine it takes no CPU from the daemon; with
    C{--read-during-fanout} it reads as data comes and also reports when it
    read the last answers ("as read").
 5. Delivery: every watcher's stream is parsed at the end (chunked
    transfer coding, then C{id:}/C{event:}/C{data:} lines); each must hold
    its C{hello} and then every change exactly once, in order, each a
    C{published} event of the module published with the index as its id.
 6. Stop: SIGTERM with every watcher and query still open: how long the
    daemon takes to exit and how many streams and queries it ended cleanly.

Every wait has a timeout and the whole run is bounded (C{--timeout}); the
daemon is killed at the end whatever happens.  Progress goes to stderr, the
table to stdout, everything to JSON (by default C{bench/results/fanout.json}).
C{--quick} (50 watchers, 50 queries, 3 + 2 publishes) checks the harness in a
few seconds; its figures mean little.  C{python -m bench} runs this module as
its C{fanout} section (with C{--quick} under C{--quick}).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import select
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bench.daemon import (
    BENCH_DIR,
    Server,
    Workspace,
    await_server,
    log_tail,
    open_files_limit,
    raise_open_files,
    read_status_kib,
    spawn_daemon,
    stop_process,
)
from bench.probe import request_bytes
from bench.section import progress, section_main
from bench.sse import Event, SSEParser, Stamp, parse_head, watch_request
from bench.stats import median
from bench.workload import PUBLISH_PATH, publish_body

__all__ = ["main", "run"]

HOST = "127.0.0.1"
DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "fanout.json")
#: The bound on the whole run (--timeout), s, with --quick and without.
TIMEOUT_S = {True: 60.0, False: 300.0}
#: The target: publish to the last watcher notified, in milliseconds.
LAST_WATCHER_TARGET_MS = 50.0
#: Connections opened at once; well below the daemon's listen backlog of 1024.
BATCH = 200
#: The wait asked of every blocking query (longer than any round).
QUERY_WAIT = "60s"
#: Longest wait for one publish to reach everybody, and for connections to
#: settle without progress (s).
ROUND_TIMEOUT = 20.0
SETTLE_TIMEOUT = 30.0
#: A daemon that spent this share of a stalled wait runnable but waiting for a
#: CPU was starved by the machine: the section is not measured.
STARVED_SHARE = 0.5
#: File descriptors kept beyond the connections (the daemon's and ours).
FD_MARGIN = 256
#: Linux: stamp received data with the kernel's time (not in the socket module).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_ANCILLARY_SIZE = socket.CMSG_SPACE(16)
_READ_SIZE = 256 * 1024


# -- timing and answers ------------------------------------------------------


class Sent(NamedTuple):
    """When a request was written: C{time.time_ns()} and C{time.perf_counter()}."""

    ns: int
    perf: float

    @classmethod
    def now(cls) -> Sent:
        return cls(time.time_ns(), time.perf_counter())

    def to(self, stamp: Stamp) -> float:
        """Milliseconds from this send to the kernel's arrival stamp (else to the read)."""
        if stamp.ns:
            return (stamp.ns - self.ns) / 1e6
        return self.to_read(stamp)

    def to_read(self, stamp: Stamp) -> float:
        """Milliseconds from this send to this process reading the bytes."""
        return (stamp.read - self.perf) * 1000


NEVER = Sent(0, 0.0)


@dataclass
class Answer:
    """A whole HTTP answer with a Content-Length, and when it was asked and came."""

    status: int
    headers: dict[str, str]
    body: bytes
    sent: Sent
    stamp: Stamp

    @property
    def index(self) -> int | None:
        """Its X-HSU-Index."""
        value = self.headers.get("x-hsu-index")
        return int(value) if value is not None and value.isdigit() else None


# -- the client's connections ---------------------------------------------------


class Hub:
    """What the connections report, and the futures the run waits on."""

    def __init__(self) -> None:
        self.want = 0  # events each watcher is to have received (hello included)
        self.reached = 0  # watchers that have
        self.answered = 0  # queries answered since the last arm()
        self.lost = 0  # connections lost other than by our closing them
        self.kernel_stamps = 0  # reads the kernel stamped
        self.reads = 0
        self._watchers_target = 0
        self._queries_target = 0
        self._done: asyncio.Future[None] | None = None

    def arm(self, want: int, watchers: int, queries: int) -> asyncio.Future[None]:
        """A future done when C{watchers} have C{want} events and C{queries} answers came."""
        self.want = want
        self.reached = 0
        self.answered = 0
        self._watchers_target = watchers
        self._queries_target = queries
        self._done = asyncio.get_running_loop().create_future()
        self._check()
        return self._done

    def expect_more(self, watchers: int) -> asyncio.Future[None]:
        """Like L{arm}, keeping the count: for watchers joining at the same C{want}."""
        self._watchers_target = watchers
        self._queries_target = 0
        self._done = asyncio.get_running_loop().create_future()
        self._check()
        return self._done

    def watcher_reached(self) -> None:
        self.reached += 1
        self._check()

    def query_answered(self) -> None:
        self.answered += 1
        self._check()

    def _check(self) -> None:
        done = self._done
        if (
            done is not None
            and not done.done()
            and self.reached >= self._watchers_target
            and self.answered >= self._queries_target
        ):
            done.set_result(None)


class Connection:
    """
    A client TCP connection read by the event loop with C{recvmsg}, so that
    every read carries the kernel's receive time (see L{Stamp}).
    """

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.sock: socket.socket | None = None
        #: This end's port on 127.0.0.1, once connected (kept after closing).
        self.local_port: int | None = None
        self.closing = False
        self.lost_at: float | None = None
        self.lost_reason: str | None = None

    async def connect(self, port: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.local_port = sock.getsockname()[1]
        loop.add_reader(sock.fileno(), self._readable)
        self.connected()

    def connected(self) -> None:
        """Called once connected."""

    def received(self, stamp: Stamp, data: bytes) -> None:
        """Called with every read."""

    def lost(self) -> None:
        """Called when the daemon closed the connection or it failed."""

    def write(self, payload: bytes) -> None:
        assert self.sock is not None
        # A request is small and the socket's buffer empty: it goes whole.
        if self.sock.send(payload) != len(payload):
            raise RuntimeError("a request did not fit in the socket's buffer")

    def pause(self) -> None:
        """Stop reading (what arrives waits in the socket, stamped by the kernel)."""
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def resume(self) -> None:
        """Read again."""
        if self.sock is not None:
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        read = time.perf_counter()
        assert self.sock is not None
        try:
            data, ancillary, _, _ = self.sock.recvmsg(_READ_SIZE, _ANCILLARY_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._gone(str(e))
            return
        if not data:
            self._gone("closed by the daemon")
            return
        ns = 0
        for level, kind, raw in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                seconds, nanoseconds = struct.unpack("qq", raw[:16])
                ns = seconds * 1_000_000_000 + nanoseconds
        hub = self.hub
        hub.reads += 1
        if ns:
            hub.kernel_stamps += 1
        self.received(Stamp(ns, read), data)

    def _gone(self, reason: str) -> None:
        self.lost_at = time.perf_counter()
        self.lost_reason = reason
        self._release()
        if not self.closing:
            self.hub.lost += 1
        self.lost()

    def _release(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def close(self) -> None:
        """Reset the connection (no lingering FIN handshakes with 2 000 sockets)."""
        self.closing = True
        if self.sock is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._release()


class Watcher(Connection):
    """
    One SSE watcher.  Arrivals are only stamped and kept (parsed at the end);
    events are counted on the way by their C{event:} line to know when all came.
    """

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.chunks: list[tuple[Stamp, bytes]] = []
        self.seen = 0
        self.counted = 0

    def connected(self) -> None:
        self.write(watch_request(HOST))

    def received(self, stamp: Stamp, data: bytes) -> None:
        self.chunks.append((stamp, data))
        self.seen += data.count(b"\nevent: ")
        hub = self.hub
        if self.seen >= hub.want > self.counted:
            self.counted = hub.want
            hub.watcher_reached()

    def parse(self) -> SSEParser:
        """Everything received, parsed."""
        parser = SSEParser()
        for stamp, data in self.chunks:
            parser.feed(stamp, data)
        return parser


class Exchange(Connection):
    """
    A persistent HTTP/1.1 connection, one request at a time; answers must
    carry a Content-Length.  The blocking queries (counted by the hub) and
    the publisher (not counted).
    """

    def __init__(self, hub: Hub, counted: bool = True) -> None:
        super().__init__(hub)
        self.counted = counted
        self.answers: list[Answer] = []
        self.pending: asyncio.Future[Answer] | None = None
        self.sent = Sent(0, 0.0)
        self.errors: list[str] = []
        self._buffer = bytearray()
        self._need = -1
        self._body_at = 0
        self._status = 0
        self._headers: dict[str, str] = {}

    @property
    def waiting(self) -> bool:
        """Whether a request is out and unanswered."""
        return self.pending is not None and not self.pending.done()

    def send(self, payload: bytes) -> asyncio.Future[Answer]:
        """Write a request; the future of its answer."""
        assert not self.waiting
        self.pending = asyncio.get_running_loop().create_future()
        # A failure nobody waits for (a held query cut at the daemon's stop) is
        # counted from the answers, not reported as never retrieved.
        self.pending.add_done_callback(_retrieve)
        self.sent = Sent.now()
        self.write(payload)
        return self.pending

    def received(self, stamp: Stamp, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._need < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._status, self._headers = parse_head(bytes(buffer[:end]))
            length = self._headers.get("content-length")
            if length is None or not length.isdigit():
                self._fail("an answer without Content-Length")
                return
            self._body_at = end + 4
            self._need = self._body_at + int(length)
        if len(buffer) < self._need:
            return
        if len(buffer) > self._need or self.pending is None or self.pending.done():
            self._fail("bytes nobody asked for")
            return
        answer = Answer(
            self._status, self._headers, bytes(buffer[self._body_at :]), self.sent, stamp
        )
        buffer.clear()
        self._need = -1
        self.answers.append(answer)
        self.pending.set_result(answer)
        if self.counted:
            self.hub.query_answered()

    def _fail(self, reason: str) -> None:
        self.errors.append(reason)
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(RuntimeError(reason))
        self.close()

    def lost(self) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.set_exception(ConnectionError(f"connection lost: {self.lost_reason}"))

    def close(self) -> None:
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()
        super().close()


def _retrieve(future: asyncio.Future[Answer]) -> None:
    if not future.cancelled():
        future.exception()


def _query(index: int) -> bytes:
    return request_bytes("GET", f"/api/v1/modules?index={index}&wait={QUERY_WAIT}", host=HOST)


# -- what /proc tells about the daemon ----------------------------------------


#: 127.0.0.1 as C{/proc/net/tcp} writes an address: its bytes as a native-order
#: 32-bit number, in hexadecimal.
_HOST_HEX = f"{struct.unpack('=I', socket.inet_aton(HOST))[0]:08X}"


@dataclass
class Census:
    """
    The daemon's side of this client's TCP connections, and the other
    established sockets with the daemon's port number.
    """

    established: int = 0  # this client's connections, in the kernel
    accepted: int = 0  # of which the daemon holds the socket (accept() done)
    unread: int = 0  # with request bytes the daemon has not read
    unsent: int = 0  # with answer bytes not yet taken by the client
    lingering: int = 0  # connections this client closed, still established
    strangers: int = 0  # other connections to the daemon: not this client's
    elsewhere: int = 0  # the port number on another address: not the daemon's

    def settled(self, connections: int) -> bool:
        """
        Whether exactly C{connections} are accepted, all read and all sent,
        and none this client closed is left.
        """
        return (
            self.established == connections
            and self.accepted == connections
            and not self.unread
            and not self.unsent
            and not self.lingering
        )

    def outstanding(self, connections: int) -> int:
        """How far from L{settled}: connections not accepted or left, and bytes in flight."""
        return max(connections - self.accepted, 0) + self.unread + self.unsent + self.lingering

    def describe(self, connections: int, port: int) -> str:
        """What is not settled, in words."""
        text = (
            f"of this client's {connections} connections, {self.established} established, "
            f"{self.accepted} accepted by the daemon, {self.unread} with request bytes it has "
            f"not read, {self.unsent} with answer bytes not taken by the client"
        )
        if self.lingering:
            text += f"; {self.lingering} it closed still established at the daemon"
        if self.strangers:
            text += f"; {self.strangers} other connections to the daemon (not counted)"
        if self.elsewhere:
            text += (
                f"; {self.elsewhere} sockets with port number {port} on other addresses "
                "(not the daemon's, not counted)"
            )
        return text


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def tally(
    lines: Iterable[str],
    port: int,
    peers: Collection[int],
    inodes: Collection[int],
    gone: Collection[int] = (),
) -> Census:
    """
    Count the established sockets of C{/proc/net/tcp} (C{lines}) with port
    number C{port}: the daemon's side of this client's connections, found by
    both ends' addresses (127.0.0.1:C{port} and 127.0.0.1 with one of the
    client's ports, C{peers}), each accepted when its inode is among the
    daemon's (C{inodes}); those of the client's closed connections (their
    ports C{gone}) still there; and, apart, other connections to the daemon
    and sockets on other addresses that merely share the port number.
    """
    found = Census()
    for line in lines:
        parts = line.split()
        if len(parts) < 10 or parts[3] != "01":
            continue
        local_address, _, local_port = parts[1].partition(":")
        if int(local_port, 16) != port:
            continue
        if local_address != _HOST_HEX:
            found.elsewhere += 1
            continue
        remote_address, _, remote_text = parts[2].partition(":")
        remote_port = int(remote_text, 16) if remote_address == _HOST_HEX else None
        if remote_port not in peers:
            if remote_port in gone:
                found.lingering += 1
            else:
                found.strangers += 1
            continue
        tx_queue, rx_queue = (int(x, 16) for x in parts[4].split(":"))
        found.established += 1
        if int(parts[9]) in inodes:
            found.accepted += 1
        if rx_queue:
            found.unread += 1
        if tx_queue:
            found.unsent += 1
    return found


def census(pid: int, port: int, peers: Collection[int], gone: Collection[int] = ()) -> Census:
    """L{tally} C{/proc/net/tcp} for the daemon C{pid} on C{port} and this client's C{peers}."""
    inodes = _socket_inodes(pid)
    with open("/proc/net/tcp", encoding="ascii") as table:
        return tally(table, port, peers, inodes, gone)


class Schedule(NamedTuple):
    """The daemon's main thread as the scheduler saw it."""

    ran_ns: int  # on a CPU (C{/proc/PID/schedstat})
    waited_ns: int  # runnable, waiting for a CPU
    state: str  # R running, S sleeping, D waiting in the kernel, T stopped, ...


def schedule(pid: int) -> Schedule | None:
    """The daemon's L{Schedule} now, if the kernel keeps one."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
            ran, waited = stat.read().split()[:2]
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0].decode("ascii")
        return Schedule(int(ran), int(waited), state)
    except (OSError, ValueError, IndexError):
        return None


class Unsettled(RuntimeError):
    """
    The daemon did not settle: what was outstanding and, from its
    L{Schedule} over the stalled time, whether the machine starved it of
    CPU (C{starved}: the section cannot measure) or not (an error).
    """

    def __init__(
        self,
        what: str,
        connections: int,
        port: int,
        found: Census,
        stalled_s: float,
        before: Schedule | None,
        after: Schedule | None,
    ) -> None:
        self.found = found
        self.starved = False
        message = (
            f"{what}: the daemon did not settle at {connections} connections "
            f"(no progress for {stalled_s:.1f} s): {found.describe(connections, port)}"
        )
        if before is None or after is None:
            message += "; the daemon's CPU time is unknown (no /proc/PID/schedstat)"
        else:
            ran_ms = (after.ran_ns - before.ran_ns) / 1e6
            waited_ms = (after.waited_ns - before.waited_ns) / 1e6
            message += (
                f"; meanwhile the daemon ran {ran_ms:.0f} ms and waited {waited_ms:.0f} ms "
                f"for a CPU (state {after.state})"
            )
            if after.state == "T":
                message += ": it is stopped"
            elif waited_ms >= STARVED_SHARE * stalled_s * 1000:
                self.starved = True
                message += ": the machine is too busy to measure"
            else:
                message += (
                    ": it was not starved of CPU, yet it did not accept or read "
                    "this client's connections"
                )
        super().__init__(message)


async def settle(
    read: Callable[[], Census],
    connections: int,
    what: str,
    port: int,
    *,
    timeout: float = SETTLE_TIMEOUT,
    daemon: Callable[[], Schedule | None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Census:
    """
    Wait until C{read()} says C{connections} are settled (L{Census.settled}),
    as long as each C{timeout} seconds bring progress (fewer outstanding than
    ever before): a starved daemon that works through a batch slowly is
    waited for, a stuck one is not.

    @raise Unsettled: C{timeout} seconds without progress.
    """
    best = -1
    since = clock()
    before = daemon()
    while True:
        found = read()
        if found.settled(connections):
            return found
        left = found.outstanding(connections)
        now = clock()
        if best < 0 or left < best:
            best, since, before = left, now, daemon()
        elif now - since > timeout:
            raise Unsettled(what, connections, port, found, now - since, before, daemon())
        await sleep(0.02)


def cpu_ns(pid: int) -> int | None:
    """Nanoseconds the daemon's main thread has run (C{/proc/PID/schedstat})."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# -- the run -------------------------------------------------------------------


@dataclass
class Settings:
    watchers: int
    queries: int
    publishes: int
    solo_publishes: int
    settle: float
    timeout: float
    #: Read watchers and queries while the daemon fans a change out (else
    #: only once every one of them has its answer waiting in its socket).
    read_during: bool = False


@dataclass
class Round:
    """One publish and what came of it."""

    phase: str  # "solo" (watchers only) or "both"
    module: str
    sent: Sent = NEVER
    publish_ms: float | None = None
    index: int | None = None
    queries_held: int = 0
    query_ms: list[float] = field(default_factory=list)
    query_read_ms: list[float] = field(default_factory=list)
    query_bad: int = 0  # answered but not 200 with the new index
    cpu_ms: float | None = None
    timed_out: str | None = None


class Fanout:
    """The client side of one run against a started daemon."""

    def __init__(self, settings: Settings, pid: int, port: int, alive: Callable[[], None]) -> None:
        self.settings = settings
        self.pid = pid
        self.port = port
        self.alive = alive
        self.hub = Hub()
        self.watchers: list[Watcher] = []
        self.queries: list[Exchange] = []
        self.publisher = Exchange(self.hub, counted=False)
        self.rounds: list[Round] = []
        self.results: dict[str, Any] = {"notes": []}
        self.index = 0
        self._noted: set[str] = set()

    # -- helpers

    async def _settle(
        self, connections: Sequence[Connection], what: str, closed: Sequence[Connection] = ()
    ) -> Census:
        """
        Wait until the daemon has accepted C{connections} and read everything
        sent on them, and let go of the C{closed} ones (see L{settle});
        others' sockets are noted, not waited for.
        """
        peers = {c.local_port for c in connections if c.local_port is not None}
        gone = {c.local_port for c in closed if c.local_port is not None} - peers

        def read() -> Census:
            self.alive()
            return census(self.pid, self.port, peers, gone)

        found = await settle(
            read, len(connections), what, self.port, daemon=lambda: schedule(self.pid)
        )
        if found.strangers and "strangers" not in self._noted:
            self._noted.add("strangers")
            self.results["notes"].append(
                f"{what}: {found.strangers} connections to the daemon were not this client's "
                "(another process connected to its port): its figures include them"
            )
        if found.elsewhere and "elsewhere" not in self._noted:
            self._noted.add("elsewhere")
            self.results["notes"].append(
                f"{what}: {found.elsewhere} sockets of other processes had the daemon's port "
                f"number ({self.port}) on other addresses: not the daemon's, not counted"
            )
        return found

    async def rss(self) -> int:
        """The daemon's VmRSS (KiB) once settled: the median of three reads."""
        await asyncio.sleep(self.settings.settle)
        reads = []
        for _ in range(3):
            self.alive()
            reads.append(read_status_kib(self.pid, "VmRSS"))
            await asyncio.sleep(0.1)
        return int(median(reads))

    async def _call(self, payload: bytes) -> Answer:
        return await asyncio.wait_for(self.publisher.send(payload), ROUND_TIMEOUT)

    async def _publish(self, module: str, process_id: int) -> None:
        answer = await self._call(
            request_bytes("POST", PUBLISH_PATH, publish_body(module, process_id), HOST)
        )
        if answer.status != 200:
            raise RuntimeError(f"publish answered {answer.status}: {answer.body[:200]!r}")

    async def _current_index(self) -> int:
        answer = await self._call(request_bytes("GET", "/api/v1/modules", host=HOST))
        if answer.status != 200 or answer.index is None:
            raise RuntimeError(f"/api/v1/modules answered {answer.status} {answer.body[:200]!r}")
        return answer.index

    def _connections(self) -> list[Connection]:
        """Every connection this client has opened and not closed since the warm-up."""
        return [self.publisher, *self.watchers, *self.queries]

    async def _open(self, make: Callable[[], Connection], count: int) -> list[Connection]:
        """C{count} new connections, opened together."""
        made = [make() for _ in range(count)]
        await asyncio.gather(*(c.connect(self.port, SETTLE_TIMEOUT) for c in made))
        return made

    # -- phases

    async def warm_up(self) -> None:
        """One watcher and one blocking query, answered by a change, then closed."""
        await self.publisher.connect(self.port, 10)
        await self._publish("fanout-warmup", 1)
        index = await self._current_index()
        hub = Hub()
        hello = hub.arm(1, 1, 0)
        watcher = Watcher(hub)
        query = Exchange(hub)
        await watcher.connect(self.port, 10)
        await query.connect(self.port, 10)
        held = query.send(_query(index))
        await asyncio.wait_for(hello, 10)
        await self._settle([self.publisher, watcher, query], "warm-up")
        if query.answers:
            raise RuntimeError("the warm-up's blocking query was answered before any change")
        change = hub.arm(2, 1, 1)
        await self._publish("fanout-warmup", 2)
        await asyncio.wait_for(asyncio.gather(held, change), 10)
        watcher.close()
        query.close()
        self.index = await self._current_index()
        await self._settle([self.publisher], "after the warm-up", closed=[watcher, query])

    async def open_watchers(self) -> None:
        hub = self.hub
        hub.arm(1, 0, 0)
        total = self.settings.watchers
        while len(self.watchers) < total:
            count = min(BATCH, total - len(self.watchers))
            self.watchers.extend(
                w for w in await self._open(lambda: Watcher(hub), count) if isinstance(w, Watcher)
            )
            try:
                await asyncio.wait_for(hub.expect_more(len(self.watchers)), SETTLE_TIMEOUT)
            except asyncio.TimeoutError:
                raise RuntimeError(
                    f"only {hub.reached} of {len(self.watchers)} watchers got their hello"
                ) from None
        await self._settle(self._connections(), "watchers")
        firsts = {str(e[:1] and (e[0].event, e[0].id)) for e in self._events()}
        if firsts != {str(("hello", str(self.index)))}:
            self.results["notes"].append(
                f"the watchers' first events are {sorted(firsts)}, not hello with id {self.index}"
            )

    def _events(self) -> list[list[Event]]:
        return [w.parse().events for w in self.watchers]

    async def open_queries(self) -> None:
        total = self.settings.queries
        index = self.index = await self._current_index()
        while len(self.queries) < total:
            count = min(BATCH, total - len(self.queries))
            batch = [
                q
                for q in await self._open(lambda: Exchange(self.hub), count)
                if isinstance(q, Exchange)
            ]
            for query in batch:
                query.send(_query(index))
            self.queries.extend(batch)
            await self._settle(self._connections(), "blocking queries")
        await self._check_held(index)

    async def _check_held(self, index: int) -> None:
        """Every query held by the daemon: accepted, read, and not answered."""
        found = await self._settle(self._connections(), "held queries")
        answered = sum(1 for q in self.queries if not q.waiting)
        if answered:
            raise RuntimeError(f"{answered} blocking queries were answered before any change")
        if await self._current_index() != index:
            raise RuntimeError("the index moved while the queries were being held")
        self.results.setdefault("held_checks", []).append(
            {"connections": found.accepted, "queries_held": len(self.queries)}
        )

    async def publish(self, phase: str, number: int) -> Round:
        """Publish one change and wait for every watcher and held query to hear of it."""
        self.alive()
        held = sum(1 for q in self.queries if q.waiting)
        done = Round(phase, f"fanout-{phase}-{number}", queries_held=held)
        payload = request_bytes(
            "POST", PUBLISH_PATH, publish_body(done.module, 1000 + number), HOST
        )
        everyone = self.hub.arm(self.hub.want + 1, len(self.watchers), held)
        quiet = [] if self.settings.read_during else [*self.watchers, *self.queries]
        for connection in quiet:
            connection.pause()
        before = cpu_ns(self.pid)
        answer_future = self.publisher.send(payload)
        done.sent = self.publisher.sent
        try:
            if quiet:
                await self._all_readable(quiet, len(self.watchers) + held)
                for connection in quiet:
                    connection.resume()
            await asyncio.wait_for(
                asyncio.gather(asyncio.shield(answer_future), asyncio.shield(everyone)),
                ROUND_TIMEOUT,
            )
        except asyncio.TimeoutError:
            done.timed_out = (
                f"after {ROUND_TIMEOUT:g}s: {self.hub.reached} of {len(self.watchers)} watchers, "
                f"{self.hub.answered} of {held} queries"
            )
            progress(f"  {done.module}: timed out {done.timed_out}")
        after = cpu_ns(self.pid)
        if before is not None and after is not None:
            done.cpu_ms = (after - before) / 1e6
        if not answer_future.done() or answer_future.cancelled() or answer_future.exception():
            raise RuntimeError(f"{done.module}: the publish was not answered")
        answer = answer_future.result()
        if answer.status != 200:
            raise RuntimeError(f"publish answered {answer.status}: {answer.body[:200]!r}")
        done.publish_ms = done.sent.to(answer.stamp)
        done.index = index = await self._current_index()
        if index != self.index + 1:
            self.results["notes"].append(
                f"{done.module}: the index went from {self.index} to {index}"
            )
        self.index = index
        for query in self.queries:
            if query.waiting or not query.answers:
                continue
            last = query.answers[-1]
            if last.sent.perf >= done.sent.perf or last.stamp.read < done.sent.perf:
                continue  # not a query held over this publish
            done.query_ms.append(done.sent.to(last.stamp))
            done.query_read_ms.append(done.sent.to_read(last.stamp))
            if last.status != 200 or last.index != index:
                done.query_bad += 1
        self.rounds.append(done)
        return done

    async def _all_readable(self, connections: list[Connection], count: int) -> None:
        """
        Wait, reading nothing, until C{count} of C{connections} have data
        waiting: this client then takes no CPU from the daemon while it fans
        the change out (on a shared machine of 2 CPUs, reading 2 000 sockets
        at the same time delays the daemon).  Arrival times are the kernel's.
        """
        poller = select.epoll()
        try:
            for connection in connections:
                if connection.sock is not None:
                    poller.register(connection.sock.fileno(), select.EPOLLIN)
            deadline = time.monotonic() + ROUND_TIMEOUT
            while len(poller.poll(0, len(connections) + 1)) < count:
                if time.monotonic() > deadline:
                    for connection in connections:
                        connection.resume()
                    raise asyncio.TimeoutError
                await asyncio.sleep(0.002)
        finally:
            poller.close()

    async def requery(self) -> None:
        """Send every query again with the current index and check they are held."""
        for query in self.queries:
            if not query.waiting and query.sock is not None:
                query.send(_query(self.index))
        await self._check_held(self.index)

    async def stop_daemon(self, process: Any) -> dict[str, Any]:
        """SIGTERM with everything open: how long to exit, and what each client saw."""
        held = [q for q in self.queries if q.waiting]
        signal_at = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        exited = process.poll() is not None
        exit_s = time.perf_counter() - signal_at if exited else None
        if not exited:
            process.kill()
        await asyncio.sleep(0.5)  # read what is left
        answered = sum(1 for q in held if q.answers and q.answers[-1].stamp.read >= signal_at)
        still = sum(1 for q in held if q.waiting)
        return {
            "exited": exited,
            "returncode": process.returncode,
            "exit_s": exit_s,
            "watchers_ended_cleanly": sum(1 for w in self.watchers if w.parse().ended),
            "watchers_closed": sum(1 for w in self.watchers if w.lost_at is not None),
            "queries_held_at_stop": len(held),
            "queries_answered": answered,
            "queries_cut": len(held) - answered - still,
            "queries_still_waiting": still,
        }

    def close_all(self) -> None:
        for connection in [*self.watchers, *self.queries, self.publisher]:
            connection.close()

    # -- results

    def delivery(self) -> tuple[dict[str, Any], dict[int, list[Stamp]]]:
        """Check every watcher's stream; the arrival stamps of each change by index."""
        expected = [(r.index, r.module) for r in self.rounds if r.index is not None]
        order = [index for index, _ in expected]
        wanted = set(order)
        modules = dict(expected)
        arrivals: dict[int, list[Stamp]] = {index: [] for index in wanted}
        totals = {
            "watchers": len(self.watchers),
            "events_expected": len(expected) * len(self.watchers),
            "events_received": 0,
            "missing": 0,
            "duplicates": 0,
            "out_of_order": 0,
            "unexpected": 0,
            "wrong_content": 0,
            "no_hello": 0,
            "parse_errors": 0,
            "watchers_lost_before_stop": 0,
            "watchers_complete": 0,
        }
        for watcher in self.watchers:
            parsed = watcher.parse()
            if parsed.error is not None or parsed.status != 200:
                totals["parse_errors"] += 1
            events = [e for e in parsed.events if e.event != "hello"]
            hellos = [e for e in parsed.events if e.event == "hello"]
            if len(hellos) != 1 or parsed.events[:1] != hellos:
                totals["no_hello"] += 1
            ids: list[int] = []
            for event in events:
                try:
                    index = int(event.id or "")
                    data = json.loads(event.data)
                except ValueError:
                    totals["wrong_content"] += 1
                    continue
                if index not in wanted:
                    totals["unexpected"] += 1
                elif (
                    event.event != "published"
                    or data.get("moduleID") != modules[index]
                    or data.get("index") != index
                ):
                    totals["wrong_content"] += 1
                if index in wanted and index not in ids:
                    arrivals[index].append(event.stamp)
                ids.append(index)
            received = set(ids)
            totals["events_received"] += len(ids)
            totals["missing"] += len(wanted - received)
            totals["duplicates"] += len(ids) - len(received)
            totals["out_of_order"] += sum(1 for i in range(1, len(ids)) if ids[i] <= ids[i - 1])
            if ids == order:
                totals["watchers_complete"] += 1
        return totals, arrivals


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median_ms": median(values), "max_ms": max(values)}


def _round_results(
    rounds: list[Round], arrivals: dict[int, list[Stamp]], watchers: int
) -> list[dict[str, Any]]:
    out = []
    for r in rounds:
        stamps = arrivals.get(r.index, []) if r.index is not None else []
        kernel = sorted(r.sent.to(stamp) for stamp in stamps)
        read = sorted(r.sent.to_read(stamp) for stamp in stamps)
        all_watchers = bool(kernel) and len(kernel) == watchers
        queries = sorted(r.query_ms)
        all_queries = bool(queries) and len(queries) == r.queries_held
        out.append(
            {
                "phase": r.phase,
                "module": r.module,
                "index": r.index,
                "queries_held": r.queries_held,
                "publish_ms": r.publish_ms,
                "first_watcher_ms": kernel[0] if kernel else None,
                "last_watcher_ms": kernel[-1] if all_watchers else None,
                "last_watcher_read_ms": read[-1] if all_watchers else None,
                "watchers_notified": len(kernel),
                "first_query_ms": queries[0] if queries else None,
                "last_query_ms": queries[-1] if all_queries else None,
                "last_query_read_ms": max(r.query_read_ms) if all_queries else None,
                "queries_answered": len(queries),
                "queries_bad": r.query_bad,
                "daemon_cpu_ms": r.cpu_ms,
                "timed_out": r.timed_out,
            }
        )
    return out


FIGURES = (
    ("publish_ms", "its 200 answer"),
    ("first_watcher_ms", "first watcher notified"),
    ("last_watcher_ms", "last watcher notified"),
    ("first_query_ms", "first query answered"),
    ("last_query_ms", "last query answered"),
    ("last_watcher_read_ms", "(last watcher, as read)"),
    ("last_query_read_ms", "(last query, as read)"),
    ("daemon_cpu_ms", "(daemon CPU per publish)"),
)


def _phase_summary(rounds: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    chosen = [r for r in rounds if r["phase"] == phase]
    summary: dict[str, Any] = {"publishes": len(chosen)}
    for key, _ in FIGURES:
        values = [r[key] for r in chosen if r[key] is not None]
        summary[key] = _summary(values)
        concerned = [r for r in chosen if r["queries_held"] or "query" not in key]
        summary[key + "_incomplete"] = len(concerned) - len(values)
    return summary


async def _client(settings: Settings, server: Server) -> dict[str, Any]:
    run = Fanout(settings, server.pid, server.target("tcp").port, server.check_alive)
    results = run.results
    try:
        progress("warm-up: one watcher and one blocking query")
        await run.warm_up()
        memory: dict[str, Any] = {"before_kib": await run.rss()}
        progress(f"opening {settings.watchers} watchers")
        began = time.perf_counter()
        await run.open_watchers()
        memory["watchers_open_s"] = time.perf_counter() - began
        memory["watchers_kib"] = await run.rss()
        progress(f"{settings.solo_publishes} publishes to the watchers alone")
        for number in range(settings.solo_publishes):
            await run.publish("solo", number)
            await asyncio.sleep(0.05)
        memory["before_queries_kib"] = await run.rss()
        progress(f"opening {settings.queries} blocking queries")
        began = time.perf_counter()
        await run.open_queries()
        memory["queries_open_s"] = time.perf_counter() - began
        memory["watchers_and_queries_kib"] = await run.rss()
        memory["per_watcher_kib"] = (
            (memory["watchers_kib"] - memory["before_kib"]) / settings.watchers
            if settings.watchers
            else None
        )
        memory["per_query_kib"] = (
            (memory["watchers_and_queries_kib"] - memory["before_queries_kib"]) / settings.queries
            if settings.queries
            else None
        )
        memory["peak_kib"] = read_status_kib(server.pid, "VmHWM")
        memory["daemon_open_files_limit"] = open_files_limit(server.pid)
        results["memory"] = memory
        progress(f"{settings.publishes} publishes to the watchers and the held queries")
        for number in range(settings.publishes):
            await run.publish("both", number)
            await run.requery()
            await asyncio.sleep(0.05)
        results["lost_connections_before_stop"] = run.hub.lost
        progress("stopping the daemon with everything open")
        results["stop"] = await run.stop_daemon(server.process)
        totals, arrivals = run.delivery()
        results["delivery"] = totals
        rounds = _round_results(run.rounds, arrivals, settings.watchers)
        results["rounds"] = rounds
        results["solo"] = _phase_summary(rounds, "solo")
        results["both"] = _phase_summary(rounds, "both")
        results["kernel_timestamps"] = {"reads": run.hub.reads, "stamped": run.hub.kernel_stamps}
        if run.hub.kernel_stamps < run.hub.reads:
            results["notes"].append(
                f"only {run.hub.kernel_stamps} of {run.hub.reads} reads had a kernel timestamp: "
                "the others are timed from when this process read them"
            )
        results["client_errors"] = [e for q in [*run.queries, run.publisher] for e in q.errors][:10]
        return results
    except Unsettled as e:
        if not e.starved:
            raise
        progress(f"not measured: {e}")
        results["not_measured"] = str(e)
        return results
    finally:
        run.close_all()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def render(results: dict[str, Any], notes: bool = True) -> str:
    """The results as a small table (with their notes unless C{notes} is false)."""
    s = results["settings"]
    lines = [
        f"Watch fan-out: {s['watchers']} SSE watchers and {s['queries']} blocking queries "
        f"(GET /api/v1/modules?index=N&wait={QUERY_WAIT}) on one daemon, TCP 127.0.0.1, "
        f"{results['meta']['cpus']} CPUs shared with the client.",
    ]
    if results.get("not_measured"):
        lines.append(f"Not measured: {results['not_measured']}")
    memory = results.get("memory")
    if memory:
        per_watcher = memory["per_watcher_kib"]
        per_query = memory["per_query_kib"]
        lines.append(
            f"Memory (VmRSS KiB): before {memory['before_kib']}, with the watchers "
            f"{memory['watchers_kib']}, then {memory['before_queries_kib']} -> "
            f"{memory['watchers_and_queries_kib']} with the queries held "
            f"(peak {memory['peak_kib']})."
        )
        lines.append(
            "  per idle watcher "
            + ("-" if per_watcher is None else f"{per_watcher:.1f} KiB")
            + ", per held query "
            + ("-" if per_query is None else f"{per_query:.1f} KiB")
            + f"; opened in {memory['watchers_open_s']:.2f} s and {memory['queries_open_s']:.2f} s"
        )
    phases = [
        (phase, title, results[phase])
        for phase, title in (("solo", "watchers alone"), ("both", "watchers + queries"))
        if results.get(phase) and results[phase]["publishes"]
    ]
    if phases:
        reading = s.get("read_during_fanout", False)
        lines.append(
            "Publish to ... (ms; arrival = the kernel's receive stamp on the client socket; "
            + (
                "'as read' = when this client read it):"
                if reading
                else "the client reads nothing until everybody's data is there):"
            )
        )
        lines.append(
            f"  {'':<26}"
            + "".join(" " + f"{title} ({p['publishes']})".rjust(21) for _, title, p in phases)
        )
        lines.append(f"  {'':<26}" + f" {'median':>10} {'max':>10}" * len(phases))
        for key, label in FIGURES:
            cells = [summary[key] for _, _, summary in phases]
            if all(cell is None for cell in cells) or ("as read" in label and not reading):
                continue
            row = f"  {label:<26}"
            for (_, _, summary), cell in zip(phases, cells, strict=True):
                mark = "*" if summary[key + "_incomplete"] else ""
                worst = _ms(cell and cell["max_ms"]) + mark
                row += f" {_ms(cell and cell['median_ms']):>10} {worst:>10}"
            lines.append(row)
        verdicts = []
        for _, title, summary in phases:
            cell = summary["last_watcher_ms"]
            if cell is not None:
                ok = cell["max_ms"] <= LAST_WATCHER_TARGET_MS
                verdicts.append(f"{title} {'ok' if ok else 'OVER'}")
        lines.append(
            f"  target: last watcher within {LAST_WATCHER_TARGET_MS:g} ms (max): "
            + ", ".join(verdicts)
            + (
                "; * = some publishes did not reach everybody"
                if any(
                    summary[k + "_incomplete"] for _, _, summary in phases for k, _ in FIGURES[:5]
                )
                else ""
            )
        )
    d = results.get("delivery")
    if d:
        lines.append(
            f"Delivery: {d['events_received']} of {d['events_expected']} events; missing "
            f"{d['missing']}, duplicate {d['duplicates']}, out of order {d['out_of_order']}, "
            f"unexpected {d['unexpected']}, wrong content {d['wrong_content']}, "
            f"no hello {d['no_hello']}; {d['watchers_complete']} of {d['watchers']} "
            "watchers complete."
        )
    stop = results.get("stop")
    if stop:
        lines.append(
            f"Stop (SIGTERM, everything open): exited {stop['exited']} in "
            + ("-" if stop["exit_s"] is None else f"{stop['exit_s']:.2f} s")
            + f"; {stop['watchers_ended_cleanly']} of {results['settings']['watchers']} "
            f"streams ended cleanly; of {stop['queries_held_at_stop']} held queries "
            f"{stop['queries_answered']} answered, {stop['queries_cut']} cut without an answer."
        )
    if notes:
        for note in results.get("notes", []):
            lines.append(f"note: {note}")
    return "\n".join(lines)


def run(settings: Settings) -> dict[str, Any]:
    """Start the daemon, run the client against it, stop everything; the results."""
    needed = settings.watchers + settings.queries + FD_MARGIN
    soft, hard = raise_open_files(needed)
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()),
            "open_files_limit": [soft, hard],
        },
        "settings": {
            "watchers": settings.watchers,
            "queries": settings.queries,
            "publishes": settings.publishes,
            "solo_publishes": settings.solo_publishes,
            "query_wait": QUERY_WAIT,
            "batch": BATCH,
            "read_during_fanout": settings.read_during,
            "last_watcher_target_ms": LAST_WATCHER_TARGET_MS,
        },
    }
    began = time.monotonic()
    with Workspace() as workspace:
        location, version, digest = workspace.installed_package()
        results["meta"].update(
            hsu_registry=location, hsu_registry_version=version, hsu_registry_digest=digest
        )
        process, log_path = spawn_daemon(
            workspace,
            "fanout-daemon",
            [f"--max-modules={settings.publishes + settings.solo_publishes + 1000}"],
            unix=False,
        )
        try:
            server = await_server("the daemon", process, log_path, 1, timeout=30)
            if server.tcp is None:
                raise RuntimeError("the daemon does not listen over TCP")
            limit = open_files_limit(process.pid)
            if limit is not None and limit < needed:
                raise RuntimeError(f"the daemon may open only {limit} files, {needed} are needed")
            remaining = settings.timeout - (time.monotonic() - began)
            gc.collect()
            gc.disable()
            try:
                client = asyncio.run(asyncio.wait_for(_client(settings, server), max(remaining, 1)))
            except asyncio.TimeoutError:
                raise RuntimeError(f"the run did not finish within {settings.timeout:g}s") from None
            finally:
                gc.enable()
            results.update(client)
            results["meta"]["daemon_log_tail"] = log_tail(log_path, 600)
        finally:
            stop_process(process, timeout=5)
    results["meta"]["elapsed_s"] = time.monotonic() - began
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    return results


def _parse(argv: list[str] | None) -> tuple[Settings, str]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--watchers", type=int, default=None, help="SSE watchers (default 1000)")
    parser.add_argument(
        "--queries", type=int, default=None, help="held blocking queries (default 1000)"
    )
    parser.add_argument(
        "--publishes",
        type=int,
        default=None,
        help="changes published to the watchers and the held queries (default 20)",
    )
    parser.add_argument(
        "--solo-publishes",
        type=int,
        default=None,
        help="changes published to the watchers alone, before the queries (default 5)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="50 watchers, 50 queries, 3 + 2 publishes"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"bound on the whole run, s (default {TIMEOUT_S[False]:g})",
    )
    parser.add_argument(
        "--read-during-fanout",
        action="store_true",
        help="read watchers and queries as the daemon sends (default: only once everybody's "
        "data is waiting, so this client takes no CPU from the daemon meanwhile)",
    )
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = parser.parse_args(argv)
    quick = args.quick

    def pick(value: int | None, normal: int, small: int) -> int:
        chosen = value if value is not None else (small if quick else normal)
        if chosen < 0:
            parser.error("counts must not be negative")
        return chosen

    settings = Settings(
        watchers=pick(args.watchers, 1000, 50),
        queries=pick(args.queries, 1000, 50),
        publishes=pick(args.publishes, 20, 3),
        solo_publishes=pick(args.solo_publishes, 5, 2),
        settle=0.3 if quick else 1.0,
        timeout=args.timeout if args.timeout is not None else TIMEOUT_S[quick],
        read_during=args.read_during_fanout,
    )
    if settings.watchers < 1:
        parser.error("--watchers must be at least 1")
    return settings, args.json


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    section_main("fanout", argv, _parse, run, render)


if __name__ == "__main__":
    main()

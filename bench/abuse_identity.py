"""
What knowing the caller costs (part of L{bench.abuse}): the kernel lookup of a
connection's identity, in process, and its share of a request, end to end.

Lookups (L{measure_lookups}), in this process, over real connected and
accepted sockets, as the daemon makes them (L{connection_identity} given a
transport whose C{getHandle()} is the accepted socket):

 - unix: C{SO_PEERCRED}, one C{getsockopt};
 - tcp: the uid behind a loopback TCP peer through C{sock_diag} netlink (one
   netlink socket, one request naming the 4-tuple, one answer), with the
   C{getpeername}/C{getsockname} around it;
 - unix and tcp on a new connection: the same, each lookup on a connection
   accepted just before it (the daemon's case when every request comes on a
   new connection: the kernel's and Python's caches are colder), the lookup
   alone timed;
 - /proc/net/tcp: the fallback where netlink is not allowed
   (L{hsu_registry.security.sockdiag._proc_net_uid}), a scan of the table
   that stops at the peer's row;
 - /proc/net/tcp, a miss: the same for a peer that has no row (port 1), so
   every row of C{tcp} and C{tcp6} is read: the table's whole cost.

Each is timed in batches (microseconds per lookup, the median batch) with N
established loopback connections here (N = 64, 1 000, then 5 000; 64 and
200 with C{--quick}), the lookups cycling over a sample of 64 of them, spread
over the table, so that the fallback's scan is timed at the rows where
connections really are (the kernel lists sockets in hash order).  The rows of
C{/proc/net/tcp} and C{tcp6} (every socket of the network namespace, other
processes' and TIME_WAIT ones included) are counted at each step.  Every
sampled lookup is checked to name this process's uid.

End to end (L{measure_end_to_end}): against a second daemon, started like
the first but with its C{connection_identity} timed (L{timed_daemon}: the
lookup's own cost inside a busy daemon, per transport), this process's uid
(root when the flood runs: an admin, never rate limited) sends one request
at a time, for a window, on one persistent connection and on a new
connection per request, over TCP and the unix socket, in rounds (every cell
once per round, 0.3 s each; each cell's windows pooled):

 - discover (C{GET /api/v1/discover/echo}): under the default policy a plain
   discover does not ask who the caller is: the unchanged figures (the
   timed daemon's count of lookups per request says whether it does);
 - services (C{GET /api/v1/services/service1}, one provider): an expensive
   read, which identifies the caller to charge its read rate;
 - publish (the same module republished): a write, identified likewise.

The daemon caches a connection's identity on its channel, so only the first
identified request of a connection pays the lookup: on a persistent
connection nothing, on a new connection per request every request.  The
daemon's CPU time (C{schedstat}, all threads) over each window, per request,
and the same difference for discover (which connects as often but is never
identified) give the lookup's share: (op new - op persistent) - (discover new
- discover persistent), for the daemon's CPU and for the client's median,
per round (the median of the rounds is the figure: on a shared machine the
CPU a request costs drifts by more than the lookup between windows seconds
apart).
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import os
import signal
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.abuse_client import Window, closed_loop, pooled
from bench.daemon import Server, cpu_times
from bench.probe import request_bytes
from bench.workload import DISCOVER_MODULE, PUBLISH_PATH, discover_path, publish_body
from hsu_registry.security.identity import connection_identity
from hsu_registry.security.sockdiag import _proc_net_uid

__all__ = [
    "E2E_MODES",
    "E2E_OPERATIONS",
    "LOOKUP_METHODS",
    "SERVICE_PATH",
    "LookupCounter",
    "daemon_lookups",
    "measure_end_to_end",
    "measure_lookups",
    "miss_fit",
    "proc_net_rows",
    "timed_daemon",
]

#: How the lookups are made, in the order of the table.
LOOKUP_METHODS = ("unix", "unix_new", "tcp", "tcp_new", "proc_net", "proc_net_miss")
#: The methods timed on a connection accepted just before each lookup.
FRESH = {"unix_new": "unix", "tcp_new": "tcp"}
#: A peer no socket has (port 1 is never an ephemeral port): the fallback reads every row.
_NOBODY = ("127.0.0.1", 1)
_NO_LINGER = struct.pack("ii", 1, 0)
#: The most connections the timed lookups cycle over.
LOOKUP_SAMPLE = 64
#: The service whose providers the end-to-end expensive read lists (the discovered module's).
SERVICE_PATH = "/api/v1/services/service1"
E2E_OPERATIONS = ("discover", "services", "publish")
E2E_MODES = ("persistent", "new")
#: Operations that identify the caller (a plain discover does not).
IDENTIFIED = ("services", "publish")
#: The line the timed daemon prints at its exit, before its JSON.
LOOKUPS_MARK = "HSU-BENCH-LOOKUPS "
#: The timed daemon (C{python -c}, given the C{hsu-registry} argv after the
#: console script's path): the installed daemon, as its console script starts
#: it, with C{connection_identity} wrapped in a timer (two C{perf_counter}
#: calls and a dict update, about 1 us) before the daemon's modules import it
#: (and wherever it was imported already); its totals so far (lookups and
#: seconds, per transport) are printed on SIGUSR1 and at exit.  Nothing else
#: is changed.
_TIMED_DAEMON = f"""
import atexit, json, signal, socket, sys, time
import hsu_registry.security.identity as identity
real = identity.connection_identity
spent = {{}}
def timed(transport):
    began = time.perf_counter()
    try:
        return real(transport)
    finally:
        took = time.perf_counter() - began
        family = getattr(getattr(transport, "getHandle", lambda: None)(), "family", None)
        key = "unix" if family == socket.AF_UNIX else "tcp"
        total, count = spent.get(key, (0.0, 0))
        spent[key] = (total + took, count + 1)
for module in [identity, *sys.modules.values()]:
    if getattr(module, "connection_identity", None) is real:
        module.connection_identity = timed
def report(*_):
    figures = {{k: {{"seconds": t, "lookups": n}} for k, (t, n) in spent.items()}}
    print({LOOKUPS_MARK!r} + json.dumps(figures), flush=True)
signal.signal(signal.SIGUSR1, report)
atexit.register(report)
from hsu_registry.cli import main
sys.argv[:] = ["hsu-registry", *sys.argv[2:]]
sys.exit(main())
"""


def timed_daemon() -> list[str]:
    """The wrapper (an argv prefix for L{bench.daemon.start_daemon}) that times lookups."""
    return [sys.executable, "-c", _TIMED_DAEMON]


def _marks(text: str) -> list[dict[str, Any]]:
    """The totals the timed daemon printed in C{text}, in order."""
    found = []
    for line in text.splitlines():
        at = line.find(LOOKUPS_MARK)
        if at >= 0:
            found.append(json.loads(line[at + len(LOOKUPS_MARK) :]))
    return found


def daemon_lookups(log: str) -> dict[str, Any] | None:
    """
    What the timed daemon printed last (at its exit): per transport, its
    lookups and microseconds per lookup.
    """
    marks = _marks(log)
    if not marks:
        return None
    return {
        kind: {"lookups": cell["lookups"], "us": cell["seconds"] / cell["lookups"] * 1e6}
        for kind, cell in marks[-1].items()
        if cell["lookups"]
    }


class LookupCounter:
    """The timed daemon's totals now: it is sent SIGUSR1 and its log read on from where it was."""

    def __init__(self, daemon: Server) -> None:
        self.daemon = daemon
        self.offset = 0

    def read(self, timeout: float = 5.0) -> dict[str, tuple[float, int]]:
        """Per transport, the seconds its lookups took and how many, so far."""
        os.kill(self.daemon.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            with open(self.daemon.log_path, "rb") as log:
                log.seek(self.offset)
                text = log.read().decode("utf-8", "replace")
            end = text.rfind("\n")
            marks = _marks(text[: end + 1]) if end >= 0 else []
            if marks:
                self.offset += len(text[: end + 1].encode("utf-8"))
                return {k: (cell["seconds"], cell["lookups"]) for k, cell in marks[-1].items()}
            self.daemon.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("the timed daemon did not print its lookups on SIGUSR1")
            time.sleep(0.002)


class _Handle:
    """A transport whose C{getHandle()} is a real socket, as the daemon's are."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def getHandle(self) -> socket.socket:
        """The socket."""
        return self.sock


def proc_net_rows() -> int:
    """The sockets listed in C{/proc/net/tcp} and C{tcp6} now (their header lines left out)."""
    rows = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, "rb") as table:
                rows += max(0, sum(1 for _ in table) - 1)
        except OSError:
            pass
    return rows


def _summary(per_call: list[float], batches: int, per_batch: int) -> dict[str, Any]:
    """Microseconds per call of each batch: the median batch, the fastest and the slowest."""
    return {
        "median_us": statistics.median(per_call),
        "min_us": min(per_call),
        "max_us": max(per_call),
        "batches": batches,
        "per_batch": per_batch,
    }


def _time_batches(
    calls: list[Callable[[], object]], batches: int, per_batch: int
) -> dict[str, Any]:
    """C{batches} batches of C{per_batch} calls, the calls taken in turn (see L{_summary})."""
    per_call = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(batches):
            began = time.perf_counter()
            for number in range(per_batch):
                calls[number % len(calls)]()
            per_call.append((time.perf_counter() - began) / per_batch * 1e6)
    finally:
        if enabled:
            gc.enable()
    return _summary(per_call, batches, per_batch)


def _time_fresh(listener: socket.socket, batches: int, per_batch: int) -> dict[str, Any]:
    """
    One lookup on a connection accepted just before it, as the daemon makes
    it when every request comes on a new connection (caches are colder than
    when the same sockets are looked up again and again): C{batches} batches
    of C{per_batch} connections made, accepted, looked up and closed, the
    lookup alone timed (see L{_summary}).
    """
    uid = os.geteuid()
    address = listener.getsockname()
    per_call = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(batches):
            spent = 0.0
            for _ in range(per_batch):
                with socket.socket(listener.family, socket.SOCK_STREAM) as client:
                    if listener.family != socket.AF_UNIX:
                        # Closed with a reset: no TIME_WAIT rows pile up in the table.
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
                    client.connect(address)
                    accepted, _ = listener.accept()
                    with accepted:
                        handle = _Handle(accepted)
                        began = time.perf_counter()
                        found = connection_identity(handle)
                        spent += time.perf_counter() - began
                if found.uid != uid:
                    raise RuntimeError(f"a new connection's lookup did not name uid {uid}: {found}")
            per_call.append(spent / per_batch * 1e6)
    finally:
        if enabled:
            gc.enable()
    return _summary(per_call, batches, per_batch)


class _Pairs:
    """Connected and accepted sockets over one listener; all closed by L{close}."""

    def __init__(self, family: int, address: Any) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.sockets: list[socket.socket] = [self.listener]
        self.accepted: list[socket.socket] = []
        self.listener.bind(address)
        self.listener.listen(4096)

    def connect(self, count: int) -> None:
        """C{count} more connections, each accepted before the next one is made."""
        for _ in range(count):
            client = socket.socket(self.listener.family, socket.SOCK_STREAM)
            self.sockets.append(client)
            client.connect(self.listener.getsockname())
            accepted, _ = self.listener.accept()
            self.sockets.append(accepted)
            self.accepted.append(accepted)

    def close(self) -> None:
        """Close every socket."""
        for sock in self.sockets:
            sock.close()


def _sample(accepted: list[socket.socket], size: int) -> list[socket.socket]:
    """At most C{size} of C{accepted}, evenly spaced from the first to the last."""
    if len(accepted) <= size:
        return list(accepted)
    step = (len(accepted) - 1) / (size - 1)
    return [accepted[round(number * step)] for number in range(size)]


def _lookups(
    unix: socket.socket, tcp: list[socket.socket]
) -> dict[str, list[Callable[[], object]]]:
    """The calls each method makes, one per connection of C{tcp} (the unix one alone)."""
    uid = os.geteuid()
    calls: dict[str, list[Callable[[], object]]] = {
        method: [] for method in LOOKUP_METHODS if method not in FRESH
    }
    handle = _Handle(unix)
    if connection_identity(handle).uid != uid:
        raise RuntimeError(f"SO_PEERCRED did not name uid {uid}: {connection_identity(handle)}")
    calls["unix"].append(functools.partial(connection_identity, handle))
    for sock in tcp:
        tcp_handle = _Handle(sock)
        peer, local = sock.getpeername()[:2], sock.getsockname()[:2]
        found = connection_identity(tcp_handle)
        if found.uid != uid:
            raise RuntimeError(f"sock_diag did not name uid {uid} for {peer}: {found}")
        if _proc_net_uid(peer, local) != uid:
            raise RuntimeError(f"/proc/net/tcp did not name uid {uid} for {peer}")
        calls["tcp"].append(functools.partial(connection_identity, tcp_handle))
        calls["proc_net"].append(functools.partial(_proc_net_uid, peer, local))
    if _proc_net_uid(_NOBODY, _NOBODY) is not None:
        raise RuntimeError(f"/proc/net/tcp has a row for {_NOBODY}")
    calls["proc_net_miss"].append(functools.partial(_proc_net_uid, _NOBODY, _NOBODY))
    return calls


def measure_lookups(
    directory: str,
    totals: tuple[int, ...],
    batches: int,
    per_batch: int,
    proc_per_batch: int,
    fresh_per_batch: int,
) -> dict[str, Any]:
    """
    The lookups with each number of C{totals} established connections here
    (ascending; see the module's docstring).  Per method, a cell per total
    (C{"64"}, C{"1000"}...) and the growth from the fewest to the most.
    """
    unix = _Pairs(socket.AF_UNIX, os.path.join(directory, "lookup.sock"))
    tcp = _Pairs(socket.AF_INET, ("127.0.0.1", 0))
    result: dict[str, Any] = {
        "connections": list(totals),
        "sample": 0,
        "rows": {},
        "rows_after": {},
        "methods": {method: {} for method in LOOKUP_METHODS},
    }
    try:
        unix.connect(1)
        for total in totals:
            tcp.connect(total - len(tcp.accepted))
            sample = _sample(tcp.accepted, LOOKUP_SAMPLE)
            calls = _lookups(unix.accepted[0], sample)
            key = str(total)
            result["sample"] = len(sample)
            result["rows"][key] = proc_net_rows()
            for method in LOOKUP_METHODS:
                if method in FRESH:
                    listener = (unix if FRESH[method] == "unix" else tcp).listener
                    cell = _time_fresh(listener, batches, fresh_per_batch)
                    cell["connections"] = fresh_per_batch
                else:
                    size = per_batch if method in ("unix", "tcp") else proc_per_batch
                    cell = _time_batches(calls[method], batches, size)
                    cell["connections"] = len(calls[method])
                result["methods"][method][key] = cell
            result["rows_after"][key] = proc_net_rows()
    finally:
        unix.close()
        tcp.close()
    for method in LOOKUP_METHODS:
        cells = result["methods"][method]
        cells["growth"] = cells[str(totals[-1])]["median_us"] / cells[str(totals[0])]["median_us"]
    result["proc_net_miss_fit"] = miss_fit(result)
    return result


def miss_fit(result: dict[str, Any]) -> dict[str, float] | None:
    """
    A /proc/net/tcp miss's time as a fixed part plus a part per row listed
    (least squares over the steps; rows: the mean of the counts before and
    after each step): the kernel walks its whole socket hash table, then
    prints every socket.  L{None} with fewer than two steps, or when the
    table did not grow from step to step or the fit makes no sense (other
    processes' sockets came and went meanwhile).
    """
    points = []
    for key, cell in result["methods"]["proc_net_miss"].items():
        if key in result["rows"]:
            listed = (result["rows"][key] + result["rows_after"].get(key, result["rows"][key])) / 2
            points.append((float(listed), float(cell["median_us"])))
    rows = [x for x, _ in points]
    if len(points) < 2 or any(later <= earlier for earlier, later in itertools.pairwise(rows)):
        return None
    mean_x = statistics.fmean(rows)
    mean_y = statistics.fmean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x in rows
    )
    fixed = mean_y - slope * mean_x
    if slope <= 0 or fixed < 0:
        return None
    return {"fixed_us": fixed, "per_row_us": slope}


def _payload(operation: str) -> bytes:
    if operation == "discover":
        return request_bytes("GET", discover_path(DISCOVER_MODULE))
    if operation == "services":
        return request_bytes("GET", SERVICE_PATH)
    return request_bytes("POST", PUBLISH_PATH, publish_body(DISCOVER_MODULE, process_id=0))


def _cell(window: Window, spent_ms: float) -> dict[str, Any]:
    """A window's figures with the daemon's CPU over it (C{spent_ms}), per second and request."""
    cell = window.figures()
    cell["daemon_cpu_ms_per_s"] = spent_ms / max(window.seconds, 1e-9)
    cell["daemon_cpu_us_per_request"] = (
        spent_ms * 1000.0 / cell["requests"] if cell["requests"] else None
    )
    return cell


def measure_end_to_end(
    daemon: Server,
    duration: float,
    warmup: float,
    rounds: int,
    limit: int,
    progress: Callable[[str], None],
    counter: LookupCounter | None = None,
) -> dict[str, Any]:
    """
    Every operation, mode and transport for one short window per round, the
    rounds one after the other (so that drift falls on every cell alike),
    each cell's windows pooled; the identity's share is computed from each
    round's cells (the four it needs measured within a second or two of each
    other): their median, every round's, and the share from pooled cells.
    With a C{counter} (a timed daemon), each cell also counts the lookups the
    daemon made over its transport, per request, and their time.
    """
    windows: dict[tuple[str, str, str], list[Window]] = {}
    cpu_ms: dict[tuple[str, str, str], float] = {}
    lookups: dict[tuple[str, str, str], tuple[float, int]] = {}
    by_round: list[dict[str, Any]] = []
    for number in range(rounds):
        progress(f"abuse: end to end, round {number + 1} of {rounds}")
        this_round: dict[str, Any] = {}
        for transport in ("tcp", "unix"):
            target = daemon.target(transport)
            for operation in E2E_OPERATIONS:
                payload = _payload(operation)
                for mode in E2E_MODES:
                    daemon.check_alive()
                    new = mode == "new"
                    # The daemon's CPU over the measured part only: the
                    # warm-up goes first on its own.
                    closed_loop(target, payload, 0.0, warmup, new_connection=new)
                    first = counter.read() if counter is not None else {}
                    before = cpu_times(daemon.pid)[1]
                    window = closed_loop(
                        target, payload, duration, 0.0, new_connection=new, limit=limit
                    )
                    spent = cpu_times(daemon.pid)[1] - before
                    key = (transport, operation, mode)
                    if counter is not None:
                        last = counter.read()
                        was = first.get(transport, (0.0, 0))
                        now = last.get(transport, (0.0, 0))
                        so_far = lookups.get(key, (0.0, 0))
                        lookups[key] = (
                            so_far[0] + now[0] - was[0],
                            so_far[1] + now[1] - was[1],
                        )
                    cpu_ms[key] = cpu_ms.get(key, 0.0) + spent
                    windows.setdefault(key, []).append(window)
                    cells = this_round.setdefault(transport, {}).setdefault(operation, {})
                    cells[mode] = _cell(window, spent)
        by_round.append(this_round)
    result: dict[str, Any] = {"rounds": rounds}
    for (transport, operation, mode), parts in windows.items():
        cell = _cell(pooled(parts), cpu_ms[(transport, operation, mode)])
        if counter is not None:
            seconds, count = lookups[(transport, operation, mode)]
            cell["lookups"] = count
            cell["lookups_per_request"] = count / cell["requests"] if cell["requests"] else None
            cell["lookup_us"] = seconds / count * 1e6 if count else None
        result.setdefault(transport, {}).setdefault(operation, {})[mode] = cell
    result["identity_cost"] = {}
    for transport in ("tcp", "unix"):
        cost = _cost(result[transport])
        each = [_cost(cells[transport]) for cells in by_round]
        for operation in IDENTIFIED:
            for figure in ("daemon_us", "p50_us"):
                values = [one[operation][figure] for one in each]
                known = [value for value in values if value is not None]
                cost[operation][figure + "_pooled"] = cost[operation][figure]
                cost[operation][figure + "_rounds"] = values
                cost[operation][figure] = statistics.median(known) if known else None
        result["identity_cost"][transport] = cost
    return result


def _cost(cells: dict[str, Any]) -> dict[str, Any]:
    """
    The identity lookup's share of an identified request on a new
    connection: its extra over the persistent connection, less discover's.
    """
    out: dict[str, Any] = {}

    def extra(operation: str, key: str) -> float | None:
        new, persistent = cells[operation]["new"].get(key), cells[operation]["persistent"].get(key)
        return None if new is None or persistent is None else new - persistent

    base_cpu = extra("discover", "daemon_cpu_us_per_request")
    base_p50 = extra("discover", "p50_ms")
    for operation in IDENTIFIED:
        cpu, p50 = extra(operation, "daemon_cpu_us_per_request"), extra(operation, "p50_ms")
        out[operation] = {
            "new_connection_daemon_us": cpu,
            "new_connection_p50_ms": p50,
            "daemon_us": cpu - base_cpu if cpu is not None and base_cpu is not None else None,
            "p50_us": (p50 - base_p50) * 1000.0
            if p50 is not None and base_p50 is not None
            else None,
        }
    out["discover"] = {"new_connection_daemon_us": base_cpu, "new_connection_p50_ms": base_p50}
    return out

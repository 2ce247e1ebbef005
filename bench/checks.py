"""
Active health checks: what checking every API costs the daemon, what it does
to the reactor's answers, and whether a hung service piles checks up.

``python -m bench.checks [--quick] [--modules N] [--window S] [--timeout S]
[--json PATH]``

One installed C{hsu-registry}, started as L{bench.daemon} starts it (TCP on
127.0.0.1 and a unix socket in the workspace) with C{--check-concurrency=32}
(the default), holds N modules of one API each (N = 1 000; 200 with
C{--quick}), published over the unix socket (C{processID} 0: not bound) on
one persistent connection.  Each phase publishes the same modules again, on
the same daemon, one after the other:

 1. none: the APIs carry no check.  After a short settle, the daemon's CPU
    time (utime+stime of C{/proc/PID/stat}) over the window (10 s; 3 s with
    C{--quick}), then the discover latency: 2 000 (1 000 with C{--quick})
    sequential C{GET /api/v1/discover/ID}, the IDs in turn, on one
    persistent unix-socket connection, one request at a time.
 2. tcp: every API has C{{"tcp": true, "interval": "1s", "timeout": "1s"}}
    against a listener that accepts and closes.  Once every API is passing
    (C{GET /api/v1/services/SID} polled every 0.1 s; C{ready}: seconds from
    the last publish), the same window: checks performed (connections the
    target accepted), the daemon's CPU per second and per check (over the
    no-check figure), the change index's moves (status flips: nothing else
    changes meanwhile); then the discover latency again, the checks going on.
 3. http: the same with C{{"http": "/healthz", ...}} against a minimal
    HTTP/1.1 server that answers C{200 OK} (C{Content-Length: 0}) and
    closes; a check is an answered request.
 4. hung: http checks against a listener that accepts and never answers:
    every check times out after 1 s, so at most C{--check-concurrency} are
    in flight and about that many run per second.  From the last publish
    until every API is critical (a whole round, N / 32 s), the daemon's open
    descriptors are sampled every 20 ms (their median, 99th percentile and
    most over the no-check phase's most), and the listener counts the most
    connections it held open at once; the CPU is measured over the window
    from 1 s after the last publish, the statuses polled only after it.
    Verdict: C{ok} when neither ever exceeds C{--check-concurrency};
    C{ok, +k briefly} when the daemon's median is within it and only some
    samples are over (a timed-out check's socket is closed a reactor turn
    after the check ends, so the next check may open before it is gone);
    C{OVER} otherwise: checks piling up.

The targets are served by a child of this process, forked before the daemon
starts (one C{selectors} loop over three listeners on 127.0.0.1, its counters
in shared memory), so that this process's timing loops and the targets do not
share a GIL.  At about 1 000 checks a second over loopback, each check a new
connection, local ports are reused from TIME_WAIT (C{net.ipv4.tcp_tw_reuse},
recorded in the JSON; 2, loopback only, is the kernel's default).

The daemon is stopped (SIGTERM, its exit status recorded) and the target
killed and reaped on every way out, and the whole run is bounded
(C{--timeout}).  Progress goes to stderr, the table to stdout, everything to
JSON (by default C{bench/results/checks.json}).  C{--quick} checks the
harness in about 20 s; its figures mean little.  C{python -m bench} runs this
module as its C{checks} section.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import os
import platform
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, NoReturn

from bench.daemon import BENCH_DIR, Server, Workspace, cpu_times, log_tail, start_daemon
from bench.probe import Connection, request_bytes
from bench.section import fmt, progress, section_main
from bench.stats import percentile, percentiles_ms

__all__ = ["main", "render", "run"]

DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "checks.json")
#: The bound on the whole run (--timeout), s, with --quick and without.
TIMEOUT_S = {True: 120.0, False: 240.0}
#: Per-identity check bounds lifted: the bench publishes as one identity.
UNBOUNDED = [
    "--max-checks-per-identity=1000000",
    "--check-rate-per-identity=1000000",
    "--check-share-per-identity=1",
]

#: The daemon's --check-concurrency (its default, given explicitly).
CONCURRENCY = 32
INTERVAL_S = 1.0
CHECK_TIMEOUT_S = 1.0
SERVICE = "chk"
PHASES = ("none", "tcp", "http")
#: The check object of each phase's APIs ("none": no check).
CHECKS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "tcp": {"tcp": True, "interval": "1s", "timeout": "1s"},
    "http": {"http": "/healthz", "interval": "1s", "timeout": "1s"},
    "hung": {"http": "/healthz", "interval": "1s", "timeout": "1s"},
}
#: The target counter that counts a check of each phase.
CHECK_COUNTER = {"none": "tcp_accepted", "tcp": "tcp_accepted", "http": "http_answered"}
HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
#: Seconds between samples of the daemon's descriptors, and between status polls.
SAMPLE_EVERY = 0.02
POLL_EVERY = 0.1
#: Longest wait for every API to pass after the publishes.
READY_TIMEOUT = 30.0
#: The hung phase's window starts this long after the publishes (every first check due).
HUNG_SETTLE = 1.0
#: What Twisted logs when a (noisy) client factory starts and stops.
FACTORY_LINES = ("Starting factory", "Stopping factory")
_PR_SET_PDEATHSIG = 1


class BenchTimeout(RuntimeError):
    """The whole run took longer than its bound."""


# -- the targets: a forked child ------------------------------------------------

#: The target's counters, int64 each, in shared memory in this order.
COUNTERS = (
    "tcp_accepted",
    "http_accepted",
    "http_answered",
    "hung_accepted",
    "hung_open",
    "hung_open_max",
    "errors",
)
_LAYOUT = struct.Struct(f"={len(COUNTERS)}q")
_AT = {name: number for number, name in enumerate(COUNTERS)}


def _serve(parent: int, listeners: dict[str, socket.socket], shared: mmap.mmap) -> NoReturn:
    """
    The forked child: accept on the three listeners for ever (tcp: close at
    once; http: read the request head, answer 200 and close; hung: read and
    discard until the client closes), counting in C{shared}.  Never returns.
    """
    try:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        counts = [0] * len(COUNTERS)
        selector = selectors.DefaultSelector()
        for kind, sock in listeners.items():
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, (kind, None, sock))

        def close(conn: socket.socket, kind: str) -> None:
            selector.unregister(conn)
            conn.close()
            if kind == "hung":
                counts[_AT["hung_open"]] -= 1

        while True:
            events = selector.select()
            # Connections before listeners: a hung connection closed in this
            # batch is counted out before a new one is counted in.
            events.sort(key=lambda event: event[0].data[1] is None)
            for key, _ in events:
                kind, buffer, sock = key.data
                if buffer is None:
                    while True:
                        try:
                            conn, _ = sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            counts[_AT["errors"]] += 1
                            break
                        counts[_AT[kind + "_accepted"]] += 1
                        if kind == "tcp":
                            conn.close()
                            continue
                        conn.setblocking(False)
                        selector.register(conn, selectors.EVENT_READ, (kind, bytearray(), conn))
                        if kind == "hung":
                            counts[_AT["hung_open"]] += 1
                            counts[_AT["hung_open_max"]] = max(
                                counts[_AT["hung_open_max"]], counts[_AT["hung_open"]]
                            )
                    continue
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(sock, kind)
                elif kind == "http":
                    buffer += data
                    if b"\r\n\r\n" in buffer:
                        try:
                            sock.send(HTTP_OK)
                            counts[_AT["http_answered"]] += 1
                        except OSError:
                            counts[_AT["errors"]] += 1
                        close(sock, kind)
            _LAYOUT.pack_into(shared, 0, *counts)
    except BaseException as e:
        try:
            os.write(2, f"bench.checks target: {type(e).__name__}: {e}\n".encode())
        except BaseException:
            pass
    finally:
        os._exit(1)


class Targets:
    """
    The three listeners (C{tcp}, C{http}, C{hung}) on 127.0.0.1 ephemeral
    ports, served by a forked child.  L{close} (also on leaving a C{with}
    block, however) kills and reaps it.
    """

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.pid = 0
        self._reaped = False
        self._shared = mmap.mmap(-1, _LAYOUT.size)
        listeners: dict[str, socket.socket] = {}
        try:
            for kind in ("tcp", "http", "hung"):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listeners[kind] = sock
                sock.bind(("127.0.0.1", 0))
                sock.listen(4096)
                self.ports[kind] = sock.getsockname()[1]
            parent = os.getpid()
            pid = os.fork()
            if pid == 0:
                _serve(parent, listeners, self._shared)
            self.pid = pid
        except BaseException:
            self._shared.close()
            raise
        finally:
            for sock in listeners.values():
                sock.close()  # the child's copies serve

    def __enter__(self) -> Targets:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """The counters now."""
        return dict(zip(COUNTERS, _LAYOUT.unpack_from(self._shared, 0), strict=True))

    def check_alive(self) -> None:
        """Raise when the child has exited."""
        if self._reaped:
            raise RuntimeError("the target process has exited")
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            self._reaped = True
            raise RuntimeError(f"the target process exited ({status:#x})")

    def cpu_ms(self) -> float:
        """The child's CPU time (utime+stime), ms."""
        return cpu_times(self.pid)[0]

    def close(self) -> None:
        """Kill and reap the child (the run's alarm waits meanwhile)."""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            if self.pid and not self._reaped:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
                self._reaped = True
            if not self._shared.closed:
                self._shared.close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# -- talking to the daemon ---------------------------------------------------


def publish_body(module_id: str, port: int, check: dict[str, Any] | None) -> bytes:
    """One API of service L{SERVICE} at C{port} (address omitted: 127.0.0.1), with C{check}."""
    api: dict[str, Any] = {"serviceIDs": [SERVICE], "serverPort": port, "protocol": "http"}
    if check is not None:
        api["check"] = check
    body = {"moduleID": module_id, "processID": 0, "apis": [api]}
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def publish_all(conn: Connection, ids: list[str], port: int, check: dict[str, Any] | None) -> None:
    """Publish every module, one after the other."""
    for module_id in ids:
        payload = request_bytes("POST", "/api/v1/publish", publish_body(module_id, port, check))
        status, _, body = conn.exchange(payload)
        if status != 200:
            raise RuntimeError(f"publish {module_id} answered {status}: {body[:200]!r}")


def statuses(conn: Connection) -> tuple[dict[str, int], str | None]:
    """How many APIs of L{SERVICE} have each status (C{none}: no check); one check output."""
    answer, _ = conn.get_json(f"/api/v1/services/{SERVICE}")
    counts: dict[str, int] = {}
    output = None
    for provider in answer["providers"]:
        for api in provider["apis"]:
            status = api.get("status", "none")
            counts[status] = counts.get(status, 0) + 1
            output = api.get("checkOutput", output)
    return counts, output


def change_index(conn: Connection, module_id: str) -> int:
    """The change index (C{X-HSU-Index} of a discover answer, which changes nothing)."""
    _, headers = conn.get_json(f"/api/v1/discover/{module_id}")
    return int(headers["x-hsu-index"])


def discover_latency(conn: Connection, ids: list[str], count: int, budget: float) -> dict[str, Any]:
    """
    C{count} sequential discovers, the IDs in turn, or as many as C{budget}
    seconds allow: how many, and p50/p90/p99/max in ms.
    """
    payloads = [request_bytes("GET", f"/api/v1/discover/{module_id}") for module_id in ids]
    samples = []
    clock = time.perf_counter
    end = clock() + budget
    for number in range(count):
        began = clock()
        status, _, body = conn.exchange(payloads[number % len(payloads)])
        done = clock()
        samples.append(done - began)
        if status != 200:
            raise RuntimeError(f"discover answered {status}: {body[:200]!r}")
        if done > end:
            break
    return {"requests": len(samples), "wanted": count, **percentiles_ms(samples)}


# -- measuring -------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """The daemon's and the target's state at one moment."""

    at: float
    cpu_ms: float
    sched_ms: float
    target_cpu_ms: float
    log_bytes: int
    counters: dict[str, int]


@dataclass
class Run:
    """What every phase shares."""

    daemon: Server
    targets: Targets
    conn: Connection
    ids: list[str]
    window: float
    discovers: int
    discover_budget: float

    def check_alive(self) -> None:
        self.daemon.check_alive()
        self.targets.check_alive()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.daemon.pid}/task"))

    def snapshot(self) -> Snapshot:
        cpu_ms, sched_ms = cpu_times(self.daemon.pid)
        return Snapshot(
            time.monotonic(),
            cpu_ms,
            sched_ms,
            self.targets.cpu_ms(),
            os.path.getsize(self.daemon.log_path),
            self.targets.counters(),
        )

    def sample_until(self, deadline: float, samples: list[int]) -> None:
        """Count the daemon's descriptors into C{samples} until C{deadline}."""
        while True:
            self.check_alive()
            samples.append(self.fds())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(SAMPLE_EVERY, remaining))

    def wait_status(self, status: str, timeout: float, every: float = POLL_EVERY) -> float:
        """Poll until every API has C{status}; the seconds it took."""
        began = time.monotonic()
        while True:
            self.check_alive()
            counts, output = statuses(self.conn)
            if counts.get(status, 0) == len(self.ids):
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise RuntimeError(
                    f"not every API is {status} after {timeout:g}s: {counts} "
                    f"(a check said {output!r})"
                )
            time.sleep(every)


def _rates(before: Snapshot, after: Snapshot, counter: str, idle: dict[str, Any] | None) -> dict:
    seconds = after.at - before.at
    checks = after.counters[counter] - before.counters[counter]
    cpu = (after.cpu_ms - before.cpu_ms) / seconds
    figures: dict[str, Any] = {
        "window_s": seconds,
        "checks": checks,
        "checks_per_s": checks / seconds,
        "cpu_ms_per_s": cpu,
        "cpu_sched_ms_per_s": (after.sched_ms - before.sched_ms) / seconds,
        "target_cpu_ms_per_s": (after.target_cpu_ms - before.target_cpu_ms) / seconds,
        "log_bytes_per_s": (after.log_bytes - before.log_bytes) / seconds,
        "target_errors": after.counters["errors"] - before.counters["errors"],
    }
    if idle is not None:
        over = cpu - idle["cpu_ms_per_s"]
        figures["cpu_over_idle_ms_per_s"] = over
        figures["cpu_us_per_check"] = over * 1000.0 / figures["checks_per_s"] if checks else None
        figures["log_bytes_per_check"] = (
            figures["log_bytes_per_s"] / figures["checks_per_s"] if checks else None
        )
    return figures


def measure_phase(run: Run, phase: str, idle: dict[str, Any] | None, settle: float) -> dict:
    """Phases none, tcp and http (see the module's docstring)."""
    n = len(run.ids)
    port = run.targets.ports["http" if phase == "http" else "tcp"]
    progress(f"checks: {phase}: publishing {n} modules")
    publish_all(run.conn, run.ids, port, CHECKS[phase])
    result: dict[str, Any] = {"check": CHECKS[phase]}
    if phase == "none":
        time.sleep(settle)
        result["ready_s"] = None
    else:
        result["ready_s"] = run.wait_status("passing", READY_TIMEOUT)
    index = change_index(run.conn, run.ids[0])
    progress(f"checks: {phase}: {run.window:g} s window")
    before = run.snapshot()
    samples: list[int] = []
    run.sample_until(before.at + run.window, samples)
    after = run.snapshot()
    result["fds_max"] = max(samples)
    result["threads"] = run.threads()
    result["status_changes"] = change_index(run.conn, run.ids[0]) - index
    result.update(_rates(before, after, CHECK_COUNTER[phase], idle))
    if phase == "http":
        result["http_accepted"] = after.counters["http_accepted"] - before.counters["http_accepted"]
    result["expected_checks_per_s"] = 0.0 if phase == "none" else n / INTERVAL_S
    result["discover"] = discover_latency(run.conn, run.ids, run.discovers, run.discover_budget)
    if idle is not None:
        base = idle["discover"]
        result["discover_ratio"] = {
            key: result["discover"][key] / base[key] for key in ("p50_ms", "p90_ms", "p99_ms")
        }
    counts, output = statuses(run.conn)
    result["statuses_after"] = counts
    result["passing_after"] = counts.get("passing", 0)
    result["last_output"] = output
    return result


def measure_hung(run: Run, idle: dict[str, Any]) -> dict[str, Any]:
    """The hung target (see the module's docstring)."""
    n = len(run.ids)
    progress(f"checks: hung: publishing {n} modules, waiting for every API to be critical")
    began = time.monotonic()
    publish_all(run.conn, run.ids, run.targets.ports["hung"], CHECKS["hung"])
    published = time.monotonic()
    result: dict[str, Any] = {"check": CHECKS["hung"], "publish_s": published - began}
    samples: list[int] = []
    run.sample_until(published + HUNG_SETTLE, samples)
    before = run.snapshot()
    run.sample_until(before.at + run.window, samples)
    after = run.snapshot()
    result["threads"] = run.threads()
    result.update(_rates(before, after, "hung_accepted", idle))
    result["expected_round_s"] = n / CONCURRENCY * CHECK_TIMEOUT_S
    deadline = published + result["expected_round_s"] * 1.5 + 10.0
    while True:
        counts, output = statuses(run.conn)
        if counts.get("critical", 0) == n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"hung: not every API is critical in time: {counts}")
        run.sample_until(time.monotonic() + 0.25, samples)
    result["all_critical_s"] = time.monotonic() - published
    result["critical"] = counts.get("critical", 0)
    result["last_output"] = output
    counters = run.targets.counters()
    result["target_open_max"] = counters["hung_open_max"]
    result["target_accepted"] = counters["hung_accepted"]
    base = idle["fds_max"]
    extra = sorted(count - base for count in samples)
    result.update(
        fds_idle=base,
        fds_max=base + extra[-1],
        fd_samples=len(extra),
        extra_fds_max=extra[-1],
        extra_fds_p50=percentile(extra, 50),
        extra_fds_p99=percentile(extra, 99),
        samples_over_bound=sum(1 for count in extra if count > CONCURRENCY),
        bound=CONCURRENCY,
    )
    # Strictly within the bound, or only for a moment over it (a check's
    # connection closing as the next one opens), or piling up.
    result["bound_ok"] = extra[-1] <= CONCURRENCY and counters["hung_open_max"] <= CONCURRENCY
    result["steady_ok"] = result["extra_fds_p50"] <= CONCURRENCY
    return result


# -- the run -----------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    modules: int
    window: float
    discovers: int
    discover_budget: float
    settle: float
    timeout: float
    quick: bool


def _sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _log_summary(path: str) -> dict[str, int]:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    return {
        "bytes": len(text.encode("utf-8")),
        "lines": text.count("\n"),
        "factory_lines": sum(text.count(what) for what in FACTORY_LINES),
    }


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise BenchTimeout("the run did not finish within its --timeout")


def run(settings: Settings) -> dict[str, Any]:
    """Start the target and the daemon, measure, stop everything; the results."""
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_before": list(os.getloadavg()),
            "tcp_tw_reuse": _sysctl("net.ipv4.tcp_tw_reuse"),
            "quick": settings.quick,
        },
        "settings": {
            "modules": settings.modules,
            "window_s": settings.window,
            "discover_requests": settings.discovers,
            "discover_budget_s": settings.discover_budget,
            "interval_s": INTERVAL_S,
            "timeout_s": CHECK_TIMEOUT_S,
            "check_concurrency": CONCURRENCY,
        },
        "notes": [],
    }
    began = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    try:
        with Workspace() as workspace, Targets() as targets:
            location, version, digest = workspace.installed_package()
            results["meta"].update(
                hsu_registry=location, hsu_registry_version=version, hsu_registry_digest=digest
            )
            # One identity publishes every check here: lift the per-identity
            # bounds (issue 12) to measure the checker itself, as before them.
            daemon = start_daemon(
                workspace, "checks", [f"--check-concurrency={CONCURRENCY}", *UNBOUNDED]
            )
            try:
                _measure(daemon, targets, settings, results)
            finally:
                results["exit_status"] = daemon.stop()
                results["meta"]["daemon_log_tail"] = log_tail(daemon.log_path, 600)
            counters = targets.counters()
            results["log"] = _log_summary(daemon.log_path)
            results["log"]["connections"] = sum(
                counters[kind + "_accepted"] for kind in ("tcp", "http", "hung")
            )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if results["exit_status"] != 0:
        results["notes"].append(f"the daemon exited with {results['exit_status']} on SIGTERM")
    log = results["log"]
    if log["factory_lines"]:
        results["notes"].append(
            f"the daemon's log: {log['lines']} lines, {log['factory_lines']} of them "
            "'Starting factory'/'Stopping factory' (the probes' client factories, at info "
            f"level), for {log['connections']} connections the targets accepted"
        )
    results["meta"]["elapsed_s"] = time.monotonic() - began
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    return results


def _measure(daemon: Server, targets: Targets, settings: Settings, results: dict) -> None:
    conn = Connection(daemon.target("unix").path)
    try:
        ids = [f"chk-{number}" for number in range(settings.modules)]
        checks = Run(
            daemon,
            targets,
            conn,
            ids,
            settings.window,
            settings.discovers,
            settings.discover_budget,
        )
        idle = measure_phase(checks, "none", None, settings.settle)
        results["none"] = idle
        for phase in PHASES[1:]:
            results[phase] = measure_phase(checks, phase, idle, settings.settle)
        results["hung"] = measure_hung(checks, idle)
    finally:
        conn.close()
    notes: list[str] = results["notes"]
    for phase in PHASES[1:]:
        cell = results[phase]
        if cell["status_changes"] or cell["passing_after"] != settings.modules:
            notes.append(
                f"{phase}: {cell['status_changes']} status changes in the window, "
                f"{cell['passing_after']} of {settings.modules} passing after the discovers "
                f"(a check said {cell['last_output']!r})"
            )
        if cell["target_errors"]:
            notes.append(f"{phase}: the target counted {cell['target_errors']} errors")
    for phase in PHASES:
        discover = results[phase]["discover"]
        if discover["requests"] < discover["wanted"]:
            notes.append(
                f"{phase}: {discover['requests']} of {discover['wanted']} discovers in the "
                f"{settings.discover_budget:g} s allowed"
            )
    hung = results["hung"]
    if not hung["bound_ok"]:
        notes.append(
            f"hung: the daemon held up to {hung['extra_fds_max']} descriptors over idle "
            f"(median {hung['extra_fds_p50']:g}, over {CONCURRENCY} in "
            f"{hung['samples_over_bound']} of {hung['fd_samples']} samples) and the target "
            f"up to {hung['target_open_max']} connections open at once, "
            f"--check-concurrency={CONCURRENCY}"
        )


# -- the table -----------------------------------------------------------------------


def _verdict(hung: dict[str, Any]) -> str:
    if hung["bound_ok"]:
        return "ok"
    if hung["steady_ok"]:
        return f"ok, +{hung['extra_fds_max'] - hung['bound']} briefly"
    return "OVER"


def render(results: dict[str, Any], notes: bool = True) -> str:
    """The results as a small table (with their notes unless C{notes} is false)."""
    s = results["settings"]
    n = s["modules"]
    conc = s["check_concurrency"]
    lines = [
        f"Active health checks: {n} modules of one API, checked every {s['interval_s']:g} s "
        f"(timeout {s['timeout_s']:g} s) by one daemon (--check-concurrency={conc}), "
        f"{results['meta']['cpus']} CPUs shared with the targets",
        "(a child of the client on 127.0.0.1).  Each phase publishes the same modules again; "
        "ready = last publish to all passing; window = "
        f"{s['window_s']:g} s after that.",
        "checks/s = connections the target accepted (http: answered); x N/s = / "
        f"{n} per s; CPU = daemon utime+stime, all threads (10 ms ticks);",
        "+idle = over none; us/chk = +idle / checks; +fds = most descriptors over none's (20 ms "
        "samples); thr = daemon threads; log = its log written;",
        "changes = change-index moves in the window (status flips); discover = "
        f"{s['discover_requests']} sequential GET /api/v1/discover/ID (at most "
        f"{s['discover_budget_s']:g} s) on one unix-socket",
        "connection after the window, checks going on, ms; x none = / the figure without checks.",
        f"  {'checks':<6} {'ready s':>7} {'checks/s':>8} {'x N/s':>5} {'CPU ms/s':>8} "
        f"{'+idle':>7} {'us/chk':>6} {'+fds':>4} {'thr':>3} {'log KiB/s':>9} {'passing':>9} "
        f"{'changes':>7} {'disc p50':>8} {'p99':>7} {'x none':>6} {'p99':>6}",
    ]
    base_fds = results["none"]["fds_max"] if "none" in results else 0
    for phase in PHASES:
        cell = results.get(phase)
        if cell is None:
            continue
        ratio = cell.get("discover_ratio") or {"p50_ms": 1.0, "p99_ms": 1.0}
        checked = phase != "none"
        passing = f"{cell['passing_after']}/{n}" if checked else "-"
        lines.append(
            f"  {phase:<6} {fmt(cell['ready_s'], '7.2f')} {cell['checks_per_s']:8.0f} "
            f"{fmt(cell['checks_per_s'] / n if checked else None, '5.2f')} "
            f"{cell['cpu_ms_per_s']:8.1f} {fmt(cell.get('cpu_over_idle_ms_per_s'), '7.1f')} "
            f"{fmt(cell.get('cpu_us_per_check'), '6.0f')} {cell['fds_max'] - base_fds:>4} "
            f"{cell['threads']:>3} {cell['log_bytes_per_s'] / 1024:9.1f} {passing:>9} "
            f"{cell['status_changes']:>7} {cell['discover']['p50_ms']:8.3f} "
            f"{cell['discover']['p99_ms']:7.3f} {ratio['p50_ms']:6.2f} {ratio['p99_ms']:6.2f}"
        )
    hung = results.get("hung")
    if hung is not None:
        lines += [
            "Hung target: the same modules' http checks against a listener that accepts and "
            f"never answers (each check times out after {s['timeout_s']:g} s).",
            "Daemon descriptors sampled every 20 ms from the last publish until every API was "
            "critical: +fds = over none's (median, 99th percentile, most);",
            "target open = the most connections the listener held at once; CPU over the window "
            f"from 1 s after the last publish; round = {n} / {conc} x {s['timeout_s']:g} s.",
            f"  {'fds none':>8} {'+fds p50':>8} {'p99':>4} {'max':>4} {'bound':>5} "
            f"{'target open':>11} {'checks/s':>8} {'CPU ms/s':>8} {'+idle':>7} {'us/chk':>6} "
            f"{'critical':>9} {'all critical s':>14} {'round s':>7}  verdict",
            f"  {hung['fds_idle']:>8} {hung['extra_fds_p50']:>8} {hung['extra_fds_p99']:>4} "
            f"{hung['extra_fds_max']:>4} {hung['bound']:>5} {hung['target_open_max']:>11} "
            f"{hung['checks_per_s']:8.1f} {hung['cpu_ms_per_s']:8.1f} "
            f"{hung['cpu_over_idle_ms_per_s']:7.1f} {fmt(hung['cpu_us_per_check'], '6.0f')} "
            f"{str(hung['critical']) + '/' + str(n):>9} {hung['all_critical_s']:14.1f} "
            f"{hung['expected_round_s']:7.1f}  {_verdict(hung)}",
        ]
    if results.get("exit_status") not in (0, None):
        lines.append(f"  the daemon exited with {results['exit_status']} on SIGTERM")
    if notes:
        for note in results.get("notes", []):
            lines.append(f"note: {note}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> tuple[Settings, str]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--modules", type=int, default=None, help="modules, one API each (default 1000)"
    )
    parser.add_argument(
        "--window", type=float, default=None, help="seconds of each measured window (default 10)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="200 modules, 3 s windows, 1 000 discovers per phase",
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
        modules=args.modules if args.modules is not None else (200 if quick else 1000),
        window=args.window if args.window is not None else (3.0 if quick else 10.0),
        discovers=1000 if quick else 2000,
        discover_budget=5.0 if quick else 20.0,
        settle=0.3 if quick else 1.0,
        timeout=args.timeout if args.timeout is not None else TIMEOUT_S[quick],
        quick=quick,
    )
    if settings.modules < 1 or settings.window <= 0:
        parser.error("--modules must be at least 1 and --window positive")
    return settings, args.json


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    section_main("checks", argv, _parse, run, render)


if __name__ == "__main__":
    main()

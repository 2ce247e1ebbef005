"""
Abuse (issue 12, "Trust"): what one flooding identity does to everybody
else's discover latency, and what knowing the caller costs per request.

``python -m bench.abuse [--quick] [--rounds N] [--window S] [--connections N]
[--timeout S] [--json PATH]``

One installed C{hsu-registry}, started as L{bench.daemon} starts it (memory
store, TCP on 127.0.0.1 and a unix socket in the workspace), with the rates
given explicitly at their defaults (C{--write-rate=50}: bursts of 200;
C{--read-rate=20}: bursts of 50), holds the discovered module (C{echo}, two
APIs of C{service1} and C{service2}) and B background modules of one API
(B = 500; 100 with C{--quick}), all published by this process's uid.

Flood.  The flooder is another uid: root and the daemon's own uid are admins,
never rate limited, so it runs as uid 65534 (C{setpriv --reuid=65534
--regid=65534 --clear-groups}), which needs root; as anyone else the flood is
recorded as not measured, with the reason.  It is L{bench.loadgen} (closed
loop, one process) on C connections (16; 8 with C{--quick}) over loopback
TCP, sending at full speed whatever the answers (a 429's Retry-After is
ignored: the next request goes as soon as the 429 is read).  TCP because
the unix socket's mode (0600, the default) keeps other uids out of it: TCP is
what a hostile local user has.  The flooder's identity is the kernel's word
(C{sock_diag}), so it cannot pose as someone else.  Its floods:

 - writes: C{POST /api/v1/publish} of a new module per request (a write:
   rate limited);
 - reads: C{GET /api/v1/modules}, the catalog (an expensive read: rate
   limited);
 - discover: C{GET /api/v1/discover/echo}, a plain discover, which is never
   rate limited by design; measured to show what per-identity rates do not
   cover (per-peer connection limits are issue 13), and reported apart.

The quiet client is this process (root when the flood runs: its uid plays no
part, the default policy never asks who sends a plain discover): C{GET
/api/v1/discover/echo}, one request at a time on one persistent connection
(L{bench.abuse_client}), for a window (3 s; 0.5 s with C{--quick}) after a
short warm-up, over TCP and then the unix socket.  A round is four phases:
quiet (no flood), then each flood; the flooder starts, the section waits
until the kernel lists its C connections (as uid 65534, established, to the
daemon's port, in C{/proc/net/tcp}) and then for a settling second (the
bursts spent), measures both windows, and checks the flooder was still
running when they ended.  Before the rounds, a refusal probe as uid 65534
(L{bench.abuse_client}) publishes and then reads the catalog until the first
429 of each, and keeps that answer (its Retry-After, type and body).  R
rounds (3; 1 with C{--quick}) interleave the phases, so drift on a shared
machine falls on all of them alike; each phase's figures pool the samples of
every round.  x quiet = a figure / the
quiet phase's, in the same run.  After a writes flood the flooder's modules
are unpublished (this process is an admin), so every phase sees the same
registry.  Per phase: the daemon's CPU time over the windows (C{schedstat},
all threads) and the flooder's, and the flooder's answers by status (over
its whole run, the warm-up included) and per second.

Target: a flood of writes or of expensive reads leaves the quiet client's
discover p99 within 2x of the quiet figure, over both transports.

Then what knowing the caller costs, L{bench.abuse_identity}: the kernel's
lookup per connection in this process (SO_PEERCRED, sock_diag, and the
/proc/net/tcp fallback, with 64, 1 000 and then 5 000 connections present;
64 and 200 with C{--quick}), done before the first daemon starts; then,
against a second daemon whose lookups are timed (a wrapper, nothing else
changed), discover, an expensive read and a publish, one request at a time on
a persistent connection and on a new connection per request, over both
transports (10 rounds of 0.3 s per cell; 1 with C{--quick}): lookups per
request, each lookup's time inside the daemon, and the identified request's
extra cost on a new connection.

The daemons are stopped (SIGTERM, their exit statuses recorded) and the
flooder killed on every way out, and the whole run is bounded
(C{--timeout}).
Progress goes to stderr, the table to stdout, everything to JSON (by default
C{bench/results/abuse.json}).  C{--quick} checks the harness in about 15 s;
its figures mean little.  C{python -m bench} runs this module as its
C{abuse} section.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from bench.abuse_client import ClientConnection, Window, closed_loop, pooled
from bench.abuse_identity import (
    E2E_MODES,
    E2E_OPERATIONS,
    LOOKUP_METHODS,
    SERVICE_PATH,
    LookupCounter,
    daemon_lookups,
    measure_end_to_end,
    measure_lookups,
    timed_daemon,
)
from bench.daemon import (
    BENCH_DIR,
    Server,
    Workspace,
    cpu_times,
    log_tail,
    raise_open_files,
    start_daemon,
    stop_process,
)
from bench.probe import request_bytes
from bench.section import fmt, progress, section_main
from bench.workload import (
    DISCOVER_MODULE,
    PUBLISH_PATH,
    discover_path,
    publish_body,
    publish_template,
)

__all__ = ["main", "render", "run"]

DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "abuse.json")
#: The bound on the whole run (--timeout), s, with --quick and without.
TIMEOUT_S = {True: 120.0, False: 480.0}
#: The flooder's uid and gid (nobody): neither root nor the daemon's.
FLOOD_UID = 65534
#: The daemon's rates, given explicitly (their defaults), and the bursts they imply.
WRITE_RATE = 50
READ_RATE = 20
WRITE_BURST = WRITE_RATE * 4
READ_BURST = int(READ_RATE * 2.5)
#: How both daemons are started (besides their endpoints).
DAEMON_ARGS = ("--store=memory", f"--write-rate={WRITE_RATE}", f"--read-rate={READ_RATE}")
#: The target: a flood of a rate-limited kind leaves the others' discover p99 within this.
TARGET_P99_RATIO = 2.0
PHASES = ("quiet", "writes", "reads", "discover")
#: The floods per-identity rates are meant to hold (the verdict's).
LIMITED = ("writes", "reads")
TRANSPORTS = ("tcp", "unix")
#: What each flood sends: method, path, body (C{{ID}}: a new module per request).
FLOODS: dict[str, tuple[str, str, str | None]] = {
    "writes": ("POST", PUBLISH_PATH, publish_template()),
    "reads": ("GET", "/api/v1/modules", None),
    "discover": ("GET", discover_path(DISCOVER_MODULE), None),
}
#: Longest wait for the flooder's connections to be established.
CONNECT_TIMEOUT = 20.0
#: The flooder keeps sending this long after the windows are due to end.
FLOOD_SLACK = 1.0
#: The flooder's grace for answers still due when its run ends (its --timeout), s.
FLOOD_GRACE = 10.0
#: Most answers one quiet or end-to-end window takes.
WINDOW_LIMIT = 500_000
BACKGROUND_SERVICE = "bg"
#: Descriptors kept for everything but the lookups' connections.
OPEN_FILES_MARGIN = 256


class BenchTimeout(RuntimeError):
    """The whole run took longer than its bound."""


@dataclass(frozen=True)
class Settings:
    """How long and how hard (see the module's docstring)."""

    rounds: int
    window: float
    warmup: float
    settle: float
    connections: int
    background: int
    lookup_connections: tuple[int, ...]
    lookup_batches: int
    lookup_per_batch: int
    proc_per_batch: int
    fresh_per_batch: int
    e2e_window: float
    e2e_warmup: float
    e2e_rounds: int
    timeout: float
    quick: bool


# -- the flooder -------------------------------------------------------------------


def flood_unavailable() -> str | None:
    """Why the flood cannot be measured here, or L{None} when it can."""
    if os.geteuid() != 0:
        return (
            f"the flooder must be a second uid, neither root nor the daemon's (an admin is "
            f"never rate limited), and running it as uid {FLOOD_UID} needs root; this run's "
            f"uid is {os.geteuid()}"
        )
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed: the flooder cannot change its uid"
    return None


def _setpriv() -> list[str]:
    """The argv prefix that runs a command as L{FLOOD_UID}, dying with this process if it can."""
    setpriv = shutil.which("setpriv") or "setpriv"
    argv = [setpriv, f"--reuid={FLOOD_UID}", f"--regid={FLOOD_UID}", "--clear-groups"]
    try:
        usage = subprocess.run([setpriv, "--help"], capture_output=True, text=True, timeout=10)
        if "--pdeathsig" in usage.stdout:
            # A change of uid clears the parent-death signal set before exec.
            argv.append("--pdeathsig=KILL")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return argv


def _run_as_flooder(
    workspace: Workspace, prefix: list[str], module: str, args: list[str], timeout: float
) -> dict[str, Any]:
    """C{python -m module args} as the flooding uid, to its end; the JSON it printed last."""
    log_path = workspace.new_path(f"{module}-") + ".log"
    argv = [*prefix, *workspace.python_module(module, *args)]
    process = workspace.spawn(argv, log_path, bench_importable=True)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(process, timeout=5.0)
        raise RuntimeError(
            f"{module} did not end within {timeout:g}s: {log_tail(log_path)}"
        ) from None
    with open(log_path, "rb") as log:
        lines = log.read().decode("utf-8", "replace").splitlines()
    found = [line for line in lines if line.startswith("{")]
    if code != 0 or not found:
        raise RuntimeError(f"{module} exited with {code}: {log_tail(log_path)}")
    figures: dict[str, Any] = json.loads(found[-1])
    return figures


def flooder_connections(port: int) -> int:
    """Established TCP connections of uid L{FLOOD_UID} to C{port}, as the kernel lists them."""
    wanted = f":{port:04X}"
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name, encoding="ascii") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if fields[3] == "01" and fields[2].endswith(wanted):
                        if int(fields[7]) == FLOOD_UID:
                            count += 1
        except OSError:
            continue
    return count


class Flooder:
    """One flood: L{bench.loadgen} as uid L{FLOOD_UID}, started and awaited."""

    def __init__(
        self,
        workspace: Workspace,
        prefix: list[str],
        daemon: Server,
        kind: str,
        connections: int,
        duration: float,
        id_prefix: str,
    ) -> None:
        method, path, body = FLOODS[kind]
        target = daemon.target("tcp")
        self.kind = kind
        self.port = target.port
        self.connections = connections
        self.duration = duration
        args = [
            *target.loadgen_args(),
            f"--connections={connections}",
            "--warmup=0",
            f"--duration={duration:g}",
            f"--timeout={FLOOD_GRACE:g}",
            f"--method={method}",
            f"--path={path}",
            f"--id-prefix={id_prefix}",
        ]
        if body is not None:
            args.append(f"--body={body}")
        self.argv = [*prefix, *workspace.python_module("bench.loadgen", *args)]
        self.log_path = workspace.new_path(f"flood-{kind}-") + ".log"
        self.started = time.monotonic()
        self.process = workspace.spawn(self.argv, self.log_path, bench_importable=True)

    def check_alive(self) -> None:
        """Raise when it has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the {self.kind} flooder exited with {self.process.returncode}: "
                f"{log_tail(self.log_path)}"
            )

    def wait_connected(self, daemon: Server) -> float:
        """Wait until the kernel lists all its connections; the seconds since it started."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while flooder_connections(self.port) < self.connections:
            self.check_alive()
            daemon.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {self.kind} flooder did not connect within {CONNECT_TIMEOUT:g}s "
                    f"({flooder_connections(self.port)} of {self.connections}): "
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.01)
        return time.monotonic() - self.started

    def cpu_ms(self) -> float:
        """Its CPU time so far (C{schedstat}), ms."""
        return cpu_times(self.process.pid)[1]

    def finish(self) -> dict[str, Any]:
        """Wait for its end (bounded) and return its figures (L{bench.loadgen}'s JSON)."""
        remaining = self.started + self.duration - time.monotonic()
        try:
            code = self.process.wait(timeout=max(0.0, remaining) + FLOOD_GRACE + 10.0)
        except subprocess.TimeoutExpired:
            stop_process(self.process, timeout=5.0)
            raise RuntimeError(
                f"the {self.kind} flooder did not end: {log_tail(self.log_path)}"
            ) from None
        with open(self.log_path, "rb") as log:
            lines = log.read().decode("utf-8", "replace").splitlines()
        found = [line for line in lines if line.startswith("{")]
        if code != 0 or not found:
            raise RuntimeError(
                f"the {self.kind} flooder exited with {code}: {log_tail(self.log_path)}"
            )
        figures: dict[str, Any] = json.loads(found[-1])
        return figures


# -- the daemon's state ------------------------------------------------------------


def background_body(number: int) -> bytes:
    """Background module number C{number}: one API of L{BACKGROUND_SERVICE}, process 0."""
    api = {
        "serviceIDs": [BACKGROUND_SERVICE],
        "serverPort": 40000 + number % 20000,
        "protocol": "grpc",
    }
    body = {"moduleID": f"bg-{number}", "processID": 0, "apis": [api]}
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def prepare(daemon: Server, background: int) -> None:
    """Publish the discovered module and the background modules, over the unix socket."""
    conn = ClientConnection(daemon.target("unix"))
    try:
        payloads = [
            request_bytes("POST", PUBLISH_PATH, publish_body(DISCOVER_MODULE, process_id=0))
        ]
        payloads += [
            request_bytes("POST", PUBLISH_PATH, background_body(n)) for n in range(background)
        ]
        for payload in payloads:
            status, _, body = conn.exchange(payload)
            if status != 200:
                raise RuntimeError(f"a publish answered {status}: {body[:200]!r}")
        for path in (discover_path(DISCOVER_MODULE), SERVICE_PATH):
            answer, _ = conn.get_json(path)
            if not answer:
                raise RuntimeError(f"GET {path} answered {answer!r}")
    finally:
        conn.close()


def registered(daemon: Server) -> int:
    """How many modules the daemon holds (its health answer)."""
    conn = ClientConnection(daemon.target("unix"))
    try:
        health, _ = conn.get_json("/api/v1/health")
    finally:
        conn.close()
    return int(health["registeredModules"])


def unpublish_flooded(daemon: Server) -> int:
    """Unpublish every module the flooder owns (as an admin); how many."""
    owner = f"uid:{FLOOD_UID}"
    conn = ClientConnection(daemon.target("unix"))
    try:
        catalog, _ = conn.get_json("/api/v1/modules")
        ids = [entry["moduleID"] for entry in catalog["modules"] if entry.get("owner") == owner]
        for module_id in ids:
            status, _, body = conn.exchange(
                request_bytes("DELETE", f"/api/v1/unpublish/{module_id}")
            )
            if status != 200:
                raise RuntimeError(f"unpublish {module_id} answered {status}: {body[:200]!r}")
    finally:
        conn.close()
    return len(ids)


# -- the flood ---------------------------------------------------------------------


@dataclass
class _Phase:
    """What one phase gathers over the rounds."""

    windows: dict[str, list[Window]]
    rounds: list[dict[str, Any]]
    daemon_cpu_ms: float = 0.0
    flooder_cpu_ms: float = 0.0
    seconds: float = 0.0


def _quiet_windows(daemon: Server, settings: Settings) -> dict[str, Window]:
    """The quiet client's discover windows, over each transport in turn."""
    payload = request_bytes("GET", discover_path(DISCOVER_MODULE))
    return {
        transport: closed_loop(
            daemon.target(transport),
            payload,
            settings.window,
            settings.warmup,
            limit=WINDOW_LIMIT,
        )
        for transport in TRANSPORTS
    }


def measure_flood(
    workspace: Workspace, daemon: Server, settings: Settings, notes: list[str]
) -> dict[str, Any]:
    """Every round of every phase (see the module's docstring)."""
    # The flooder imports bench.loadgen through the workspace's link to
    # this package: let another uid through the directory (not list it).
    os.chmod(workspace.root, 0o711)
    os.chmod(workspace.pythonpath, 0o755)
    prefix = _setpriv()
    progress(f"abuse: as uid {FLOOD_UID}, writes and then catalog reads until the first 429")
    refusal = _run_as_flooder(
        workspace, prefix, "bench.abuse_client", [str(daemon.target("tcp").port)], 60.0
    )
    probed = unpublish_flooded(daemon)
    gathered = {phase: _Phase({t: [] for t in TRANSPORTS}, []) for phase in PHASES}
    flooder_figures: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES[1:]}
    removed = 0
    # The flooder's run: settling, both windows with their warm-ups, slack.
    span = settings.settle + len(TRANSPORTS) * (settings.window + settings.warmup) + FLOOD_SLACK
    for number in range(settings.rounds):
        for phase in PHASES:
            progress(f"abuse: round {number + 1} of {settings.rounds}: {phase}")
            daemon.check_alive()
            cell: dict[str, Any] = {"registered": registered(daemon)}
            flooder = None
            flooder_before = 0.0
            if phase != "quiet":
                flooder = Flooder(
                    workspace,
                    prefix,
                    daemon,
                    phase,
                    settings.connections,
                    span,
                    f"flood{number}-",
                )
            try:
                if flooder is not None:
                    cell["flooder_connect_s"] = flooder.wait_connected(daemon)
                    time.sleep(settings.settle)
                    flooder_before = flooder.cpu_ms()
                began = time.monotonic()
                before = cpu_times(daemon.pid)[1]
                windows = _quiet_windows(daemon, settings)
                after = cpu_times(daemon.pid)[1]
                seconds = time.monotonic() - began
                if flooder is not None:
                    flooder_cpu = flooder.cpu_ms() - flooder_before
                    gathered[phase].flooder_cpu_ms += flooder_cpu
                    cell["flooder_cpu_ms_per_s"] = flooder_cpu / seconds
                    cell["flood_covered_windows"] = flooder.process.poll() is None
                    if not cell["flood_covered_windows"]:
                        notes.append(
                            f"round {number + 1}, {phase}: the flooder ended before the "
                            "quiet windows did"
                        )
                    figures = flooder.finish()
                    flooder_figures[phase].append(figures)
                    cell["flooder"] = {
                        key: figures[key]
                        for key in ("statuses", "window_s", "rps", "error_count", "errors")
                    }
            finally:
                if flooder is not None and flooder.process.poll() is None:
                    stop_process(flooder.process, timeout=5.0)
            state = gathered[phase]
            state.daemon_cpu_ms += after - before
            state.seconds += seconds
            cell["daemon_cpu_ms_per_s"] = (after - before) / seconds
            for transport, window in windows.items():
                state.windows[transport].append(window)
                cell[transport] = window.figures()
            state.rounds.append(cell)
            if phase == "writes":
                removed += unpublish_flooded(daemon)
    flood = _flood_results(gathered, flooder_figures, settings, prefix, removed)
    flood["refusal"] = refusal
    flood["refusal"]["modules_unpublished"] = probed
    return flood


def _flooder_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The flooder's answers over every round: counts by status, per second, its errors."""
    statuses: dict[str, int] = {}
    seconds = 0.0
    for run in runs:
        seconds += run["window_s"]
        for status, count in run["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    return {
        "statuses": dict(sorted(statuses.items())),
        "answers": sum(statuses.values()),
        "seconds": seconds,
        "per_s": {status: count / seconds for status, count in sorted(statuses.items())},
        "answers_per_s": sum(statuses.values()) / seconds if seconds else 0.0,
        "error_count": sum(run["error_count"] for run in runs),
    }


def _flood_results(
    gathered: dict[str, _Phase],
    flooder_figures: dict[str, list[dict[str, Any]]],
    settings: Settings,
    prefix: list[str],
    removed: int,
) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for phase, state in gathered.items():
        cell: dict[str, Any] = {
            transport: pooled(windows).figures() for transport, windows in state.windows.items()
        }
        cell["daemon_cpu_ms_per_s"] = state.daemon_cpu_ms / state.seconds
        cell["limited"] = phase in LIMITED
        cell["rounds"] = state.rounds
        if phase != "quiet":
            cell["flooder"] = _flooder_summary(flooder_figures[phase])
            cell["flooder"]["cpu_ms_per_s"] = state.flooder_cpu_ms / state.seconds
        phases[phase] = cell
    quiet = phases["quiet"]
    for phase in PHASES:
        cell = phases[phase]
        for transport in TRANSPORTS:
            # The share of this phase's discovers slower than the target allows.
            bound = TARGET_P99_RATIO * quiet[transport]["p99_ms"] / 1000.0
            samples = pooled(gathered[phase].windows[transport]).latencies
            slow = sum(1 for latency in samples if latency > bound)
            cell[transport]["over_target_share"] = slow / len(samples) if samples else None
        if phase == "quiet":
            continue
        for transport in TRANSPORTS:
            cell[transport]["ratio"] = {
                key: cell[transport][key] / quiet[transport][key]
                for key in ("p50_ms", "p90_ms", "p99_ms")
            }
        worst = max(cell[transport]["ratio"]["p99_ms"] for transport in TRANSPORTS)
        cell["p99_ratio_max"] = worst
        cell["ok"] = worst <= TARGET_P99_RATIO
    return {
        "flooder": {
            "uid": FLOOD_UID,
            "connections": settings.connections,
            "transport": "tcp",
            "generator": "bench.loadgen, closed loop",
            "command": prefix,
            "floods": {kind: {"method": m, "path": p} for kind, (m, p, _) in FLOODS.items()},
        },
        "phases": phases,
        "flooded_modules_unpublished": removed,
        "verdict": {
            "target_p99_ratio": TARGET_P99_RATIO,
            "limited": list(LIMITED),
            "ok": all(phases[phase]["ok"] for phase in LIMITED),
        },
    }


# -- the run -----------------------------------------------------------------------


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise BenchTimeout("the run did not finish within its --timeout")


def _fit_open_files(steps: tuple[int, ...], notes: list[str]) -> tuple[int, ...]:
    """
    Raise the open-file limit for the lookups' connections (two descriptors
    each); the steps that fit under the hard limit (the others are noted).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fitting = tuple(
        n for n in steps if hard == resource.RLIM_INFINITY or 2 * n + OPEN_FILES_MARGIN <= hard
    )
    if fitting != steps:
        notes.append(
            f"lookups: the hard open-file limit ({hard}) leaves out "
            + ", ".join(str(n) for n in steps if n not in fitting)
            + " more connections"
        )
    if fitting:
        raise_open_files(2 * max(fitting) + OPEN_FILES_MARGIN)
    return fitting


def _sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def run(settings: Settings) -> dict[str, Any]:
    """Measure the lookups, start the daemon, flood it, time identified requests; the results."""
    results: dict[str, Any] = {
        "meta": {
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"
            ),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "uid": os.geteuid(),
            "loadavg_before": list(os.getloadavg()),
            "tcp_tw_reuse": _sysctl("net.ipv4.tcp_tw_reuse"),
            "quick": settings.quick,
        },
        "settings": {
            "rounds": settings.rounds,
            "window_s": settings.window,
            "warmup_s": settings.warmup,
            "settle_s": settings.settle,
            "flood_connections": settings.connections,
            "background_modules": settings.background,
            "lookup_connections": list(settings.lookup_connections),
            "lookup_batches": settings.lookup_batches,
            "lookup_per_batch": settings.lookup_per_batch,
            "proc_per_batch": settings.proc_per_batch,
            "fresh_per_batch": settings.fresh_per_batch,
            "e2e_window_s": settings.e2e_window,
            "e2e_warmup_s": settings.e2e_warmup,
            "e2e_rounds": settings.e2e_rounds,
            "write_rate": WRITE_RATE,
            "write_burst": WRITE_BURST,
            "read_rate": READ_RATE,
            "read_burst": READ_BURST,
        },
        "notes": [],
    }
    notes: list[str] = results["notes"]
    began = time.monotonic()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    try:
        steps = _fit_open_files(settings.lookup_connections, notes)
        with Workspace() as workspace:
            location, version, digest = workspace.installed_package()
            results["meta"].update(
                hsu_registry=location, hsu_registry_version=version, hsu_registry_digest=digest
            )
            progress(
                "abuse: identity lookups, in process, with "
                + ", ".join(str(n) for n in steps)
                + " connections"
            )
            results["lookup"] = measure_lookups(
                workspace.root,
                steps,
                settings.lookup_batches,
                settings.lookup_per_batch,
                settings.proc_per_batch,
                settings.fresh_per_batch,
            )
            daemon = start_daemon(workspace, "abuse", DAEMON_ARGS)
            try:
                progress(f"abuse: publishing {settings.background + 1} modules")
                prepare(daemon, settings.background)
                results["registered"] = registered(daemon)
                reason = flood_unavailable()
                if reason is None:
                    results["flood"] = measure_flood(workspace, daemon, settings, notes)
                else:
                    results["flood"] = {"not_measured": reason}
                    notes.append(f"flood not measured: {reason}")
            finally:
                results["exit_status"] = daemon.stop()
                results["meta"]["daemon_log_tail"] = log_tail(daemon.log_path, 600)
            progress("abuse: a daemon with its identity lookups timed, for the end to end")
            timed = start_daemon(workspace, "timed", DAEMON_ARGS, wrapper=timed_daemon())
            try:
                prepare(timed, settings.background)
                results["end_to_end"] = measure_end_to_end(
                    timed,
                    settings.e2e_window,
                    settings.e2e_warmup,
                    settings.e2e_rounds,
                    WINDOW_LIMIT,
                    progress,
                    LookupCounter(timed),
                )
            finally:
                results["timed_exit_status"] = timed.stop()
            results["end_to_end"]["daemon_lookups"] = daemon_lookups(timed.read_log())
            if results["end_to_end"]["daemon_lookups"] is None:
                notes.append("the timed daemon did not report its lookups")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    for key in ("exit_status", "timed_exit_status"):
        if results.get(key) != 0:
            notes.append(f"{key}: a daemon exited with {results.get(key)} on SIGTERM")
    _check_answers(results, notes)
    results["meta"]["elapsed_s"] = time.monotonic() - began
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    return results


def _check_answers(results: dict[str, Any], notes: list[str]) -> None:
    """A note for every measured window with an answer other than 200 or a failed request."""
    cells: list[tuple[str, dict[str, Any]]] = []
    flood = results.get("flood", {})
    for phase, cell in flood.get("phases", {}).items():
        cells += [(f"quiet client, {phase} phase, {t}", cell[t]) for t in TRANSPORTS]
    for transport in TRANSPORTS:
        for operation, modes in results["end_to_end"][transport].items():
            cells += [
                (f"end to end {operation} {transport} {mode}", cell) for mode, cell in modes.items()
            ]
    for where, cell in cells:
        if cell["non_2xx"] or cell["error_count"]:
            notes.append(
                f"{where}: statuses {cell['statuses']}, {cell['error_count']} failed requests "
                f"{cell['errors']}"
            )


# -- the table ---------------------------------------------------------------------


def _statuses(per_s: dict[str, float]) -> str:
    return " ".join(f"{status}:{rate:.0f}" for status, rate in per_s.items()) or "-"


def _flood_lines(results: dict[str, Any]) -> list[str]:
    flood = results["flood"]
    s = results["settings"]
    if "not_measured" in flood:
        return [f"Flood: not measured: {flood['not_measured']}."]
    flooder = flood["flooder"]
    lines = [
        f"Flood: one identity (uid {flooder['uid']}, setpriv) on {flooder['connections']} "
        f"loopback TCP connections at full speed, ignoring 429s ({flooder['generator']}), "
        f"against one daemon (memory store, {results['registered']} modules; "
        f"--write-rate={s['write_rate']}, bursts {s['write_burst']}; "
        f"--read-rate={s['read_rate']}, bursts {s['read_burst']}),",
        "writes = POST /api/v1/publish of a new module per request, reads = GET "
        "/api/v1/modules, discover = GET /api/v1/discover/echo (never rate limited, by "
        "design: per-peer limits are issue 13).",
        "Quiet client: the bench's uid (a plain discover is not identified), GET "
        "/api/v1/discover/echo one at a time on one persistent connection, "
        f"{s['window_s']:g} s per transport after {s['warmup_s']:g} s,",
        f"{s['rounds']} round(s) of the four phases interleaved, samples pooled; x quiet = / the "
        f"quiet phase's figure in this run; CPU = ms/s of the daemon and of the flooder "
        f"({results['meta']['cpus']} CPUs shared by",
        "daemon, flooder and client); flooder answers per second by status (whole flood run); "
        f">2x % = discovers slower than {TARGET_P99_RATIO:g}x the quiet p99.",
        f"Target: writes and reads floods leave the p99 within {TARGET_P99_RATIO:g}x.",
        f"  {'flood':<8} {'transport':<9} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'x quiet':>7} {'p99':>6} {'>2x %':>6} {'daemon':>6} {'flooder':>7}  "
        f"{'flooder answers/s':<22} verdict",
    ]
    for phase in PHASES:
        cell = flood["phases"][phase]
        for number, transport in enumerate(TRANSPORTS):
            figures = cell[transport]
            ratio = figures.get("ratio")
            first = number == 0
            flooder_cell = cell.get("flooder")
            verdict = ""
            if first and phase != "quiet":
                ratio_text = f"p99 x{cell['p99_ratio_max']:.2f}"
                if cell["limited"]:
                    verdict = ("ok" if cell["ok"] else "OVER") + f" ({ratio_text})"
                else:
                    verdict = f"not limited ({ratio_text})"
            lines.append(
                f"  {phase if first else '':<8} {transport:<9} {figures['rps']:7.0f} "
                f"{figures['p50_ms']:7.3f} {figures['p99_ms']:7.3f} {figures['max_ms']:7.2f} "
                f"{fmt(ratio['p50_ms'] if ratio else None, '7.2f')} "
                f"{fmt(ratio['p99_ms'] if ratio else None, '6.2f')} "
                f"{figures['over_target_share'] * 100:6.2f} "
                f"{fmt(cell['daemon_cpu_ms_per_s'] if first else None, '6.0f')} "
                f"{fmt(flooder_cell['cpu_ms_per_s'] if first and flooder_cell else None, '7.0f')}"
                f"  {(_statuses(flooder_cell['per_s']) if first and flooder_cell else ''):<22} "
                f"{verdict}".rstrip()
            )
    for kind, found in flood["refusal"].items():
        if not isinstance(found, dict) or "accepted_before" not in found:
            continue
        if found["status"] is None:
            lines.append(f"Refusal probe, {kind}: no 429 in {found['accepted_before']} requests")
            continue
        lines.append(
            f"Refusal probe (uid {flooder['uid']}, fresh buckets), {kind}: 429 after "
            f"{found['accepted_before']} accepted in {found['seconds']:.2f} s, Retry-After: "
            f"{found['retry_after']}, {found['content_type']}, "
            + json.dumps(found["body"], separators=(",", ":"))[:120]
        )
    ok = flood["verdict"]["ok"]
    worst = {phase: flood["phases"][phase]["p99_ratio_max"] for phase in PHASES[1:]}
    lines.append(
        f"Verdict: {'met' if ok else 'NOT met'}: one identity flooding writes or expensive "
        f"reads leaves the quiet client's discover p99 at x{worst['writes']:.2f} and "
        f"x{worst['reads']:.2f} (target <= {TARGET_P99_RATIO:g}); its discover flood, which "
        f"no per-identity rate covers, at x{worst['discover']:.2f}."
    )
    return lines


def _lookup_lines(results: dict[str, Any]) -> list[str]:
    lookup = results["lookup"]
    s = results["settings"]
    totals = [str(n) for n in lookup["connections"]]
    names = {
        "unix": "unix socket: SO_PEERCRED",
        "unix_new": "  the same, on a new connection",
        "tcp": "loopback TCP: sock_diag netlink",
        "tcp_new": "  the same, on a new connection",
        "proc_net": "loopback TCP: /proc/net/tcp fallback",
        "proc_net_miss": "/proc/net/tcp, a miss (every row)",
    }
    rows = ", ".join(f"{lookup['rows'][total]}" for total in totals)
    lines = [
        "Identity lookup, in process: connection_identity() over real accepted sockets (the "
        "fallback: sockdiag._proc_net_uid), us per lookup, median of "
        f"{s['lookup_batches']} batches, with N",
        f"established loopback connections here (the lookups cycling over {lookup['sample']} of "
        f"them); sockets in /proc/net/tcp{{,6}} meanwhile: {rows} (other processes' and "
        "TIME_WAIT included); x = the most / the fewest.",
        f"  {'lookup':<38} " + " ".join(f"{'N=' + total:>9}" for total in totals) + f" {'x':>6}",
    ]
    for method in LOOKUP_METHODS:
        cells = lookup["methods"][method]
        lines.append(
            f"  {names[method]:<38} "
            + " ".join(f"{cells[total]['median_us']:9.1f}" for total in totals)
            + f" {cells['growth']:6.2f}"
        )
    fit = lookup.get("proc_net_miss_fit")
    if fit is not None:
        lines.append(
            f"  a /proc/net/tcp miss ~ {fit['fixed_us']:.0f} us + {fit['per_row_us']:.2f} us per "
            f"row (least squares over the {len(totals)} steps): the fallback reads the whole "
            "table; sock_diag asks for one socket."
        )
    return lines


def _e2e_lines(results: dict[str, Any]) -> list[str]:
    e2e = results["end_to_end"]
    s = results["settings"]
    lines = [
        "Per request, end to end: the bench's uid, one request at a time for "
        f"{s['e2e_window_s']:g} s after {s['e2e_warmup_s']:g} s, in {s['e2e_rounds']} "
        "round(s) of every cell (pooled), on one persistent connection or a new connection "
        "per request (latency from the connect);",
        "the default policy does not identify a plain discover (the unchanged figures); "
        f"services = GET {SERVICE_PATH} (an expensive read) and publish (the same module "
        "again) identify the caller, once per connection.",
        "A second daemon, started like the first with its connection_identity timed; "
        "daemon us/req = its CPU (schedstat, all threads) per request; lookups/req = "
        "connection_identity calls over that transport per request, us/lookup = their time.",
        f"  {'operation':<9} {'transport':<9} {'connection':<10} {'req/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'daemon us/req':>13} {'lookups/req':>11} {'us/lookup':>9}",
    ]
    for transport in TRANSPORTS:
        for operation in E2E_OPERATIONS:
            for mode in E2E_MODES:
                cell = e2e[transport][operation][mode]
                lines.append(
                    f"  {operation:<9} {transport:<9} {mode:<10} {cell['rps']:7.0f} "
                    f"{fmt(cell.get('p50_ms'), '7.3f')} {fmt(cell.get('p99_ms'), '7.3f')} "
                    f"{fmt(cell['daemon_cpu_us_per_request'], '13.0f')} "
                    f"{fmt(cell.get('lookups_per_request'), '11.2f')} "
                    f"{fmt(cell.get('lookup_us'), '9.1f')}"
                )
    inside = e2e.get("daemon_lookups") or {}
    if inside:
        lines.append(
            "Inside the daemon, all these requests: "
            + "; ".join(
                f"{'unix socket' if kind == 'unix' else 'loopback TCP'} "
                f"{inside[kind]['us']:.1f} us per lookup ({inside[kind]['lookups']} lookups)"
                for kind in ("unix", "tcp")
                if kind in inside
            )
        )
    lines.append(
        "The lookup's share of an identified request on a new connection = (op new - op "
        "persistent) - (discover new - discover persistent), the median of the rounds' "
        "(the least..the most):"
    )

    def spread(values: list[float | None]) -> str:
        known = sorted(value for value in values if value is not None)
        return f" ({known[0]:.0f}..{known[-1]:.0f})" if len(known) > 1 else ""

    for transport in TRANSPORTS:
        cost = e2e["identity_cost"][transport]
        parts = [
            f"{operation} {fmt(cost[operation]['daemon_us'], '.0f').strip()} us of daemon CPU"
            f"{spread(cost[operation]['daemon_us_rounds'])}, "
            f"{fmt(cost[operation]['p50_us'], '.0f').strip()} us of p50"
            f"{spread(cost[operation]['p50_us_rounds'])}"
            for operation in ("services", "publish")
        ]
        lines.append(f"  {transport}: " + "; ".join(parts))
    return lines


def render(results: dict[str, Any], notes: bool = True) -> str:
    """The results as a small table (with their notes unless C{notes} is false)."""
    lines = ["Abuse (issue 12): one flooding identity, and what knowing the caller costs."]
    lines += _flood_lines(results)
    lines += _lookup_lines(results)
    lines += _e2e_lines(results)
    if results.get("exit_status") not in (0, None):
        lines.append(f"  the daemon exited with {results['exit_status']} on SIGTERM")
    if notes:
        for note in results.get("notes", []):
            lines.append(f"note: {note}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> tuple[Settings, str]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.abuse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the phases (3)")
    parser.add_argument(
        "--window", type=float, default=None, help="seconds of each quiet-client window (3)"
    )
    parser.add_argument(
        "--connections", type=int, default=None, help="the flooder's connections (16)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 0.5 s windows, 8 flooding connections, 100 background modules, "
        "64 and 200 connections for the lookups (not up to 5 000), 1 end-to-end round (not 10)",
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
        rounds=args.rounds if args.rounds is not None else (1 if quick else 3),
        window=args.window if args.window is not None else (0.5 if quick else 3.0),
        warmup=0.05 if quick else 0.2,
        settle=0.3 if quick else 1.0,
        connections=args.connections if args.connections is not None else (8 if quick else 16),
        background=100 if quick else 500,
        lookup_connections=(64, 200) if quick else (64, 1000, 5000),
        lookup_batches=3 if quick else 7,
        lookup_per_batch=200 if quick else 2000,
        proc_per_batch=10 if quick else 20,
        fresh_per_batch=50 if quick else 300,
        e2e_window=0.3,
        e2e_warmup=0.05,
        e2e_rounds=1 if quick else 10,
        timeout=args.timeout if args.timeout is not None else TIMEOUT_S[quick],
        quick=quick,
    )
    if settings.rounds < 1 or settings.window <= 0 or settings.connections < 1:
        parser.error("--rounds and --connections must be at least 1 and --window positive")
    return settings, args.json


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    section_main("abuse", argv, _parse, run, render)


if __name__ == "__main__":
    main()

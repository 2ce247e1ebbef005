"""
The store: publish with the memory store (C{--store=memory}, the default)
and with the SQLite store (C{--store=sqlite:PATH}, a new file in the run's
workspace that the daemon creates), in the same run, over TCP with
persistent connections.

Operations (as in L{bench.throughput}):

- C{publish}: the same module republished again and again (the steady state
  of heartbeats: no growth);
- C{publish_new}: a new module ID per request (the registry, and the SQLite
  file, grow).

64 publishers at a fixed rate (C{paced}): the figures above come from
closed-loop generators, whose latency at 64 connections is bounded below by
64 / throughput (Little's law).  Real publishers publish now and then, so
this part loads each store open loop (L{bench.loadgen} C{--rate}): 64
connections, each republishing its own module (64 module IDs, 2 APIs each)
on a fixed schedule, every publish with a new metadata value so that each is
a change the store writes (an identical re-publish is a heartbeat, which the
daemon does not write), at a few fixed total rates (L{PACED_RATES}); latency
is measured from each request's scheduled send time, so a request held up
by a slow one before it counts its wait.  The Python generator does it over
TCP (wrk 4 has no open loop).  Reported: req/s achieved, latency, whether
the rate was kept (no connection ever more than
L{bench.loadgen.BEHIND_LIMIT_S} behind its schedule, every scheduled request
answered) and the verdict p99 < L{TARGET_P99_MS} ms, for both stores.

Each store and operation has a daemon of its own (six in all, counting the
paced part's), so that growth touches nothing else.  Every measured run follows its own warm-up;
runs take turns (run 1 of every cell, then run 2, ...; the two stores of a
cell back to back), so noise on the shared machine spreads over all of them,
and each figure is the median of its runs.  Load comes from wrk where
installed, else from the Python load generator (L{bench.loadgen}); each
figure names its generator.  Every SQLite figure is also given as a ratio to
the memory store's (ratios of the medians).  The targets (the issue's):
SQLite p99 publish under 10 ms at 64 concurrent publishers, and SQLite
throughput at least half of the memory store's; they are reported, never
asserted.

What reached the disk, read from outside the daemon:

- C{fdatasyncs}: the C{fdatasync} and C{fsync} calls of the SQLite daemon
  during each cell (warm-ups included), counted by the kernel's syscall
  tracepoints through C{perf stat} where it is installed and allowed (a
  counter in the kernel: nothing is traced to user space, the daemon is not
  slowed).  In WAL mode with C{synchronous=FULL} each committed transaction
  syncs the WAL once; a checkpoint adds about two.  So C{acknowledged /
  fdatasyncs} is about the number of publishes per transaction (group
  commit).
- C{rows}: the rows in each SQLite file once its daemon has stopped, against
  the publishes acknowledged (answered 2xx, warm-ups included).  Every
  acknowledged new module must be there; a few more may be, whose answers
  were in flight when a generator stopped (at most one per connection per
  generator run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import wrk
from bench.daemon import Server, Workspace, log_tail, start_daemon, stop_process
from bench.loadgen import BEHIND_LIMIT_S
from bench.stats import median
from bench.throughput import Settings, request_for, run_loadgen, summarise
from bench.workload import PUBLISH_PATH, paced_publish_template

__all__ = [
    "CONCURRENCY",
    "OPERATIONS",
    "PACED_CONNECTIONS",
    "PACED_RATES",
    "RATIO_FIGURES",
    "STORES",
    "TARGET_P99_CONCURRENCY",
    "TARGET_P99_MS",
    "TARGET_RPS_RATIO",
    "PacedSettings",
    "measure_store",
]

STORES = ("memory", "sqlite")
OPERATIONS = ("publish", "publish_new")
CONCURRENCY = (1, 64)
RATIO_FIGURES = ("rps", "p50_ms", "p90_ms", "p99_ms")
#: The issue's targets: SQLite p99 publish under this at this concurrency...
TARGET_P99_MS = 10.0
TARGET_P99_CONCURRENCY = 64
#: ... and SQLite req/s at least this fraction of the memory store's.
TARGET_RPS_RATIO = 0.5
SYNC_EVENTS = ("syscalls:sys_enter_fdatasync", "syscalls:sys_enter_fsync")
PERF_INTERVAL_MS = 100
PERF_ATTACH_TIMEOUT = 10.0
#: The paced part: this many publishers (connections, each its own module)...
PACED_CONNECTIONS = 64
#: ... at these total rates (requests per second, all connections together).
PACED_RATES = (1000.0, 2000.0)
PACED = "paced"


@dataclass(frozen=True)
class PacedSettings:
    """The paced part: total rates, and how long each run and its warm-up last."""

    rates: tuple[float, ...] = PACED_RATES
    duration: float = 4.0
    warmup: float = 1.0
    connections: int = PACED_CONNECTIONS


@dataclass(frozen=True)
class _PacedCell:
    """One thing to measure in the paced part: a store at a total rate."""

    store: str
    rate: float

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.store, PACED, int(self.rate))


@dataclass(frozen=True)
class _Cell:
    """One thing to measure: an operation on a store's daemon at a concurrency."""

    store: str
    operation: str
    connections: int
    generator: str

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.store, self.operation, self.connections)


@dataclass
class _Outcome:
    """A cell's measured runs and what all its generator runs were answered."""

    runs: list[dict[str, Any]]
    acknowledged: int = 0
    in_flight_bound: int = 0
    fdatasyncs: int | None = 0


def _acknowledged(figures: dict[str, Any]) -> int:
    """How many 2xx answers a generator run read, warm-up included."""
    if "statuses" in figures:  # the Python generator counts every answer
        return sum(n for status, n in figures["statuses"].items() if 200 <= int(status) < 300)
    return int(figures["requests"]) - int(figures.get("non_2xx", 0))  # wrk: every answer


def _load(
    workspace: Workspace, server: Server, cell: _Cell, settings: Settings, prefix: str
) -> tuple[dict[str, Any], int, int]:
    """
    Warm-up and one measured run: the measured figures, the 2xx answers of
    both and the most requests that can have been in flight when they stopped.
    """
    method, path, body, unique = request_for(cell.operation)
    target = server.target("tcp")
    if cell.generator == "wrk":

        def once(duration: float, run_prefix: str) -> dict[str, Any]:
            return wrk.run_wrk(
                target.url(path),
                cell.connections,
                duration,
                method=method,
                body=body,
                unique_prefix=run_prefix if unique else None,
            )

        warm = once(settings.warmup, "w" + prefix)
        figures = once(settings.duration, prefix)
        return figures, _acknowledged(warm) + _acknowledged(figures), 2 * cell.connections
    figures = run_loadgen(workspace, target, method, path, body, cell.connections, settings, prefix)
    return figures, _acknowledged(figures), cell.connections


def _load_paced(
    workspace: Workspace, server: Server, cell: _PacedCell, paced: PacedSettings, prefix: str
) -> tuple[dict[str, Any], int]:
    """One open-loop run (warm-up and measured window): its figures and its 2xx answers."""
    args = [
        *server.target("tcp").loadgen_args(),
        "--method=POST",
        f"--path={PUBLISH_PATH}",
        f"--body={paced_publish_template()}",
        f"--connections={paced.connections}",
        f"--rate={cell.rate / paced.connections!r}",
        f"--warmup={paced.warmup}",
        f"--duration={paced.duration}",
        f"--id-prefix={prefix}",
        "--timeout=30",
    ]
    # Answers to requests due in the window may come after it (a server
    # behind its schedule): up to the generator's grace of 30 s more.
    out = workspace.run_python("bench.loadgen", args, timeout=paced.warmup + paced.duration + 60)
    figures: dict[str, Any] = json.loads(out)
    return figures, _acknowledged(figures)


class SyncCounter:
    """
    Counts a process's C{fdatasync} and C{fsync} calls with C{perf stat} on
    the kernel's syscall tracepoints, between L{start} and L{stop}.  Unusable
    (no perf, no permission, no tracepoints) leaves L{available} false and
    L{reason} saying why.
    """

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.perf = shutil.which("perf")
        self.reason = "" if self.perf else "perf is not installed"
        self._process: subprocess.Popen[bytes] | None = None
        self._out = ""
        self._log = ""

    @property
    def available(self) -> bool:
        """Whether counting works (as far as is known)."""
        return not self.reason

    def start(self, pid: int) -> bool:
        """Start counting the calls of process C{pid}; whether it is counting."""
        if not self.available or self.perf is None:
            return False
        self._out = self.workspace.new_path("perf") + ".csv"
        self._log = self.workspace.new_path("perf-log")
        argv = [
            self.perf,
            "stat",
            "-x,",
            f"-I{PERF_INTERVAL_MS}",
            "-e",
            ",".join(SYNC_EVENTS),
            "-p",
            str(pid),
            "-o",
            self._out,
        ]
        try:
            process = self.workspace.spawn(argv, self._log)
        except OSError as e:
            self.reason = f"perf cannot run: {e}"
            return False
        # The first interval line says perf is attached: the daemon is idle
        # until the load starts, so no call is missed by starting this way.
        deadline = time.monotonic() + PERF_ATTACH_TIMEOUT
        while not self._lines():
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process, 5)
                self.reason = "perf stat failed: " + " ".join(log_tail(self._log, 300).split())
                return False
            time.sleep(0.01)
        self._process = process
        return True

    def _lines(self) -> list[list[str]]:
        try:
            with open(self._out, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return []
        rows = [line.strip().split(",") for line in text.splitlines()]
        return [row for row in rows if len(row) >= 4 and row[3] in SYNC_EVENTS]

    def stop(self) -> int | None:
        """Stop counting; the calls counted since L{start}, or None when it failed."""
        process, self._process = self._process, None
        if process is None:
            return None
        time.sleep(0.05)  # a commit under way when the load stopped
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process(process, 5)
            self.reason = "perf stat did not stop on SIGINT"
            return None
        total = 0
        for row in self._lines():
            if row[1].strip().isdigit():  # "<not counted>": the process did not run
                total += int(row[1])
        return total


def _start_daemons(
    workspace: Workspace, paced: bool
) -> tuple[dict[tuple[str, str], Server], dict[str, str]]:
    daemons: dict[tuple[str, str], Server] = {}
    paths: dict[str, str] = {}
    try:
        for operation in (*OPERATIONS, PACED) if paced else OPERATIONS:
            for store in STORES:
                args = ["--max-modules=100000000"]
                if store == "sqlite":
                    path = workspace.new_path(f"store-{operation}") + ".db"
                    paths[operation] = path
                    args.append(f"--store=sqlite:{path}")
                daemons[(store, operation)] = start_daemon(
                    workspace, f"store-{store}-{operation}", args
                )
    except BaseException:
        for server in daemons.values():
            server.stop()
        raise
    return daemons, paths


def _count_rows(path: str) -> tuple[int, int]:
    """The rows in a stopped daemon's SQLite file, and its size in bytes (WAL included)."""
    size = sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows: int = connection.execute("SELECT count(*) FROM registrations").fetchone()[0]
    finally:
        connection.close()
    return rows, size


def _ratio(value: float, basis: float) -> float:
    return value / basis if basis else 0.0


def measure_store(
    workspace: Workspace,
    settings: Settings,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    paced: PacedSettings | None = None,
) -> dict[str, Any]:
    """
    Measure publish on each store, C{settings.runs} times per cell, and (with
    C{paced}) the paced part as many times.

    @return: C{{"memory": {operation: {str(connections): summary}}, "sqlite":
        {...}, "sqlite_files": {operation: {...}}, "paced": {...}, ...}}: each
        summary has the C{generator}, median C{rps}, C{p50_ms}, C{p90_ms},
        C{p99_ms} and C{max_ms}, the runs, error counts and C{acknowledged}; a
        SQLite one also C{ratio_to_memory} (per figure), C{fdatasyncs} (None
        when not counted), C{publishes_per_fdatasync} and C{verdict}.  The
        paced part (see L{_paced_result}) has C{memory} and C{sqlite}, each
        C{{str(int(total rate)): summary}}.
    """
    generator = "wrk" if settings.use_wrk else "python"
    cells = [
        _Cell(store, operation, connections, generator)
        for operation in OPERATIONS
        for connections in CONCURRENCY
        for store in STORES
    ]
    paced_cells = (
        [_PacedCell(store, rate) for rate in paced.rates for store in STORES] if paced else []
    )
    every: list[_Cell | _PacedCell] = [*cells, *paced_cells]
    outcomes = {cell.key: _Outcome([]) for cell in every}
    counter = SyncCounter(workspace)
    daemons, paths = _start_daemons(workspace, paced is not None)
    exit_status: dict[str, int | None] = {}
    try:
        for run in range(settings.runs):
            for cell in every:
                for server in daemons.values():
                    server.check_alive()
                operation = PACED if isinstance(cell, _PacedCell) else cell.operation
                server = daemons[(cell.store, operation)]
                counting = cell.store == "sqlite" and counter.start(server.pid)
                try:
                    if isinstance(cell, _PacedCell):
                        assert paced is not None
                        # A new metadata value per request, in every run.
                        prefix = f"p{cell.rate:g}r{run}-"
                        figures, acknowledged = _load_paced(workspace, server, cell, paced, prefix)
                        in_flight = 0
                    else:
                        prefix = f"s{cell.connections}r{run}-"
                        figures, acknowledged, in_flight = _load(
                            workspace, server, cell, settings, prefix
                        )
                finally:
                    syncs = counter.stop() if counting else None
                outcome = outcomes[cell.key]
                outcome.runs.append(figures)
                outcome.acknowledged += acknowledged
                outcome.in_flight_bound += in_flight
                if outcome.fdatasyncs is not None:
                    outcome.fdatasyncs = None if syncs is None else outcome.fdatasyncs + syncs
                if isinstance(cell, _PacedCell):
                    assert paced is not None
                    what = (
                        f"{PACED + ' ' + format(cell.rate, 'g') + '/s':<11} {cell.store:<6} "
                        f"c={paced.connections:<2} python"
                    )
                    kept = "" if figures.get("rate_kept") else "  rate NOT kept"
                else:
                    what = (
                        f"{cell.operation:<11} {cell.store:<6} "
                        f"c={cell.connections:<2} {cell.generator:<6}"
                    )
                    kept = ""
                progress(
                    f"  run {run + 1}/{settings.runs} {what} {figures['rps']:9.0f} req/s"
                    f"  p99 {figures.get('p99_ms', 0.0):7.2f} ms"
                    + kept
                    + (
                        f"  ({figures['non_2xx']} non-2xx, {figures['error_count']} errors)"
                        if figures.get("non_2xx") or figures.get("error_count")
                        else ""
                    )
                    + (f"  {syncs} fdatasyncs" if syncs is not None else "")
                )
    finally:
        for (store, operation), server in daemons.items():
            exit_status[f"{store} {operation}"] = server.stop()

    result: dict[str, Any] = {
        "transport": "tcp",
        "generator": generator,
        "runs": settings.runs,
        "duration": settings.duration,
        "warmup": settings.warmup,
        "targets": {
            "p99_ms": TARGET_P99_MS,
            "p99_concurrency": TARGET_P99_CONCURRENCY,
            "rps_ratio": TARGET_RPS_RATIO,
        },
        "sync_counter": "perf stat" if counter.available else None,
        "sync_counter_unavailable": counter.reason or None,
        "exit_status": exit_status,
    }
    for store in STORES:
        result[store] = {operation: {} for operation in OPERATIONS}
    for cell in cells:
        outcome = outcomes[cell.key]
        summary = summarise(outcome.runs, cell.generator)
        summary["acknowledged"] = outcome.acknowledged
        result[cell.store][cell.operation][str(cell.connections)] = summary
    for cell in cells:
        if cell.store != "sqlite":
            continue
        outcome = outcomes[cell.key]
        summary = result["sqlite"][cell.operation][str(cell.connections)]
        memory = result["memory"][cell.operation][str(cell.connections)]
        ratios = {figure: _ratio(summary[figure], memory[figure]) for figure in RATIO_FIGURES}
        summary["ratio_to_memory"] = ratios
        summary["fdatasyncs"] = outcome.fdatasyncs
        summary["publishes_per_fdatasync"] = (
            _ratio(outcome.acknowledged, outcome.fdatasyncs)
            if outcome.fdatasyncs is not None
            else None
        )
        summary["verdict"] = {
            "p99_ok": (
                summary["p99_ms"] < TARGET_P99_MS
                if cell.connections == TARGET_P99_CONCURRENCY
                else None
            ),
            "rps_ok": ratios["rps"] >= TARGET_RPS_RATIO,
        }
    files: dict[str, Any] = {}
    for operation, path in paths.items():
        if operation == PACED:
            continue
        acknowledged = sum(outcomes[("sqlite", operation, c)].acknowledged for c in CONCURRENCY)
        in_flight = sum(outcomes[("sqlite", operation, c)].in_flight_bound for c in CONCURRENCY)
        rows, size = _count_rows(path)
        # Republishing one module leaves one row; a new module per request, one per publish.
        expected = 1 if operation == "publish" else acknowledged
        files[operation] = {
            "rows": rows,
            "acknowledged": acknowledged,
            "acknowledged_modules": expected,
            "in_flight_bound": in_flight,
            "bytes": size,
            "ok": expected <= rows <= expected + (0 if operation == "publish" else in_flight),
        }
    result["sqlite_files"] = files
    if paced is not None:
        result[PACED] = _paced_result(paced, settings.runs, outcomes, paths[PACED])
    return result


def _paced_summary(outcome: _Outcome, rate: float, paced: PacedSettings) -> dict[str, Any]:
    """The median figures of a paced cell's runs, and whether every run kept the rate."""
    runs = outcome.runs
    summary = summarise(runs, "python")
    summary["target_rps"] = rate
    summary["rate_per_connection"] = rate / paced.connections
    summary["acknowledged"] = outcome.acknowledged
    summary["scheduled"] = sum(int(r.get("scheduled", 0)) for r in runs)
    summary["unanswered"] = sum(int(r.get("unanswered", 0)) for r in runs)
    summary["rate_kept"] = all(bool(r.get("rate_kept")) for r in runs)
    summary["behind_connections"] = max(int(r.get("behind_connections", 0)) for r in runs)
    summary["max_send_lag_ms"] = max(float(r.get("max_send_lag_ms", 0.0)) for r in runs)
    # Diagnostics (medians over the runs): p99 measured from the actual send,
    # as a closed-loop generator would, and p99 of how late the generator's
    # own timers fired (its share of the latency measured from the schedule).
    for name in ("from_send", "timer_lag"):
        values = [r[name]["p99_ms"] for r in runs if name in r]
        summary[f"{name}_p99_ms"] = median(values) if values else 0.0
    summary["verdict"] = {
        "p99_ok": summary["p99_ms"] < TARGET_P99_MS,
        "rate_ok": summary["rate_kept"],
    }
    for index, run in enumerate(runs):
        summary["runs"][index].update(
            {k: run[k] for k in ("rate_kept", "max_send_lag_ms", "unanswered") if k in run}
        )
    return summary


def _paced_result(
    paced: PacedSettings,
    runs: int,
    outcomes: dict[tuple[str, str, int], _Outcome],
    path: str,
) -> dict[str, Any]:
    """The paced part: its settings, a summary per store and rate, and the SQLite file."""
    out: dict[str, Any] = {
        "transport": "tcp",
        "generator": "python",
        "mode": "open loop",
        "connections": paced.connections,
        "modules": paced.connections,
        "apis_per_module": 2,
        "rates": [int(rate) for rate in paced.rates],
        "runs": runs,
        "duration": paced.duration,
        "warmup": paced.warmup,
        "behind_limit_s": BEHIND_LIMIT_S,
        "target_p99_ms": TARGET_P99_MS,
    }
    for store in STORES:
        out[store] = {
            str(int(rate)): _paced_summary(outcomes[(store, PACED, int(rate))], rate, paced)
            for rate in paced.rates
        }
    for rate in paced.rates:
        key = str(int(rate))
        summary = out["sqlite"][key]
        memory = out["memory"][key]
        summary["ratio_to_memory"] = {
            figure: _ratio(summary[figure], memory[figure]) for figure in RATIO_FIGURES
        }
        syncs = outcomes[("sqlite", PACED, int(rate))].fdatasyncs
        summary["fdatasyncs"] = syncs
        summary["publishes_per_fdatasync"] = (
            _ratio(summary["acknowledged"], syncs) if syncs is not None else None
        )
    rows, size = _count_rows(path)
    out["sqlite_file"] = {
        "rows": rows,
        "modules": paced.connections,
        "acknowledged": sum(out["sqlite"][str(int(rate))]["acknowledged"] for rate in paced.rates),
        "bytes": size,
        "ok": rows == paced.connections,
    }
    return out

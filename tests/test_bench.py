"""
Tests for the benchmark harness (C{bench/}): C{python -m bench --quick
--no-wrk} runs once against the installed daemon and must produce a complete
table and JSON.  Nothing here is timed: how fast the daemon is is the
benchmark's business, not the test suite's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import struct
import sys
import time
from collections.abc import Coroutine
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from bench.fanout import Census, Schedule, Unsettled, census, settle, tally
from bench.fanout import render as render_fanout
from bench.held_queries import measure as measure_held_queries
from bench.loadgen import LoadSpec, _Load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HSU_REGISTRY = os.path.join(os.path.dirname(sys.executable), "hsu-registry")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BENCH_TIMEOUT = 600.0

OPERATIONS = ("discover", "publish", "publish_new", "health")
TRANSPORTS = ("tcp", "unix")
CONCURRENCY = ("1", "64")
LATENCY = ("rps", "p50_ms", "p90_ms", "p99_ms")
STARTUP_COMMANDS = ("hsu-registry", "twistd -n hsu-registry", "twistd -n web (bare Klein)")
GC_MODES = {"frozen": True, "not_frozen": False}
GC_PHASES = ("start-up", "publish", "republish", "discover", "other")
GC_QUICK_MODULES = 2000
STORES = ("memory", "sqlite")
STORE_OPERATIONS = ("publish", "publish_new")
PACED_QUICK_RATE = "200"
#: bench.fanout --quick: watchers, held queries, publishes to the watchers alone and to both.
FANOUT_QUICK = {"watchers": 50, "queries": 50, "solo_publishes": 2, "publishes": 3}
FANOUT_MEMORY = (
    "before_kib",
    "watchers_kib",
    "watchers_and_queries_kib",
    "per_watcher_kib",
    "per_query_kib",
)
#: Figures of each phase (solo: watchers alone; both: watchers and held queries).
FANOUT_FIGURES = {
    "solo": ("publish_ms", "first_watcher_ms", "last_watcher_ms"),
    "both": (
        "publish_ms",
        "first_watcher_ms",
        "last_watcher_ms",
        "first_query_ms",
        "last_query_ms",
    ),
}
#: bench.liveness --quick: kills per monitor and registrations per shape.
LIVENESS_QUICK = {"rounds": 5, "modules": 1000}
#: Its shapes (the polled one is left out of a quick run) and whether each is bound.
LIVENESS_SHAPES = {
    "unbound_one": False,
    "one_process": True,
    "unbound_many": False,
    "many_processes": True,
}
LIVENESS_KILL = ("median_ms", "p90_ms", "max_ms", "min_ms")
LIVENESS_SHAPE_FIGURES = (
    "rss_kib",
    "idle_rss_kib",
    "fds",
    "pidfds",
    "publish_s",
    "publish_rps",
    "idle_cpu_ms",
    "idle_cpu_sched_ms",
)
#: bench.checks --quick: its settings.
CHECKS_QUICK = {"modules": 200, "window_s": 3.0, "check_concurrency": 32, "discover_requests": 1000}
#: Its phases measured over a window (none: no check), and their figures.
CHECKS_PHASES = ("none", "tcp", "http")
CHECKS_FIGURES = (
    "window_s",
    "checks_per_s",
    "cpu_ms_per_s",
    "cpu_sched_ms_per_s",
    "target_cpu_ms_per_s",
    "log_bytes_per_s",
)
CHECKS_DISCOVER = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
CHECKS_HUNG_COUNTS = (
    "fds_idle",
    "fds_max",
    "extra_fds_max",
    "extra_fds_p50",
    "extra_fds_p99",
    "samples_over_bound",
    "fd_samples",
    "target_open_max",
    "target_accepted",
    "checks",
    "threads",
)
#: bench.abuse --quick: its settings.
ABUSE_QUICK = {
    "rounds": 1,
    "window_s": 0.5,
    "flood_connections": 8,
    "background_modules": 100,
    "write_rate": 50,
    "write_burst": 200,
    "read_rate": 20,
    "read_burst": 50,
}
#: Its lookups' numbers of established connections.
ABUSE_LOOKUP_CONNECTIONS = (64, 200)
#: Its phases (quiet: no flood), the floods per-identity rates hold, and the transports.
ABUSE_PHASES = ("quiet", "writes", "reads", "discover")
ABUSE_LIMITED = ("writes", "reads")
ABUSE_LATENCY = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "over_target_share")
ABUSE_LOOKUPS = ("unix", "unix_new", "tcp", "tcp_new", "proc_net", "proc_net_miss")
ABUSE_E2E = ("discover", "services", "publish")
ABUSE_E2E_FIGURES = (
    "rps",
    "p50_ms",
    "p99_ms",
    "daemon_cpu_ms_per_s",
    "daemon_cpu_us_per_request",
    "lookups_per_request",
)
PACED_FIGURES = (
    "rps",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "target_rps",
    "rate_per_connection",
    "max_send_lag_ms",
    "from_send_p99_ms",
    "timer_lag_p99_ms",
)


class _Collect(ProcessProtocol):
    """Collects a child's output; C{ended} fires with (stdout, stderr, exit code)."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self.ended: Deferred[tuple[bytes, bytes, int | None]] = Deferred(self._kill)

    def _kill(self, _: Deferred[Any]) -> None:
        try:
            assert self.transport is not None
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        if not self.ended.called:
            self.ended.callback((b"".join(self.out), b"".join(self.err), code))


class QuickBenchmarkTests(TestCase):
    """``python -m bench --quick --no-wrk`` works end to end."""

    timeout = BENCH_TIMEOUT + 30

    def assertNumber(self, value: Any, where: str) -> None:
        """C{value} is a finite int or float (not a bool)."""
        self.assertTrue(
            isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r}"
        )
        self.assertTrue(math.isfinite(value), f"{where}: {value!r}")

    async def test_quick_run(self) -> None:
        """
        The quick run exits 0, prints a table with every section, and writes
        JSON with numeric figures for discover, publish and health over TCP and
        the unix socket at concurrency 1 and 64 (each with its reference
        ratio), publish on the memory and the SQLite store (each SQLite figure
        with its ratio to the memory store's, and every acknowledged new
        module found in the SQLite file), 64 publishers at a fixed rate on
        each store (open loop: req/s achieved, latency, whether the rate was
        kept and the verdict; the 64 modules in the SQLite file), memory
        (with the idle RSS of a bare Klein process and the ratio to it),
        start-up, cleanup, garbage-collector pauses (a frozen and a not
        frozen daemon, each holding the 2 000 modules it was given), watch
        fan-out (50 watchers and 50 held queries: memory per watcher and per
        query, publish to the last watcher and the last query, every event
        delivered) and process liveness (5 kills of a bound module process,
        each removed, with pidfds and, where the kernel lets a seccomp filter
        deny pidfd_open, with the polling fallback; 1 000 registrations
        unbound and bound to one and to 1 000 processes: memory, descriptors,
        one pidfd per bound process, idle CPU, publish rate with its ratio to
        the unbound shape, and every bound registration removed once its
        processes were killed) and active health checks (200 modules without
        a check, then with a tcp and with an http check each, against the
        bench's own targets: checks counted by the target, the daemon's CPU
        per second and per check, discover latency with its ratio to the
        figure without checks, every API passing once; then http checks
        against a target that never answers: descriptors and connections
        held, every API critical) and abuse (as root: a refusal probe as uid
        65534 answered 429 with Retry-After and a JSON body past each burst,
        and a quiet client's discover latency with no flood and during floods
        of writes, catalog reads and discovers by uid 65534, each with its
        ratio to the quiet figure, the flooder's answers (429s for the
        rate-limited floods, none for discover) and the verdict; as anyone
        else the flood is recorded as not measured; then identity lookups in
        process over unix sockets, sock_diag and /proc/net/tcp at 64 and 200
        connections, and discover, services and publish on persistent and
        new connections over both transports, against a daemon whose lookups
        are timed: lookups per request, each lookup's time, and the
        identity's share).
        """
        if not os.path.exists(HSU_REGISTRY) or not os.path.exists(TWISTD):
            raise SkipTest(f"hsu-registry or twistd is not installed next to {sys.executable}")
        path = os.path.abspath(self.mktemp()) + ".json"
        argv = [sys.executable, "-m", "bench", "--quick", "--no-wrk", "--json", path]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        protocol = _Collect()
        reactor.spawnProcess(protocol, sys.executable, argv, env=env, path=REPO)
        ended = protocol.ended
        ended.addTimeout(BENCH_TIMEOUT, reactor)
        out, err, code = await ended
        self.assertEqual(code, 0, err.decode("utf-8", "replace")[-3000:])
        table = out.decode("utf-8")
        for heading in (
            "Throughput",
            "Store",
            "64 publishers at a fixed rate",
            "SQLite commits",
            "Memory",
            "Start-up",
            "Cleanup",
            "Garbage collector",
            "Watch fan-out",
            "target: last watcher within 50 ms",
            "Process liveness",
            "pidfd (default)",
            "Cost of process tracking",
            "bound to N processes",
            "Active health checks",
            "Hung target",
            "Abuse (issue 12)",
            "Identity lookup, in process",
            "Per request, end to end",
        ):
            self.assertIn(heading, table)
        rows = {
            line.split()[0] for line in table.splitlines() if line.startswith("  ") and line.strip()
        }
        for phase in CHECKS_PHASES:
            self.assertIn(phase, rows)

        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        self.assertEqual(results["table"], table)
        self.assertEqual(results["meta"]["tcp_generator"], "python")

        for transport in TRANSPORTS:
            for concurrency in CONCURRENCY:
                reference = results["reference"][transport][concurrency]
                for figure in LATENCY:
                    self.assertNumber(reference[figure], f"reference {transport} {concurrency}")
                self.assertGreater(reference["rps"], 0)
                for operation in OPERATIONS:
                    where = f"{operation} {transport} c={concurrency}"
                    cell = results["throughput"][operation][transport][concurrency]
                    self.assertEqual(cell["generator"], "python", where)
                    for figure in (*LATENCY, "reference_rps", "ratio"):
                        self.assertNumber(cell[figure], f"{where} {figure}")
                    self.assertGreater(cell["requests"], 0, where)
                    self.assertEqual((cell["non_2xx"], cell["error_count"]), (0, 0), where)

        store = results["store"]
        self.assertEqual(store["generator"], "python")
        for operation in STORE_OPERATIONS:
            for concurrency in CONCURRENCY:
                for name in STORES:
                    where = f"store {name} {operation} c={concurrency}"
                    cell = store[name][operation][concurrency]
                    self.assertEqual(cell["generator"], "python", where)
                    for figure in LATENCY:
                        self.assertNumber(cell[figure], f"{where} {figure}")
                    self.assertGreater(cell["requests"], 0, where)
                    self.assertEqual((cell["non_2xx"], cell["error_count"]), (0, 0), where)
                    self.assertIsInstance(cell["acknowledged"], int, where)
                    self.assertGreaterEqual(cell["acknowledged"], cell["requests"], where)
                where = f"store sqlite {operation} c={concurrency}"
                cell = store["sqlite"][operation][concurrency]
                for figure in LATENCY:
                    self.assertNumber(cell["ratio_to_memory"][figure], f"{where} ratio {figure}")
                self.assertIsInstance(cell["verdict"]["rps_ok"], bool, where)
                if concurrency == "64":
                    self.assertIsInstance(cell["verdict"]["p99_ok"], bool, where)
                else:
                    self.assertIsNone(cell["verdict"]["p99_ok"], where)
                if cell["fdatasyncs"] is not None:  # perf may be missing or not allowed
                    self.assertIsInstance(cell["fdatasyncs"], int, where)
                    self.assertNumber(cell["publishes_per_fdatasync"], where)
            files = store["sqlite_files"][operation]
            for figure in ("rows", "acknowledged", "acknowledged_modules", "bytes"):
                self.assertIsInstance(files[figure], int, f"sqlite file {operation} {figure}")
            self.assertTrue(files["ok"], f"sqlite file {operation}: {files}")
        self.assertEqual(store["sqlite_files"]["publish"]["rows"], 1)
        self.assertEqual(set(store["exit_status"].values()), {0})

        paced = store["paced"]
        self.assertEqual(paced["generator"], "python")
        self.assertEqual((paced["connections"], paced["modules"]), (64, 64))
        self.assertEqual(paced["rates"], [int(PACED_QUICK_RATE)])
        for name in STORES:
            where = f"paced {name} {PACED_QUICK_RATE}/s"
            cell = paced[name][PACED_QUICK_RATE]
            for figure in PACED_FIGURES:
                self.assertNumber(cell[figure], f"{where} {figure}")
            self.assertEqual(cell["target_rps"], float(PACED_QUICK_RATE), where)
            self.assertGreater(cell["requests"], 0, where)
            self.assertEqual(cell["requests"], cell["scheduled"] - cell["unanswered"], where)
            self.assertEqual((cell["non_2xx"], cell["error_count"]), (0, 0), where)
            self.assertGreaterEqual(cell["acknowledged"], cell["requests"], where)
            self.assertIsInstance(cell["rate_kept"], bool, where)
            self.assertIsInstance(cell["behind_connections"], int, where)
            self.assertIsInstance(cell["verdict"]["p99_ok"], bool, where)
            self.assertIsInstance(cell["verdict"]["rate_ok"], bool, where)
        cell = paced["sqlite"][PACED_QUICK_RATE]
        for figure in LATENCY:
            self.assertNumber(cell["ratio_to_memory"][figure], f"paced sqlite ratio {figure}")
        if cell["fdatasyncs"] is not None:
            self.assertIsInstance(cell["fdatasyncs"], int, "paced sqlite")
            self.assertNumber(cell["publishes_per_fdatasync"], "paced sqlite")
        # Every publisher's own module, once each: 64 rows however often republished.
        self.assertEqual(paced["sqlite_file"]["rows"], 64, paced["sqlite_file"])
        self.assertTrue(paced["sqlite_file"]["ok"], paced["sqlite_file"])

        for transport in TRANSPORTS:
            memory = results["memory"][transport]
            self.assertNumber(memory["idle_kib"], f"memory {transport}")
            self.assertNumber(memory["bare_klein_idle_kib"], f"memory {transport}")
            self.assertGreater(memory["bare_klein_idle_kib"], 0, f"memory {transport}")
            self.assertNumber(memory["idle_ratio_to_bare_klein"], f"memory {transport}")
            self.assertNumber(memory["after_kib"]["1000"], f"memory {transport}")
            self.assertNumber(memory["per_1000_kib"], f"memory {transport}")

        for command in STARTUP_COMMANDS:
            for transport in TRANSPORTS:
                startup = results["startup"][command][transport]
                self.assertNumber(startup["median_ms"], f"startup {command} {transport}")
                self.assertNumber(startup["ratio_to_bare_klein"], f"startup {command}")

        cleanup = results["cleanup"]
        self.assertEqual(cleanup["expired"], cleanup["registrations"] // 2)
        for figure in ("pass_ms", "lag_ms", "max_gap_ms", "baseline_max_gap_ms"):
            self.assertNumber(cleanup[figure], f"cleanup {figure}")

        gc = results["gc"]
        self.assertEqual(gc["modules"], GC_QUICK_MODULES)
        self.assertNumber(gc["target_ms"], "gc target_ms")
        for mode, frozen in GC_MODES.items():
            cell = gc[mode]
            self.assertIs(cell["freeze_gc"], frozen, mode)
            self.assertEqual(cell["registrations"], GC_QUICK_MODULES, mode)
            if frozen:
                self.assertGreater(cell["frozen_objects"], 0, mode)
            else:
                self.assertEqual(cell["frozen_objects"], 0, mode)
            for generation in ("0", "1", "2"):
                where = f"gc {mode} generation {generation}"
                self.assertIsInstance(cell["collections"][generation], int, where)
                self.assertGreaterEqual(cell["collections"][generation], 0, where)
                for figure in ("max_ms", "max_cpu_ms", "total_ms"):
                    self.assertNumber(cell[figure][generation], f"{where} {figure}")
                    self.assertGreaterEqual(cell[figure][generation], 0.0, f"{where} {figure}")
            self.assertGreater(sum(cell["collections"].values()), 0, mode)
            for figure in ("serving_max_ms", "serving_max_cpu_ms", "overall_max_ms"):
                self.assertNumber(cell[figure], f"gc {mode} {figure}")
            self.assertEqual(cell["serving_max_ms"], max(cell["max_ms"].values()), mode)
            self.assertGreaterEqual(cell["overall_max_ms"], cell["serving_max_ms"], mode)
            self.assertIsInstance(cell["over_target"], int, mode)
            for phase in GC_PHASES:
                by_phase = cell["by_phase"][phase]
                self.assertIsInstance(by_phase["collections"], int, f"gc {mode} {phase}")
                self.assertNumber(by_phase["max_ms"], f"gc {mode} {phase}")
            self.assertGreater(cell["by_phase"]["start-up"]["collections"], 0, mode)
            self.assertEqual(
                sum(cell["by_phase"][phase]["collections"] for phase in GC_PHASES[1:]),
                sum(cell["collections"].values()),
                mode,
            )
            self.assertEqual(cell["load"]["publish"]["requests"], GC_QUICK_MODULES, mode)
            self.assertEqual(cell["load"]["republish"]["requests"], GC_QUICK_MODULES, mode)
            self.assertGreater(cell["load"]["discover"]["requests"], 0, mode)

        fanout = results["fanout"]
        self.assertNotIn("not_measured", fanout, fanout.get("not_measured"))
        for name, count in FANOUT_QUICK.items():
            self.assertEqual(fanout["settings"][name], count, f"fanout {name}")
        for figure in FANOUT_MEMORY:
            self.assertNumber(fanout["memory"][figure], f"fanout memory {figure}")
        for phase, figures in FANOUT_FIGURES.items():
            summary = fanout[phase]
            count = FANOUT_QUICK["solo_publishes" if phase == "solo" else "publishes"]
            self.assertEqual(summary["publishes"], count, f"fanout {phase}")
            for figure in figures:
                where = f"fanout {phase} {figure}"
                self.assertIsNotNone(summary[figure], where)
                self.assertNumber(summary[figure]["median_ms"], where)
                self.assertNumber(summary[figure]["max_ms"], where)
                self.assertEqual(summary[figure + "_incomplete"], 0, where)
        delivery = fanout["delivery"]
        self.assertEqual(delivery["events_received"], delivery["events_expected"], delivery)
        self.assertEqual(delivery["watchers_complete"], FANOUT_QUICK["watchers"], delivery)

        liveness = results["liveness"]
        for name, count in LIVENESS_QUICK.items():
            self.assertEqual(liveness["settings"][name], count, f"liveness {name}")
        rounds = LIVENESS_QUICK["rounds"]
        kills = {"pidfd": liveness["kill"]["pidfd"]}
        if liveness["kill"]["polling"] is not None:  # seccomp may be unavailable
            kills["polling"] = liveness["kill"]["polling"]
        for monitor, kill in kills.items():
            where = f"liveness kill {monitor}"
            self.assertEqual(kill["rounds"], rounds, where)
            self.assertEqual(len(kill["samples_ms"]), rounds, where)
            for figure in LIVENESS_KILL:
                self.assertNumber(kill[figure], f"{where} {figure}")
            self.assertEqual(kill["expired_log_lines"], rounds, where)
            # Only the daemon under the no-pidfd filter says it cannot have a pidfd.
            self.assertIs(kill["pidfd_warning"], monitor == "polling", where)
        modules = LIVENESS_QUICK["modules"]
        shapes = liveness["tracking"]["shapes"]
        self.assertEqual(set(shapes), set(LIVENESS_SHAPES))
        for key, bound in LIVENESS_SHAPES.items():
            where = f"liveness {key}"
            cell = shapes[key]
            self.assertIs(cell["bound"], bound, where)
            self.assertEqual(cell["modules"], modules, where)
            self.assertEqual(cell["registered"], modules, where)
            self.assertEqual(cell["processes"], modules if "many" in key else 1, where)
            for figure in LIVENESS_SHAPE_FIGURES:
                self.assertNumber(cell[figure], f"{where} {figure}")
            self.assertEqual(cell["pidfds"], cell["processes"] if bound else 0, where)
            self.assertFalse(cell["pidfd_warning"], where)
            if not bound:
                self.assertIsNone(cell["rss_ratio"], where)
                self.assertEqual(cell["expired_log_lines"], 0, where)
                continue
            for figure in ("rss_ratio", "publish_rps_ratio", "removal_ms"):
                self.assertNumber(cell[figure], f"{where} {figure}")
            self.assertIn(cell["removal_seen_by"], ("watch", "health"), where)
            self.assertEqual(cell["remaining"], 0, where)
            self.assertEqual(cell["expired_log_lines"], modules, where)

        self.checkChecks(results["checks"])
        self.checkAbuse(results["abuse"])

    def checkAbuse(self, abuse: dict[str, Any]) -> None:
        """The abuse section's JSON (L{bench.abuse}) is complete."""
        for name, value in ABUSE_QUICK.items():
            self.assertEqual(abuse["settings"][name], value, f"abuse {name}")
        self.assertEqual(abuse["exit_status"], 0)
        self.assertEqual(abuse["timed_exit_status"], 0)
        self.assertEqual(abuse["registered"], ABUSE_QUICK["background_modules"] + 1)

        lookup = abuse["lookup"]
        self.assertEqual(abuse["settings"]["lookup_connections"], list(ABUSE_LOOKUP_CONNECTIONS))
        self.assertEqual(lookup["connections"], list(ABUSE_LOOKUP_CONNECTIONS))
        for method in ABUSE_LOOKUPS:
            cells = lookup["methods"][method]
            for total in ABUSE_LOOKUP_CONNECTIONS:
                where = f"abuse lookup {method} {total}"
                self.assertNumber(cells[str(total)]["median_us"], where)
                self.assertGreater(cells[str(total)]["median_us"], 0.0, where)
                self.assertIsInstance(lookup["rows"][str(total)], int, where)
            self.assertNumber(cells["growth"], f"abuse lookup {method} growth")

        e2e = abuse["end_to_end"]
        for transport in TRANSPORTS:
            for operation in ABUSE_E2E:
                for mode in ("persistent", "new"):
                    where = f"abuse end to end {operation} {transport} {mode}"
                    cell = e2e[transport][operation][mode]
                    self.assertGreater(cell["requests"], 0, where)
                    self.assertEqual((cell["non_2xx"], cell["error_count"]), (0, 0), where)
                    for figure in ABUSE_E2E_FIGURES:
                        self.assertNumber(cell[figure], f"{where} {figure}")
                    if operation != "discover" and mode == "new":
                        # The timed daemon looked every new connection's caller up.
                        self.assertGreaterEqual(cell["lookups_per_request"], 0.9, where)
                        self.assertNumber(cell["lookup_us"], f"{where} lookup_us")
            inside = e2e["daemon_lookups"][transport]
            self.assertGreater(inside["lookups"], 0, f"abuse {transport} lookups")
            self.assertNumber(inside["us"], f"abuse {transport} us per lookup")
            for operation in ("services", "publish"):
                cost = e2e["identity_cost"][transport][operation]
                for figure in ("daemon_us", "p50_us"):
                    self.assertNumber(cost[figure], f"abuse {transport} {operation} {figure}")

        flood = abuse["flood"]
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            # A second uid needs root (and setpriv): said, not faked.
            self.assertIsInstance(flood["not_measured"], str)
            self.assertNotIn("phases", flood)
            return
        self.assertNotIn("not_measured", flood)
        for kind, burst in (("writes", "write_burst"), ("reads", "read_burst")):
            refusal = flood["refusal"][kind]
            self.assertEqual(refusal["status"], 429, kind)
            self.assertGreaterEqual(refusal["accepted_before"], ABUSE_QUICK[burst], kind)
            self.assertEqual(refusal["content_type"], "application/json", kind)
            self.assertTrue(refusal["retry_after"].isdigit(), refusal)
            self.assertIs(refusal["body"]["success"], False, kind)
        phases = flood["phases"]
        for phase in ABUSE_PHASES:
            cell = phases[phase]
            self.assertEqual(len(cell["rounds"]), ABUSE_QUICK["rounds"], phase)
            self.assertNumber(cell["daemon_cpu_ms_per_s"], f"abuse {phase} daemon CPU")
            for transport in TRANSPORTS:
                where = f"abuse {phase} {transport}"
                figures = cell[transport]
                self.assertGreater(figures["requests"], 0, where)
                self.assertEqual((figures["non_2xx"], figures["error_count"]), (0, 0), where)
                for figure in ABUSE_LATENCY:
                    self.assertNumber(figures[figure], f"{where} {figure}")
                if phase != "quiet":
                    self.assertNumber(figures["ratio"]["p99_ms"], f"{where} ratio")
            if phase == "quiet":
                self.assertNotIn("flooder", cell)
                continue
            flooder = cell["flooder"]
            self.assertNumber(flooder["cpu_ms_per_s"], f"abuse {phase} flooder CPU")
            self.assertGreater(flooder["statuses"].get("200", 0), 0, phase)
            if phase in ABUSE_LIMITED:
                self.assertGreater(flooder["statuses"].get("429", 0), 0, phase)
            else:
                self.assertEqual(set(flooder["statuses"]), {"200"}, phase)
            self.assertIs(cell["limited"], phase in ABUSE_LIMITED)
            self.assertIsInstance(cell["ok"], bool, phase)
            self.assertNumber(cell["p99_ratio_max"], phase)
        self.assertIsInstance(flood["verdict"]["ok"], bool)
        self.assertEqual(
            flood["verdict"]["ok"], all(phases[phase]["ok"] for phase in ABUSE_LIMITED)
        )
        self.assertGreater(flood["flooded_modules_unpublished"], 0)

    def checkChecks(self, checks: dict[str, Any]) -> None:
        """The checks section's JSON (L{bench.checks}) is complete."""
        for name, value in CHECKS_QUICK.items():
            self.assertEqual(checks["settings"][name], value, f"checks {name}")
        modules = CHECKS_QUICK["modules"]
        self.assertEqual(checks["exit_status"], 0)
        for phase in CHECKS_PHASES:
            where = f"checks {phase}"
            cell = checks[phase]
            for figure in CHECKS_FIGURES:
                self.assertNumber(cell[figure], f"{where} {figure}")
            for figure in ("checks", "fds_max", "threads", "status_changes", "target_errors"):
                self.assertIsInstance(cell[figure], int, f"{where} {figure}")
            discover = cell["discover"]
            self.assertGreater(discover["requests"], 0, where)
            self.assertLessEqual(discover["requests"], CHECKS_QUICK["discover_requests"], where)
            for figure in CHECKS_DISCOVER:
                self.assertNumber(discover[figure], f"{where} discover {figure}")
            if phase == "none":
                self.assertEqual(cell["checks"], 0, where)
                self.assertEqual(cell["statuses_after"], {"none": modules}, where)
                continue
            # The section waits for every API to pass before its window.
            self.assertNumber(cell["ready_s"], f"{where} ready_s")
            self.assertGreater(cell["checks"], 0, where)
            for figure in ("cpu_over_idle_ms_per_s", "cpu_us_per_check", "log_bytes_per_check"):
                self.assertNumber(cell[figure], f"{where} {figure}")
            for figure in ("p50_ms", "p90_ms", "p99_ms"):
                self.assertNumber(cell["discover_ratio"][figure], f"{where} ratio {figure}")
            self.assertEqual(sum(cell["statuses_after"].values()), modules, where)
            self.assertLessEqual(
                set(cell["statuses_after"]), {"passing", "critical", "unknown"}, where
            )
            self.assertEqual(cell["passing_after"], cell["statuses_after"].get("passing", 0))
        # Every answered check was a connection the target accepted; the two
        # counters are sampled at once, so connections accepted before the
        # window and answered in it (at most one per check in flight) count
        # only as answered.
        self.assertGreaterEqual(
            checks["http"]["http_accepted"] + CHECKS_QUICK["check_concurrency"],
            checks["http"]["checks"],
        )

        hung = checks["hung"]
        self.assertEqual(hung["critical"], modules, "every hung API ends critical")
        self.assertEqual(hung["last_output"], "timeout")
        self.assertEqual(hung["bound"], CHECKS_QUICK["check_concurrency"])
        for figure in CHECKS_HUNG_COUNTS:
            self.assertIsInstance(hung[figure], int, f"checks hung {figure}")
        self.assertGreater(hung["target_accepted"], 0)
        self.assertGreater(hung["fd_samples"], 0)
        self.assertEqual(hung["fds_max"], hung["fds_idle"] + hung["extra_fds_max"])
        for figure in ("all_critical_s", "expected_round_s", "cpu_ms_per_s", "checks_per_s"):
            self.assertNumber(hung[figure], f"checks hung {figure}")
        self.assertEqual(hung["expected_round_s"], modules / CHECKS_QUICK["check_concurrency"])
        self.assertIsInstance(hung["bound_ok"], bool)
        self.assertIsInstance(hung["steady_ok"], bool)
        self.assertIsInstance(checks["log"]["lines"], int)


class _Slow(Resource):
    """
    Answers every request with C{ok}, at once except the third request of
    connection 0 (paths are C{/CONN/ID}), held for C{hold} seconds; records
    the paths.
    """

    isLeaf = True

    def __init__(self, hold: float) -> None:
        super().__init__()
        self.hold = hold
        self.paths: list[bytes] = []

    def render_GET(self, request: Request) -> Any:
        self.paths.append(request.path)
        request.setHeader(b"content-length", b"2")
        mine = [p for p in self.paths if p.startswith(b"/0/")]
        if request.path.startswith(b"/0/") and len(mine) == 3:

            def answer() -> None:
                request.write(b"ok")
                request.finish()

            reactor.callLater(self.hold, answer)
            return NOT_DONE_YET
        return b"ok"


class HeldQueriesTests(SynchronousTestCase):
    """C{python -m bench.held_queries}: every held query is answered, both ways."""

    def test_measure(self) -> None:
        result = measure_held_queries(200)
        self.assertEqual(result["queries"], 200)
        for figure in ("timeout_s", "change_s"):
            self.assertIsInstance(result[figure], float, figure)
            self.assertGreaterEqual(result[figure], 0.0, figure)


class ScheduleTests(SynchronousTestCase):
    """The open-loop schedule is counted in whole steps, whatever the clock reads."""

    def test_steps_independent_of_clock(self) -> None:
        """
        Two connections at 10/s for 2 s have 20 steps each in the window, for
        clock readings where adding 0.1 s up twenty times would round the
        twenty-first just inside it (a run once sent 41 on a machine up for
        4.5 hours); each step falls due at its exact offset.
        """
        spec = LoadSpec(connections=2, rate=10, warmup=0, duration=2)
        for started in (0.0, 1500.0, 16500.0, 50000.0, 300000.0):
            load = _Load(spec)
            load.started = started
            self.assertEqual(load.steps(0), (0, 20))
            self.assertEqual(load.steps(1), (0, 20))
            self.assertEqual(load.scheduled_in_window(), 40)
            self.assertAlmostEqual(load.due(1, 19) - started, 1.95, places=6)

    def test_warmup_steps_not_measured(self) -> None:
        """With a 1 s warm-up at 4/s, the first four steps are not measured."""
        load = _Load(LoadSpec(connections=1, rate=4, warmup=1, duration=1))
        self.assertEqual(load.steps(0), (4, 8))


async def run_loadgen(case: TestCase, site: Site, *args: str) -> dict[str, Any]:
    """C{python -m bench.loadgen ARGS} against C{site} on a loopback port: its JSON result."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    case.addCleanup(port.stopListening)
    argv = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--tcp",
        f"127.0.0.1:{port.getHost().port}",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    protocol = _Collect()
    reactor.spawnProcess(protocol, sys.executable, argv, env=env, path=REPO)
    ended = protocol.ended
    ended.addTimeout(45, reactor)
    out, err, code = await ended
    case.assertEqual(code, 0, err.decode("utf-8", "replace")[-3000:])
    result: dict[str, Any] = json.loads(out)
    return result


class _Held(Resource):
    """Answers every request with C{ok} after C{hold} seconds."""

    isLeaf = True

    def __init__(self, hold: float) -> None:
        super().__init__()
        self.hold = hold

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-length", b"2")

        def answer() -> None:
            request.write(b"ok")
            request.finish()

        reactor.callLater(self.hold, answer)
        return NOT_DONE_YET


class ClosedLoopTests(TestCase):
    """C{python -m bench.loadgen} without a rate: requests back to back."""

    timeout = 60

    async def test_stall_longer_than_the_window(self) -> None:
        """
        When no answer comes within the measured window (a stall on a starved
        machine), the window stretches to the first answer: one request
        measured over the longer window, not an empty result.
        """
        hold = 0.4
        result = await run_loadgen(
            self,
            Site(_Held(hold)),
            "--path=/x",
            "--connections=1",
            "--warmup=0",
            "--duration=0.1",
        )
        self.assertEqual(result["requests"], 1)
        self.assertEqual(result["statuses"], {"200": 1})
        self.assertGreaterEqual(result["window_s"], hold - 0.05)
        self.assertAlmostEqual(result["rps"], 1 / result["window_s"])


class OpenLoopTests(TestCase):
    """C{python -m bench.loadgen --rate}: requests on a schedule, latency from it."""

    timeout = 60

    async def test_lateness_counts(self) -> None:
        """
        Two connections at 10 requests per second each for 2 s (no warm-up)
        send 40 requests, each with its connection's number and its own ID;
        when one answer is held for 1.2 s, the requests of that connection
        that fell due meanwhile go late, and their latency counts from when
        they were due (not from when they went): many are slow, not one, the
        connection is reported more than 1 s behind its schedule, and still
        every request due is sent and answered.
        """
        hold = 1.2
        resource = _Slow(hold)
        result = await run_loadgen(
            self,
            Site(resource),
            "--path=/{CONN}/{ID}",
            "--id-prefix=x",
            "--connections=2",
            "--rate=10",
            "--warmup=0",
            "--duration=2",
        )

        self.assertEqual(result["mode"], "open")
        self.assertEqual(result["scheduled"], 40)
        self.assertEqual(result["requests"], 40)
        self.assertEqual(result["unanswered"], 0)
        self.assertEqual(result["statuses"], {"200": 40})
        self.assertEqual(len(resource.paths), 40)
        self.assertEqual(len(set(resource.paths)), 40)
        for number in (b"0", b"1"):
            self.assertEqual(sum(1 for p in resource.paths if p.split(b"/")[1] == number), 20)
        self.assertEqual(result["target_rps"], 20.0)
        # Held from 0.2 s to at least 1.4 s: the requests due at 0.3 s to
        # 1.3 s went at 1.4 s or later, 1.1 s to 0.1 s late.  Counted from
        # when they were due, 12 of the 40 took 0.1 s or more, and the p90
        # is among the 5 slowest (at least 0.8 s); counted from when they
        # went, only the held one is slow.
        self.assertGreaterEqual(result["max_ms"], hold * 1000)
        self.assertGreaterEqual(result["p90_ms"], 800)
        self.assertGreaterEqual(result["from_send"]["max_ms"], hold * 1000)
        self.assertGreaterEqual(result["max_send_lag_ms"], 1000)
        self.assertFalse(result["rate_kept"])
        self.assertGreaterEqual(result["behind_connections"], 1)


#: The daemon's port in the /proc/net/tcp lines below, and this client's ports.
PORT = 0xB01D
PEERS = (40000, 40002, 40004)


def _tcp_line(
    local: str, local_port: int, remote_port: int, inode: int, rx: int = 0, tx: int = 0
) -> str:
    """
    One established socket as C{/proc/net/tcp} writes it, from C{local}
    (an IPv4 address) to 127.0.0.1:C{remote_port}.
    """
    hex_local = f"{struct.unpack('=I', socket.inet_aton(local))[0]:08X}"
    hex_remote = f"{struct.unpack('=I', socket.inet_aton('127.0.0.1'))[0]:08X}"
    return (
        f"   0: {hex_local}:{local_port:04X} {hex_remote}:{remote_port:04X} 01 "
        f"{tx:08X}:{rx:08X} 00:00000000 00000000  1000        0 {inode} 1 0 20 4 30 10 -1"
    )


_HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode"
)


class FanoutCensusTests(SynchronousTestCase):
    """
    bench.fanout counts the daemon's side of its own connections in
    C{/proc/net/tcp} by both ends' addresses, not by the port number alone.
    """

    def ours(self, accepted: int = 3, unread: int = 0) -> list[str]:
        """The daemon's side of this client's three connections."""
        return [
            _tcp_line(
                "127.0.0.1", PORT, peer, 100 + n if n < accepted else 0, rx=1 if n < unread else 0
            )
            for n, peer in enumerate(PEERS)
        ]

    def test_same_port_number_elsewhere(self) -> None:
        """
        A socket with the daemon's port number on another local address (the
        daemon listens on 127.0.0.1 only), never accepted and with a byte
        unread, does not keep the daemon from settling: counted by port
        number alone it made Census(established=4, accepted=3, unread=1), a
        census that could never settle at 3 (issue 11).
        """
        lines = [_HEADER, *self.ours(), _tcp_line("127.0.0.2", PORT, 45000, 0, rx=1)]
        found = tally(lines, PORT, PEERS, {100, 101, 102})
        self.assertEqual(found, Census(3, 3, 0, 0, strangers=0, elsewhere=1))
        self.assertTrue(found.settled(3))

    def test_strangers(self) -> None:
        """Another process's connection to the daemon is counted apart."""
        lines = [*self.ours(), _tcp_line("127.0.0.1", PORT, 45001, 200, rx=5)]
        found = tally(lines, PORT, PEERS, {100, 101, 102, 200})
        self.assertEqual(found, Census(3, 3, 0, 0, strangers=1, elsewhere=0))
        self.assertTrue(found.settled(3))

    def test_lingering(self) -> None:
        """
        A connection this client closed that is still established at the
        daemon keeps it from settling (it is not taken for a stranger's).
        """
        lines = [*self.ours()[:1], _tcp_line("127.0.0.1", PORT, PEERS[1], 101)]
        found = tally(lines, PORT, PEERS[:1], {100, 101}, gone=PEERS[1:])
        self.assertEqual(found, Census(1, 1, 0, 0, lingering=1))
        self.assertFalse(found.settled(1))
        self.assertEqual(found.outstanding(1), 1)

    def test_outstanding(self) -> None:
        """
        One of this client's connections not accepted yet, with its request
        unread, and one lost: not settled, and how far from it.
        """
        found = tally(self.ours(accepted=1, unread=2)[:2], PORT, PEERS, {100, 101, 102})
        self.assertEqual(found, Census(2, 1, 2, 0))
        self.assertFalse(found.settled(3))
        self.assertEqual(found.outstanding(3), 4)

    def test_kernel(self) -> None:
        """
        The same with real sockets: a listener in this process stands for
        the daemon, with three connections accepted; a listener on
        127.0.0.2 with the same port number holds a connection it never
        accepts, with one byte unread.
        """

        def made(sock: socket.socket) -> socket.socket:
            self.addCleanup(sock.close)
            return sock

        daemon = made(socket.socket())
        daemon.bind(("127.0.0.1", 0))
        daemon.listen(8)
        port = daemon.getsockname()[1]
        other = made(socket.socket())
        try:
            other.bind(("127.0.0.2", port))
        except OSError as e:
            raise SkipTest(f"cannot bind 127.0.0.2:{port}: {e}") from None
        other.listen(8)
        made(socket.create_connection(("127.0.0.2", port), timeout=5)).send(b"x")
        clients = [made(socket.create_connection(("127.0.0.1", port), timeout=5)) for _ in PEERS]
        for _ in clients:
            made(daemon.accept()[0])
        peers = {c.getsockname()[1] for c in clients}
        expected = Census(3, 3, 0, 0, strangers=0, elsewhere=1)
        deadline = time.monotonic() + 10
        while (found := census(os.getpid(), port, peers)) != expected:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)  # loopback delivery may wait for a softirq on a busy machine
        self.assertEqual(found, expected)
        self.assertTrue(found.settled(3))


class _Clock:
    """A clock that L{settle}'s sleeps advance; the daemon's schedule over it."""

    def __init__(self, waiting_share: float = 0.0, state: str = "R") -> None:
        self.now = 1000.0
        self.waiting_share = waiting_share
        self.state = state

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    def daemon(self) -> Schedule:
        """Its main thread waited C{waiting_share} of the time for a CPU and ran 1 ms/s."""
        elapsed = self.now - 1000.0
        return Schedule(int(elapsed * 1e6), int(elapsed * self.waiting_share * 1e9), self.state)


def _run(coroutine: Coroutine[Any, Any, Census]) -> Census:
    """Run a coroutine that never suspends (its sleeps are a fake clock's) to its end."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        result: Census = stop.value
        return result
    raise AssertionError("the coroutine suspended")


class FanoutSettleTests(SynchronousTestCase):
    """
    bench.fanout waits for the daemon to settle as long as each
    C{timeout} brings progress, and says why when it does not.
    """

    def settle(
        self, censuses: Any, clock: _Clock, timeout: float = 30.0, known: bool = True
    ) -> Census:
        """L{settle} at 3 connections over C{censuses} (a function of the time waited)."""
        return _run(
            settle(
                lambda: censuses(clock.now - 1000.0),
                3,
                "warm-up",
                PORT,
                timeout=timeout,
                daemon=clock.daemon if known else lambda: None,
                clock=clock,
                sleep=clock.sleep,
            )
        )

    def test_slow_progress(self) -> None:
        """
        A starved daemon accepting one connection every 20 s settles after
        60 s, twice the timeout: each step was progress.
        """
        clock = _Clock(waiting_share=0.9)
        found = self.settle(lambda t: Census(3, min(3, int(t // 20)), 0, 0), clock)
        self.assertTrue(found.settled(3))
        self.assertLess(abs(clock.now - 1000.0 - 60.0), 0.1)

    def test_no_progress(self) -> None:
        """
        A census that gets no closer for the timeout fails then, whatever
        comes and goes above its best (an answer's bytes flapping), and says
        what was outstanding.
        """
        clock = _Clock()

        def flapping(t: float) -> Census:
            return Census(3, 2 if t > 5 else 1, 1, int(t * 50) % 2)

        with self.assertRaises(Unsettled) as caught:
            self.settle(flapping, clock)
        self.assertLess(abs(clock.now - 1000.0 - 35.0), 0.1)
        message = str(caught.exception)
        self.assertIn("warm-up: the daemon did not settle at 3 connections", message)
        self.assertIn("2 accepted by the daemon, 1 with request bytes it has not read", message)

    def test_starved(self) -> None:
        """A daemon that waited for a CPU most of the time: the machine is too busy."""
        clock = _Clock(waiting_share=0.9)
        with self.assertRaises(Unsettled) as caught:
            self.settle(lambda t: Census(3, 2, 1, 0), clock)
        self.assertTrue(caught.exception.starved)
        self.assertRegex(str(caught.exception), r"waited 270\d\d ms for a CPU")
        self.assertIn("the machine is too busy to measure", str(caught.exception))

    def test_not_starved(self) -> None:
        """A daemon that had the CPU it wanted and did not accept: an error, not the load."""
        clock = _Clock(waiting_share=0.01)
        with self.assertRaises(Unsettled) as caught:
            self.settle(lambda t: Census(3, 2, 1, 0), clock)
        self.assertFalse(caught.exception.starved)
        self.assertIn("it was not starved of CPU", str(caught.exception))

    def test_stopped(self) -> None:
        """A stopped daemon (SIGSTOP) is not a busy machine."""
        clock = _Clock(waiting_share=0.9, state="T")
        with self.assertRaises(Unsettled) as caught:
            self.settle(lambda t: Census(3, 2, 1, 0), clock)
        self.assertFalse(caught.exception.starved)
        self.assertIn("it is stopped", str(caught.exception))

    def test_schedule_unknown(self) -> None:
        """Without the kernel's schedstat nobody can tell: an error."""
        clock = _Clock()
        with self.assertRaises(Unsettled) as caught:
            self.settle(lambda t: Census(3, 2, 1, 0), clock, known=False)
        self.assertFalse(caught.exception.starved)
        self.assertIn("CPU time is unknown", str(caught.exception))

    def test_not_measured_rendered(self) -> None:
        """The section's table says why it was not measured."""
        results = {
            "meta": {"cpus": 2},
            "settings": {"watchers": 50, "queries": 50},
            "not_measured": "warm-up: the daemon did not settle",
            "notes": [],
        }
        self.assertIn(
            "Not measured: warm-up: the daemon did not settle", render_fanout(results).splitlines()
        )

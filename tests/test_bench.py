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
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HSU_REGISTRY = os.path.join(os.path.dirname(sys.executable), "hsu-registry")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
BENCH_TIMEOUT = 150.0

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
        module found in the SQLite file), memory (with the idle RSS of a bare
        Klein process and the ratio to it), start-up, cleanup and
        garbage-collector pauses (a frozen and a not frozen daemon, each
        holding the 2 000 modules it was given).
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
            "SQLite commits",
            "Memory",
            "Start-up",
            "Cleanup",
            "Garbage collector",
        ):
            self.assertIn(heading, table)

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

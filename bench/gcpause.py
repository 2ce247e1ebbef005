"""
Garbage-collector pauses: how long each collection of the cyclic garbage
collector stops a daemon holding 100 000 registrations.

The daemon runs in a child process (C{python -m bench.gcpause --json-out
PATH [--no-freeze]}) built exactly as the C{hsu-registry} command builds it:
L{hsu_registry.options.Options} parsed from C{--endpoint=tcp:0:interface=
127.0.0.1 --max-modules=200000}, C{makeService(options.config, reactor)}
started on the real reactor, logging to stderr as the command logs.  Before
anything of Twisted or hsu_registry is imported, the child appends a
C{gc.callbacks} hook that records every collection: its generation, when it
began and how long it took, in wall-clock time (C{perf_counter}) and in CPU
time of the thread (C{thread_time}, which a busy shared machine does not
inflate).  On SIGTERM it stops recording as the first thing of its shutdown,
stops the daemon, writes what it recorded as JSON and exits 0.
C{--no-freeze} builds the same daemon with C{freeze_gc} turned off
(C{attrs.evolve(options.config, freeze_gc=False)}), for comparison.

The harness (L{measure_gc}) starts the child, waits for its "listening on"
line, then loads it over TCP from other processes: (a) publishes N new
modules of two APIs each (unique IDs, the Python load generator, 16
connections), (b) republishes all of them once more, (c) discovers one of
them at concurrency 64 for a few seconds (wrk where installed, else the
Python generator).  Pauses are attributed to these phases by their start
times (C{perf_counter} is C{CLOCK_MONOTONIC} on Linux: one clock for every
process).
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.daemon import Workspace

__all__ = ["MODES", "PHASES", "TARGET_MS", "PauseRecorder", "main", "measure_gc"]

#: The issue's target: no collection pauses the daemon longer than this.
TARGET_MS = 10.0
#: JSON key -> whether the child freezes (as the daemon does) or not.
MODES = {"frozen": True, "not_frozen": False}
PHASES = ("start-up", "publish", "republish", "discover")
ENDPOINT = "tcp:0:interface=127.0.0.1"
MAX_MODULES = 200_000
PUBLISH_CONNECTIONS = 16
DISCOVER_CONNECTIONS = 64
ID_PREFIX = "gc-"


class PauseRecorder:
    """
    A C{gc.callbacks} hook recording every collection in arrays of numbers,
    so that recording allocates no object the collector tracks.
    """

    __slots__ = ("_cpu", "_wall", "collected", "cpu", "generation", "recording", "start", "wall")

    def __init__(self) -> None:
        self.generation = array.array("b")
        self.start = array.array("d")
        self.wall = array.array("d")
        self.cpu = array.array("d")
        self.collected = array.array("q")
        self.recording = True
        self._wall = 0.0
        self._cpu = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._cpu = time.thread_time()
            self._wall = time.perf_counter()
            return
        wall = time.perf_counter()
        cpu = time.thread_time()
        if self.recording:
            self.generation.append(info["generation"])
            self.start.append(self._wall)
            self.wall.append(wall - self._wall)
            self.cpu.append(cpu - self._cpu)
            self.collected.append(info["collected"])

    def as_json(self) -> dict[str, list[Any]]:
        """
        Every collection recorded: generation, start (s), wall and CPU
        durations (s), and how many unreachable objects it found.
        """
        return {
            "generation": self.generation.tolist(),
            "start": self.start.tolist(),
            "wall_s": self.wall.tolist(),
            "cpu_s": self.cpu.tolist(),
            "collected": self.collected.tolist(),
        }


# -- the child: the daemon under a gc.callbacks hook -------------------------


def _child(json_out: str, freeze: bool) -> int:
    recorder = PauseRecorder()
    gc.callbacks.append(recorder)
    hooked_at = time.perf_counter()

    import attrs
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    import hsu_registry
    from hsu_registry.options import Options
    from hsu_registry.service import makeService

    r: Any = reactor
    options = Options()
    options.parseOptions([f"--endpoint={ENDPOINT}", f"--max-modules={MAX_MODULES}"])
    config = options.config
    if not freeze:
        config = attrs.evolve(config, freeze_gc=False)
    service = makeService(config, r)
    facts: dict[str, Any] = {
        "freeze_gc": config.freeze_gc,
        "hooked_at": hooked_at,
        "thresholds": list(gc.get_threshold()),
        "hsu_registry": os.path.dirname(hsu_registry.__file__),
        "hsu_registry_version": hsu_registry.__version__,
    }

    def snapshot() -> None:
        # The first "before shutdown" trigger: nothing of the stop is recorded.
        recorder.recording = False
        facts["stopped_at"] = time.perf_counter()
        facts["registrations"] = len(service.registry)
        facts["freeze_count_at_stop"] = gc.get_freeze_count()
        facts["count_at_stop"] = list(gc.get_count())
        facts["stats_at_stop"] = gc.get_stats()

    def start() -> None:
        # As hsu_registry.cli.run and main do.
        try:
            service.startService()
        except Exception as e:
            sys.stderr.write(f"bench.gcpause: the daemon did not start: {e}\n")
            facts["failed"] = str(e)
            service.stopService().addBoth(lambda _: r.stop())
            return
        r.addSystemEventTrigger("before", "shutdown", service.stopService)
        facts["started_at"] = time.perf_counter()
        facts["freeze_count_after_start"] = gc.get_freeze_count()
        observer = textFileLogObserver(sys.stderr)
        globalLogBeginner.beginLoggingTo(
            [FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.info)])],
            redirectStandardIO=False,
        )

    r.addSystemEventTrigger("before", "shutdown", snapshot)
    r.callWhenRunning(start)
    r.run()
    if "failed" in facts:
        return 1
    facts["pauses"] = recorder.as_json()
    partial = json_out + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(facts, f)
    os.replace(partial, json_out)
    return 0


def main(argv: list[str] | None = None) -> None:
    """The child's command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json-out", required=True, help="where the pauses go on SIGTERM")
    parser.add_argument("--no-freeze", action="store_true", help="freeze_gc off (for comparison)")
    args = parser.parse_args(argv)
    raise SystemExit(_child(args.json_out, freeze=not args.no_freeze))


# -- the harness ---------------------------------------------------------------


def _summarise(child: dict[str, Any], phases: dict[str, tuple[float, float]]) -> dict[str, Any]:
    """
    Collections, longest pauses and totals per generation while the daemon
    served (from its start to SIGTERM), and per phase; start-up (imports and
    building the service, before it listened) is a phase of its own.
    """
    pauses = child["pauses"]
    started = child["started_at"]
    generations = [str(g) for g in range(3)]
    summary: dict[str, Any] = {
        "collections": {g: 0 for g in generations},
        "max_ms": {g: 0.0 for g in generations},
        "max_cpu_ms": {g: 0.0 for g in generations},
        "total_ms": {g: 0.0 for g in generations},
    }
    by_phase: dict[str, dict[str, Any]] = {
        name: {"collections": 0, "full_collections": 0, "max_ms": 0.0, "max_cpu_ms": 0.0}
        for name in (*PHASES, "other")
    }
    over = 0
    overall = 0.0
    longest: dict[str, Any] = {}
    for generation, began, wall_s, cpu_s, collected in zip(
        pauses["generation"],
        pauses["start"],
        pauses["wall_s"],
        pauses["cpu_s"],
        pauses["collected"],
        strict=True,
    ):
        wall, cpu = wall_s * 1000.0, cpu_s * 1000.0
        overall = max(overall, wall)
        if began < started:
            phase = "start-up"
        else:
            phase = "other"
            for name, (low, high) in phases.items():
                if low <= began < high:
                    phase = name
                    break
            if wall > longest.get("wall_ms", -1.0):
                longest = {
                    "generation": generation,
                    "phase": phase,
                    "wall_ms": wall,
                    "cpu_ms": cpu,
                    "collected": collected,
                    "after_start_s": began - started,
                }
            g = str(generation)
            summary["collections"][g] += 1
            summary["max_ms"][g] = max(summary["max_ms"][g], wall)
            summary["max_cpu_ms"][g] = max(summary["max_cpu_ms"][g], cpu)
            summary["total_ms"][g] += wall
            over += wall > TARGET_MS
        cell = by_phase[phase]
        cell["collections"] += 1
        cell["full_collections"] += generation == 2
        cell["max_ms"] = max(cell["max_ms"], wall)
        cell["max_cpu_ms"] = max(cell["max_cpu_ms"], cpu)
    summary["serving_max_ms"] = max(summary["max_ms"].values())
    summary["serving_max_cpu_ms"] = max(summary["max_cpu_ms"].values())
    summary["over_target"] = over
    summary["overall_max_ms"] = overall
    summary["longest"] = longest
    summary["by_phase"] = by_phase
    return summary


def _measure_one(
    workspace: Workspace,
    key: str,
    modules: int,
    discover_s: float,
    use_wrk: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from bench import wrk
    from bench.daemon import log_tail, stop_process, wait_listening
    from bench.probe import request
    from bench.workload import HEALTH_PATH, PUBLISH_PATH, discover_path, publish_template

    freeze = MODES[key]
    json_out = workspace.new_path(f"gc-{key}") + ".json"
    log_path = workspace.new_path(f"gc-{key}-log")
    args = ["--json-out", json_out] + ([] if freeze else ["--no-freeze"])
    process = workspace.spawn(
        workspace.python_module("bench.gcpause", *args), log_path, bench_importable=True
    )
    try:
        (target,) = wait_listening(f"gc {key}", process, log_path, 1, timeout=30)

        def registered() -> tuple[int, int]:
            health = json.loads(request(target, "GET", HEALTH_PATH).body)
            return int(health["registeredModules"]), int(health["totalAPIs"])

        def publish(phase: str) -> dict[str, Any]:
            progress(f"gc ({key.replace('_', ' ')}): {phase} of {modules} modules")
            out = workspace.run_python(
                "bench.loadgen",
                [
                    *target.loadgen_args(),
                    "--method=POST",
                    f"--path={PUBLISH_PATH}",
                    f"--body={publish_template()}",
                    f"--id-prefix={ID_PREFIX}",
                    "--start-index=0",
                    f"--connections={PUBLISH_CONNECTIONS}",
                    f"--count={modules}",
                    f"--timeout={60 + modules / 100:.0f}",
                ],
                timeout=120 + modules / 100,
            )
            load: dict[str, Any] = json.loads(out)
            if load["error_count"] or load["non_2xx"]:
                raise RuntimeError(f"gc {key}: {phase} failed: {load}")
            if registered() != (modules, 2 * modules):
                raise RuntimeError(f"gc {key}: after {phase} the daemon holds {registered()}")
            return load

        phases: dict[str, tuple[float, float]] = {}
        loads: dict[str, Any] = {}
        for phase in ("publish", "republish"):
            began = time.perf_counter()
            loads[phase] = publish(phase)
            phases[phase] = (began, time.perf_counter())

        path = discover_path(f"{ID_PREFIX}0")
        answer = request(target, "GET", path)
        if answer.status != 200:
            raise RuntimeError(f"gc {key}: discover answered {answer.status}")
        progress(f"gc ({key.replace('_', ' ')}): discover at concurrency 64 for {discover_s:g} s")
        began = time.perf_counter()
        if use_wrk:
            loads["discover"] = wrk.run_wrk(target.url(path), DISCOVER_CONNECTIONS, discover_s)
        else:
            out = workspace.run_python(
                "bench.loadgen",
                [
                    *target.loadgen_args(),
                    f"--path={path}",
                    f"--connections={DISCOVER_CONNECTIONS}",
                    "--warmup=0",
                    f"--duration={discover_s}",
                ],
                timeout=discover_s + 120,
            )
            loads["discover"] = json.loads(out)
        phases["discover"] = (began, time.perf_counter())
        if loads["discover"]["error_count"] or loads["discover"]["non_2xx"]:
            raise RuntimeError(f"gc {key}: discover failed: {loads['discover']}")
        registrations = registered()[0]
    finally:
        code = stop_process(process)
    if code != 0:
        raise RuntimeError(f"gc {key}: the child exited with {code}: {log_tail(log_path)}")
    with open(json_out, encoding="utf-8") as f:
        child = json.load(f)
    if child["registrations"] != registrations:
        raise RuntimeError(f"gc {key}: {child['registrations']} != {registrations} registered")
    result: dict[str, Any] = {
        "freeze_gc": child["freeze_gc"],
        "frozen_objects": child.get("freeze_count_after_start", 0),
        "registrations": child["registrations"],
        "thresholds": child["thresholds"],
        **_summarise(child, phases),
        "phase_s": {name: high - low for name, (low, high) in phases.items()},
        "load": {
            name: {k: load.get(k) for k in ("generator", "connections", "requests", "rps")}
            for name, load in loads.items()
        },
    }
    return result


def measure_gc(
    workspace: Workspace,
    modules: int,
    discover_s: float,
    use_wrk: bool,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Both children (frozen as the daemon runs, then not frozen), loaded alike."""
    result: dict[str, Any] = {
        "modules": modules,
        "apis_per_module": 2,
        "target_ms": TARGET_MS,
        "discover_s": discover_s,
        "discover_connections": DISCOVER_CONNECTIONS,
        "publish_connections": PUBLISH_CONNECTIONS,
        "discover_generator": "wrk" if use_wrk else "python",
    }
    for key in MODES:
        result[key] = _measure_one(workspace, key, modules, discover_s, use_wrk, progress)
    return result


if __name__ == "__main__":
    main()

"""
Memory: the daemon's resident set size (C{VmRSS} of C{/proc/PID/status})
idle, and after 1 000, 10 000 and 100 000 published modules of two APIs
each, for a fresh daemon per transport.  Modules are published as fast as
the Python load generator can (16 connections over the transport measured),
each with a new module ID; the increment per 1 000 modules is the slope
between the last two levels (between idle and the only level in quick mode).

The yardstick for the idle figure is a bare Twisted+Klein process: C{twistd
-n web --class=bench.bare_klein.resource} (the start-up section's yardstick,
L{bench.startup.bare_klein_argv}) listening on TCP and a unix socket as the
daemon does, asked for its health once over the transport measured, then
left to settle as long as the daemon; the target is the daemon's idle RSS
within 10% of it (ratio <= L{IDLE_TARGET}).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from bench.daemon import Workspace, read_status_kib, start_daemon, stop_process
from bench.probe import Target, request, wait_until_healthy
from bench.startup import bare_klein_argv, free_port
from bench.workload import HEALTH_PATH, PUBLISH_PATH, publish_template

__all__ = ["IDLE_TARGET", "LEVELS", "bare_klein_idle_kib", "measure_memory"]

LEVELS = (1_000, 10_000, 100_000)
CONNECTIONS = 16
SETTLE = 0.5
#: The target: the daemon's idle RSS at most this times the bare Klein process's.
IDLE_TARGET = 1.10
START_TIMEOUT = 30.0


def _registered(answer_body: bytes) -> tuple[int, int]:
    health = json.loads(answer_body)
    return int(health["registeredModules"]), int(health["totalAPIs"])


def bare_klein_idle_kib(workspace: Workspace, transport: str) -> int:
    """
    The idle VmRSS of a fresh bare Twisted+Klein process (L{bench.bare_klein}
    under C{twistd -n web}) listening on TCP and a unix socket, after one
    health answer over C{transport} and L{SETTLE} seconds.
    """
    port = free_port()
    path = workspace.new_path("klein-") + ".sock"
    argv = bare_klein_argv(f"tcp:{port}:interface=127.0.0.1", f"unix:{path}")
    log_path = workspace.new_path("bare-klein-log")
    process = workspace.spawn(argv, log_path, bench_importable=True)
    try:
        target = Target.tcp(port) if transport == "tcp" else Target.unix(path)

        def alive() -> None:
            if process.poll() is not None:
                raise RuntimeError(f"the bare Klein twistd web exited with {process.returncode}")

        wait_until_healthy(target, time.monotonic() + START_TIMEOUT, check=alive)
        time.sleep(SETTLE)
        alive()
        return read_status_kib(process.pid, "VmRSS")
    finally:
        stop_process(process)


def measure_memory(
    workspace: Workspace, transport: str, levels: Sequence[int] = LEVELS
) -> dict[str, Any]:
    """
    RSS of a fresh daemon idle and at each level of published modules, over
    C{transport}, and the idle RSS of a bare Twisted+Klein process to compare.
    """
    bare = bare_klein_idle_kib(workspace, transport)
    server = start_daemon(workspace, f"memory-{transport}", [f"--max-modules={max(levels) * 2}"])
    try:
        target = server.target(transport)
        answer = request(target, "GET", HEALTH_PATH)
        if answer.status != 200:
            raise RuntimeError(f"health answered {answer.status}")
        time.sleep(SETTLE)
        idle = server.rss_kib()
        result: dict[str, Any] = {
            "transport": transport,
            "generator": "python",
            "idle_kib": idle,
            "bare_klein_idle_kib": bare,
            "idle_ratio_to_bare_klein": idle / bare,
            "idle_target": IDLE_TARGET,
            "after_kib": {},
            "peak_kib": {},
            "publish_rps": {},
        }
        published = 0
        for level in levels:
            count = level - published
            out = workspace.run_python(
                "bench.loadgen",
                [
                    *target.loadgen_args(),
                    "--method=POST",
                    f"--path={PUBLISH_PATH}",
                    f"--body={publish_template()}",
                    "--id-prefix=mem-",
                    f"--start-index={published}",
                    f"--connections={CONNECTIONS}",
                    f"--count={count}",
                    f"--timeout={60 + count / 100:.0f}",
                ],
                timeout=120 + count / 100,
            )
            load = json.loads(out)
            if load["error_count"] or load["non_2xx"]:
                raise RuntimeError(f"publishing {count} modules failed: {load}")
            published = level
            modules, apis = _registered(request(target, "GET", HEALTH_PATH).body)
            if (modules, apis) != (level, 2 * level):
                raise RuntimeError(f"expected {level} modules, the daemon holds {modules}")
            time.sleep(SETTLE)
            server.check_alive()
            result["after_kib"][str(level)] = server.rss_kib()
            result["peak_kib"][str(level)] = read_status_kib(server.pid, "VmHWM")
            result["publish_rps"][str(level)] = load["rps"]
        after = result["after_kib"]
        if len(levels) >= 2:
            low, high = levels[-2], levels[-1]
            slope = (after[str(high)] - after[str(low)]) / ((high - low) / 1000)
            result["per_1000_basis"] = f"{low}->{high}"
        else:
            slope = (after[str(levels[0])] - idle) / (levels[0] / 1000)
            result["per_1000_basis"] = f"0->{levels[0]}"
        result["per_1000_kib"] = slope
        return result
    finally:
        server.stop()

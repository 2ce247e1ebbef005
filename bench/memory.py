"""
Memory: the daemon's resident set size (C{VmRSS} of C{/proc/PID/status})
idle, and after 1 000, 10 000 and 100 000 published modules of two APIs
each, for a fresh daemon per transport.  Modules are published as fast as
the Python load generator can (16 connections over the transport measured),
each with a new module ID; the increment per 1 000 modules is the slope
between the last two levels (between idle and the only level in quick mode).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from bench.daemon import Workspace, read_status_kib, start_daemon
from bench.probe import request
from bench.workload import HEALTH_PATH, PUBLISH_PATH, publish_template

__all__ = ["LEVELS", "measure_memory"]

LEVELS = (1_000, 10_000, 100_000)
CONNECTIONS = 16
SETTLE = 0.5


def _registered(answer_body: bytes) -> tuple[int, int]:
    health = json.loads(answer_body)
    return int(health["registeredModules"]), int(health["totalAPIs"])


def measure_memory(
    workspace: Workspace, transport: str, levels: Sequence[int] = LEVELS
) -> dict[str, Any]:
    """RSS of a fresh daemon idle and at each level of published modules, over C{transport}."""
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

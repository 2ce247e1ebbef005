"""
Load over TCP with C{wrk} and the Lua scripts in C{bench/wrk/}: C{static.lua}
repeats one request (wrk's fast path), C{unique.lua} publishes a new module
ID with every request; both print their figures from wrk's C{done()} hook as
one JSON line (C{report.lua}).  wrk speaks TCP only: unix socket figures come
from L{bench.loadgen}.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from typing import Any

__all__ = ["available", "run_wrk"]

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrk")
MARKER = "BENCH-JSON "


def available() -> str | None:
    """The path of C{wrk}, or None when it is not installed."""
    return shutil.which("wrk")


def run_wrk(
    url: str,
    connections: int,
    duration: float,
    method: str = "GET",
    body: str | None = None,
    unique_prefix: str | None = None,
    timeout_s: int = 5,
) -> dict[str, Any]:
    """
    Run wrk against C{url} (one thread) for C{duration} seconds, rounded up to
    whole seconds (wrk's unit), and return figures shaped like
    L{bench.loadgen}'s.

    With C{unique_prefix}, C{body} is a template whose C{{ID}} becomes a new
    module ID per request.
    """
    wrk = available()
    if wrk is None:
        raise FileNotFoundError("wrk is not installed")
    seconds = max(1, math.ceil(duration))
    argv = [
        wrk,
        "--threads=1",
        f"--connections={connections}",
        f"--duration={seconds}s",
        f"--timeout={timeout_s}s",
    ]
    if unique_prefix is not None:
        if body is None:
            raise ValueError("a unique publish needs a body template")
        argv += ["--script", os.path.join(SCRIPTS, "unique.lua"), url, "--", unique_prefix, body]
    else:
        argv += ["--script", os.path.join(SCRIPTS, "static.lua"), url, "--", method]
        if body is not None:
            argv.append(body)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + 30, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"wrk did not finish within {seconds + 30}s") from e
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr}")
    raw = json.loads(lines[-1][len(MARKER) :])
    window = raw["duration_us"] / 1e6
    errors = raw["errors"]
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    return {
        "generator": "wrk",
        "connections": connections,
        "requests": raw["requests"],
        "window_s": window,
        "rps": raw["requests"] / window if window > 0 else 0.0,
        "p50_ms": raw["p50_us"] / 1000.0,
        "p90_ms": raw["p90_us"] / 1000.0,
        "p99_ms": raw["p99_us"] / 1000.0,
        "max_ms": raw["max_us"] / 1000.0,
        "non_2xx": errors["status"],
        "error_count": socket_errors,
        "errors": [f"{k}: {v}" for k, v in errors.items() if v and k != "status"],
        "wrk_errors": errors,
    }

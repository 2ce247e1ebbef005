"""
Start-up time: from just before exec to the first 200 answer to
C{GET /api/v1/health}, polled every 2 ms, for C{hsu-registry},
C{twistd -n hsu-registry} and, as the yardstick, C{twistd -n web} serving
the bare Klein resource of L{bench.bare_klein}; over TCP and over a unix
socket.  The commands take turns, so that noise on the machine spreads over
all of them; the median of each is reported with its ratio to the bare
Klein server on the same transport (the target is 1.2 at most).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.daemon import Workspace, stop_process, venv_command
from bench.probe import Target, wait_until_healthy
from bench.stats import median

__all__ = ["BARE_KLEIN", "COMMANDS", "bare_klein_argv", "free_port", "measure_startup"]

BARE_KLEIN = "twistd -n web (bare Klein)"
COMMANDS = ("hsu-registry", "twistd -n hsu-registry", BARE_KLEIN)
TRANSPORTS = ("tcp", "unix")
START_TIMEOUT = 30.0


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class _Command:
    label: str
    argv: Callable[[str], list[str]]
    bench_importable: bool = False


def _commands() -> list[_Command]:
    registry = venv_command("hsu-registry")
    twistd = venv_command("twistd")
    return [
        _Command(COMMANDS[0], lambda endpoint: [registry, f"--endpoint={endpoint}"]),
        _Command(
            COMMANDS[1],
            lambda endpoint: [twistd, "-n", "--pidfile=", "hsu-registry", f"--endpoint={endpoint}"],
        ),
        _Command(BARE_KLEIN, lambda endpoint: bare_klein_argv(endpoint), bench_importable=True),
    ]


def bare_klein_argv(*endpoints: str) -> list[str]:
    """
    The argv of C{twistd -n web} serving L{bench.bare_klein} on C{endpoints}
    (strports); it must run with the bench package importable
    (C{Workspace.spawn(..., bench_importable=True)}).
    """
    return [
        venv_command("twistd"),
        "-n",
        "--pidfile=",
        "web",
        *(f"--listen={endpoint}" for endpoint in endpoints),
        "--class=bench.bare_klein.resource",
    ]


def _start_once(workspace: Workspace, command: _Command, transport: str) -> float:
    """One start: seconds from exec to the first healthy answer."""
    if transport == "tcp":
        port = free_port()
        endpoint, target = f"tcp:{port}:interface=127.0.0.1", Target.tcp(port)
    else:
        path = workspace.new_path("st") + ".sock"
        endpoint, target = f"unix:{path}", Target.unix(path)
    argv = command.argv(endpoint)
    started = time.perf_counter()
    process = workspace.spawn(argv, bench_importable=command.bench_importable)
    try:

        def alive() -> None:
            if process.poll() is not None:
                raise RuntimeError(f"{command.label} exited with {process.returncode}")

        answered = wait_until_healthy(target, time.monotonic() + START_TIMEOUT, check=alive)
        return answered - started
    finally:
        stop_process(process)
        if transport == "unix":
            for leftover in (target.path, target.path + ".lock"):
                if os.path.lexists(leftover):
                    os.remove(leftover)


def measure_startup(workspace: Workspace, starts: int, warmup: bool = True) -> dict[str, Any]:
    """
    C{starts} start-ups of each command over each transport (after one
    uncounted start of each when C{warmup}, so caches are equally warm).

    @return: C{{command: {transport: {"median_ms", "samples_ms", "ratio_to_bare_klein"}}}}
    """
    commands = _commands()
    samples: dict[str, dict[str, list[float]]] = {
        c.label: {t: [] for t in TRANSPORTS} for c in commands
    }
    if warmup:
        for command in commands:
            for transport in TRANSPORTS:
                _start_once(workspace, command, transport)
    for _ in range(starts):
        for transport in TRANSPORTS:
            for command in commands:
                samples[command.label][transport].append(_start_once(workspace, command, transport))
    result: dict[str, Any] = {}
    for command in commands:
        result[command.label] = {}
        for transport in TRANSPORTS:
            values = samples[command.label][transport]
            result[command.label][transport] = {
                "median_ms": median(values) * 1000.0,
                "samples_ms": [v * 1000.0 for v in values],
            }
    for command in commands:
        for transport in TRANSPORTS:
            bare = result[BARE_KLEIN][transport]["median_ms"]
            cell = result[command.label][transport]
            cell["ratio_to_bare_klein"] = cell["median_ms"] / bare
    return result

"""
Throughput and latency: discover, publish and health against the daemon,
and discover against the bare twisted.web reference, over TCP and the unix
socket, at concurrency 1 and 64, with persistent connections.

Every measured run follows its own warm-up.  Runs take turns (run 1 of every
cell, then run 2, ...), so noise on the shared machine spreads over all the
cells, and each figure is the median of its runs.  TCP is loaded by wrk
where installed, the unix socket (and TCP with C{--no-wrk}) by the Python
load generator; each figure names its generator and is divided by the
reference's discover throughput measured with the same generator,
transport and concurrency.

Operations:

- C{discover}: C{GET /api/v1/discover/echo} (a module of two APIs);
- C{publish}: C{POST /api/v1/publish} republishing that one module again and
  again (the steady state of heartbeats: no growth);
- C{publish_new}: C{POST /api/v1/publish} with a new module ID per request (the
  registry grows), against a second daemon so that growth does not touch
  the other figures;
- C{health}: C{GET /api/v1/health}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import wrk
from bench.daemon import Server, Workspace
from bench.stats import median
from bench.workload import (
    DISCOVER_MODULE,
    HEALTH_PATH,
    PUBLISH_PATH,
    discover_path,
    publish_body,
    publish_template,
)

__all__ = [
    "CONCURRENCY",
    "FIGURES",
    "OPERATIONS",
    "TRANSPORTS",
    "Settings",
    "measure_throughput",
    "request_for",
    "summarise",
]

OPERATIONS = ("discover", "publish", "publish_new", "health")
TRANSPORTS = ("tcp", "unix")
CONCURRENCY = (1, 64)
FIGURES = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure, and with what."""

    runs: int
    duration: float
    warmup: float
    use_wrk: bool


@dataclass(frozen=True)
class _Cell:
    """One thing to measure: an operation on a server over a transport at a concurrency."""

    server: Server
    operation: str  # "reference" for the reference's discover
    transport: str
    connections: int
    generator: str

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.operation, self.transport, self.connections)


def request_for(operation: str) -> tuple[str, str, str | None, bool]:
    """Method, path, body (template) and whether IDs are unique, for C{operation}."""
    if operation in ("discover", "reference"):
        return "GET", discover_path(DISCOVER_MODULE), None, False
    if operation == "publish":
        return "POST", PUBLISH_PATH, publish_body(DISCOVER_MODULE).decode("ascii"), False
    if operation == "publish_new":
        return "POST", PUBLISH_PATH, publish_template(), True
    if operation == "health":
        return "GET", HEALTH_PATH, None, False
    raise ValueError(operation)


def run_loadgen(
    workspace: Workspace,
    target: Any,
    method: str,
    path: str,
    body: str | None,
    connections: int,
    settings: Settings,
    prefix: str,
) -> dict[str, Any]:
    """One warm-up and measured run of the Python generator (C{bench.loadgen}) on C{target}."""
    args = [
        *target.loadgen_args(),
        f"--method={method}",
        f"--path={path}",
        f"--connections={connections}",
        f"--warmup={settings.warmup}",
        f"--duration={settings.duration}",
        f"--id-prefix={prefix}",
        "--timeout=30",
    ]
    if body is not None:
        args.append(f"--body={body}")
    out = workspace.run_python(
        "bench.loadgen", args, timeout=settings.warmup + settings.duration + 60
    )
    result: dict[str, Any] = json.loads(out)
    return result


def _run_python(
    workspace: Workspace, cell: _Cell, settings: Settings, prefix: str
) -> dict[str, Any]:
    method, path, body, _ = request_for(cell.operation)
    target = cell.server.target(cell.transport)
    return run_loadgen(workspace, target, method, path, body, cell.connections, settings, prefix)


def _run_wrk(cell: _Cell, settings: Settings, prefix: str) -> dict[str, Any]:
    method, path, body, unique = request_for(cell.operation)
    url = cell.server.target("tcp").url(path)

    def once(duration: float, run_prefix: str) -> dict[str, Any]:
        return wrk.run_wrk(
            url,
            cell.connections,
            duration,
            method=method,
            body=body,
            unique_prefix=run_prefix if unique else None,
        )

    once(settings.warmup, "w" + prefix)
    return once(settings.duration, prefix)


def _cells(daemon: Server, growth: Server, reference: Server, settings: Settings) -> list[_Cell]:
    cells = []
    for transport in TRANSPORTS:
        generator = "wrk" if transport == "tcp" and settings.use_wrk else "python"
        for connections in CONCURRENCY:
            cells.append(_Cell(reference, "reference", transport, connections, generator))
            for operation in OPERATIONS:
                server = growth if operation == "publish_new" else daemon
                cells.append(_Cell(server, operation, transport, connections, generator))
    return cells


def summarise(runs: list[dict[str, Any]], generator: str) -> dict[str, Any]:
    """The median of each figure over C{runs}, with their request and error counts."""
    out: dict[str, Any] = {"generator": generator}
    for figure in FIGURES:
        values = [r[figure] for r in runs if figure in r]
        out[figure] = median(values) if values else 0.0
    out["requests"] = sum(int(r["requests"]) for r in runs)
    out["non_2xx"] = sum(int(r.get("non_2xx", 0)) for r in runs)
    out["error_count"] = sum(int(r.get("error_count", 0)) for r in runs)
    out["runs"] = [{k: r[k] for k in (*FIGURES, "requests") if k in r} for r in runs]
    return out


def measure_throughput(
    workspace: Workspace,
    daemon: Server,
    growth: Server,
    reference: Server,
    settings: Settings,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    Measure every cell C{settings.runs} times.

    @return: C{(throughput, reference)}: C{throughput[operation][transport][str(connections)]}
        and C{reference[transport][str(connections)]}, each a summary with
        C{generator}, C{rps}, C{p50_ms}, C{p90_ms}, C{p99_ms}, C{max_ms}, the
        runs, error counts and (for the daemon's) C{reference_rps} and C{ratio}.
    """
    cells = _cells(daemon, growth, reference, settings)
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = {c.key: [] for c in cells}
    for run in range(settings.runs):
        for cell in cells:
            for server in (daemon, growth, reference):
                server.check_alive()
            prefix = f"n{cell.transport}{cell.connections}r{run}-"
            if cell.generator == "wrk":
                figures = _run_wrk(cell, settings, prefix)
            else:
                figures = _run_python(workspace, cell, settings, prefix)
            results[cell.key].append(figures)
            progress(
                f"  run {run + 1}/{settings.runs} {cell.operation:<11} {cell.transport:<4} "
                f"c={cell.connections:<2} {cell.generator:<6} {figures['rps']:9.0f} req/s"
                + (
                    f"  ({figures['non_2xx']} non-2xx, {figures['error_count']} errors)"
                    if figures.get("non_2xx") or figures.get("error_count")
                    else ""
                )
            )
    reference_out: dict[str, Any] = {t: {} for t in TRANSPORTS}
    throughput: dict[str, Any] = {op: {t: {} for t in TRANSPORTS} for op in OPERATIONS}
    for cell in cells:
        summary = summarise(results[cell.key], cell.generator)
        if cell.operation == "reference":
            reference_out[cell.transport][str(cell.connections)] = summary
    for cell in cells:
        if cell.operation == "reference":
            continue
        summary = summarise(results[cell.key], cell.generator)
        ref = reference_out[cell.transport][str(cell.connections)]
        summary["reference_rps"] = ref["rps"]
        summary["ratio"] = summary["rps"] / ref["rps"] if ref["rps"] else 0.0
        throughput[cell.operation][cell.transport][str(cell.connections)] = summary
    return throughput, reference_out

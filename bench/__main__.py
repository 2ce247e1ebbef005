"""
The benchmark: ``python -m bench [--quick] [--runs N] [--duration S]
[--json PATH] [--no-wrk]``.

It starts the installed daemon (and a bare twisted.web reference) as
subprocesses, loads them, stops them, prints a table and writes JSON (by
default ``bench/results/latest.json``): throughput and latency, publish on the
memory and the SQLite store (closed loop, and 64 publishers at a fixed rate),
memory, start-up, cleanup lag, garbage-collector pauses, watch fan-out,
process liveness, active health checks and abuse (one flooding identity, and
what identifying callers costs) (see each module of this package).
Progress goes to stderr, the table to stdout.
``--quick`` (about 90 s) keeps the harness working: tiny runs with the
Python generator only; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from bench import abuse, checks, fanout, liveness, wrk
from bench.daemon import BENCH_DIR, Server, Workspace, start_daemon, start_reference
from bench.gcpause import measure_gc
from bench.memory import LEVELS, measure_memory
from bench.probe import request
from bench.report import render
from bench.section import on_sigterm, progress, write_json
from bench.startup import measure_startup
from bench.store import PACED_RATES, PacedSettings, measure_store
from bench.throughput import Settings, measure_throughput
from bench.workload import DISCOVER_MODULE, PUBLISH_PATH, discover_path, publish_body

__all__ = ["main"]

SECTIONS = (
    "throughput",
    "store",
    "memory",
    "startup",
    "cleanup",
    "gc",
    "fanout",
    "liveness",
    "checks",
    "abuse",
)
DEFAULT_JSON = os.path.join(BENCH_DIR, "results", "latest.json")
#: The store section's paced part in a quick run: one total rate (req/s).
QUICK_PACED_RATE = 200.0
#: The sections run as subprocesses; each bounds itself (its C{TIMEOUT_S},
#: with --quick and without) and is killed this margin later, s.
SUBPROCESS_SECTIONS = {"fanout": fanout, "liveness": liveness, "checks": checks, "abuse": abuse}
SECTION_MARGIN_S = {True: 30.0, False: 60.0}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny runs, Python generator only, about 2 s of load for the store section, "
        "1 000 modules, 10 000 registrations, 2 starts, 2 000 modules for the gc section, "
        "50 watchers and 50 blocking queries for the fanout section, "
        "5 kills and 1 000 bound modules for the liveness section, "
        "200 checked modules and 3 s windows for the checks section, "
        "1 round of 0.5 s windows and 8 flooding connections for the abuse section",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default 3)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per measured run (default 4)"
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds of warm-up per run (default 1)"
    )
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--no-wrk", action="store_true", help="use the Python generator for TCP")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated sections to run (default: all): " + ", ".join(SECTIONS),
    )
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _prepare(workspace: Workspace, daemon: Server) -> tuple[bytes, str]:
    """Publish the discovered module and return its discover body and content type."""
    target = daemon.target("tcp")
    answer = request(target, "POST", PUBLISH_PATH, publish_body(DISCOVER_MODULE))
    if answer.status != 200:
        raise RuntimeError(f"publish answered {answer.status}: {answer.body!r}")
    answer = request(target, "GET", discover_path(DISCOVER_MODULE))
    if answer.status != 200 or answer.content_type is None:
        raise RuntimeError(f"discover answered {answer.status}: {answer.body!r}")
    return answer.body, answer.content_type


def _check_reference(reference: Server, body: bytes, content_type: str) -> None:
    for transport in ("tcp", "unix"):
        answer = request(reference.target(transport), "GET", discover_path(DISCOVER_MODULE))
        if (answer.status, answer.body, answer.content_type) != (200, body, content_type):
            raise RuntimeError(f"the reference's discover answer differs: {answer}")


def _wrk_version(path: str) -> str:
    try:
        done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "wrk"
    first = (done.stdout or done.stderr).splitlines()
    return first[0].split(" [")[0] if first else "wrk"


def _meta(args: argparse.Namespace, settings: Settings, starts: int, wrk_path: str | None) -> dict:
    import platform

    import twisted

    return {
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "quick": args.quick,
        "runs": settings.runs,
        "duration": settings.duration,
        "warmup": settings.warmup,
        "starts": starts,
        "sections": args.sections,
        "tcp_generator": _wrk_version(wrk_path) if settings.use_wrk and wrk_path else "python",
        "unix_generator": "python",
        "wrk": wrk_path,
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "cpus": os.cpu_count(),
        "loadavg_before": list(os.getloadavg()),
        "notes": [],
    }


def _subprocess_section(
    workspace: Workspace, name: str, quick: bool, timeout: float
) -> dict[str, Any]:
    """
    C{python -m bench.NAME} in a subprocess: what a section changes in its
    process (open-file limit, gc.disable(), forked module processes, target
    listeners) stays there; its JSON is its result.
    """
    progress(f"{name}: python -m bench.{name}{' --quick' if quick else ''}")
    path = workspace.new_path(name) + ".json"
    workspace.run_python(
        f"bench.{name}",
        [*(["--quick"] if quick else []), f"--json={path}"],
        timeout=timeout,
    )
    with open(path, encoding="utf-8") as f:
        result: dict[str, Any] = json.load(f)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen sections and return every result."""
    wrk_path = wrk.available()
    quick = args.quick
    settings = Settings(
        runs=args.runs if args.runs is not None else (1 if quick else 3),
        duration=args.duration if args.duration is not None else (0.25 if quick else 4.0),
        warmup=args.warmup if args.warmup is not None else (0.1 if quick else 1.0),
        use_wrk=wrk_path is not None and not args.no_wrk and not quick,
    )
    starts = 2 if quick else 10
    levels = (1_000,) if quick else LEVELS
    registrations = 10_000 if quick else 100_000
    gc_modules = 2_000 if quick else 100_000
    gc_discover_s = 1.0 if quick else 5.0
    began = time.monotonic()
    results: dict[str, Any] = {"meta": _meta(args, settings, starts, wrk_path)}
    notes: list[str] = results["meta"]["notes"]
    if wrk_path is None and not args.no_wrk:
        notes.append("wrk is not installed: TCP figures come from the Python generator")
    notes.append("unix socket figures always come from the Python generator (wrk is TCP only)")

    with Workspace() as workspace:
        location, version, digest = workspace.installed_package()
        results["meta"]["hsu_registry"] = location
        results["meta"]["hsu_registry_version"] = version
        results["meta"]["hsu_registry_digest"] = digest
        if "throughput" in args.sections:
            progress("throughput: starting the daemons and the reference")
            daemon = start_daemon(workspace, "daemon")
            growth = start_daemon(workspace, "growth", ["--max-modules=100000000"])
            reference = None
            try:
                body, content_type = _prepare(workspace, daemon)
                bodies = workspace.new_path("bodies") + ".json"
                with open(bodies, "w", encoding="utf-8") as f:
                    json.dump({DISCOVER_MODULE: body.decode("utf-8")}, f)
                reference = start_reference(workspace, bodies)
                _check_reference(reference, body, content_type)
                throughput, reference_figures = measure_throughput(
                    workspace, daemon, growth, reference, settings, progress
                )
                results["throughput"] = throughput
                results["reference"] = reference_figures
                results["meta"]["daemon_rss_after_throughput_kib"] = daemon.rss_kib()
                growth_health = json.loads(
                    request(growth.target("tcp"), "GET", "/api/v1/health").body
                )
                results["meta"]["publish_new_modules_registered"] = growth_health[
                    "registeredModules"
                ]
            finally:
                for server in (daemon, growth, reference):
                    if server is not None:
                        server.stop()
        if "store" in args.sections:
            store_settings = settings
            if quick:
                # 2 stores x 2 operations x 2 concurrencies: about 1 s of load.
                store_settings = dataclasses.replace(
                    settings,
                    duration=args.duration if args.duration is not None else 0.1,
                    warmup=args.warmup if args.warmup is not None else 0.025,
                )
            # 64 publishers at a fixed rate: the section's warm-up and runs,
            # one rate of 0.5 s in a quick run.
            paced = PacedSettings(
                rates=(QUICK_PACED_RATE,) if quick else PACED_RATES,
                duration=0.5 if quick and args.duration is None else settings.duration,
                warmup=settings.warmup,
            )
            progress("store: publish with the memory store and with the SQLite store")
            results["store"] = measure_store(workspace, store_settings, progress, paced)
            if store_settings.use_wrk:
                results["store"]["generator_version"] = results["meta"]["tcp_generator"]
            if results["store"]["sync_counter"] is None:
                notes.append(
                    "store: fdatasyncs not counted ("
                    + results["store"]["sync_counter_unavailable"]
                    + ")"
                )
        if "memory" in args.sections:
            results["memory"] = {}
            for transport in ("tcp", "unix"):
                progress(f"memory over {transport}: publishing up to {levels[-1]} modules")
                results["memory"][transport] = measure_memory(workspace, transport, levels)
        if "startup" in args.sections:
            progress(f"start-up: {starts} starts of each command over each transport")
            results["startup"] = measure_startup(workspace, starts, warmup=not quick)
        if "cleanup" in args.sections:
            progress(f"cleanup: {registrations} registrations, half of them expiring")
            out = workspace.run_python(
                "bench.cleanup",
                [
                    f"--registrations={registrations}",
                    f"--log={workspace.new_path('cleanup')}.log",
                ],
                timeout=300,
            )
            results["cleanup"] = json.loads(out)
        if "gc" in args.sections:
            progress(f"gc: pauses of the collector at {gc_modules} registrations")
            results["gc"] = measure_gc(
                workspace, gc_modules, gc_discover_s, settings.use_wrk, progress
            )
        for name, module in SUBPROCESS_SECTIONS.items():
            if name in args.sections:
                timeout = module.TIMEOUT_S[quick] + SECTION_MARGIN_S[quick]
                results[name] = _subprocess_section(workspace, name, quick, timeout)
                notes.extend(f"{name}: {note}" for note in results[name].get("notes", []))
    results["meta"]["elapsed_s"] = time.monotonic() - began
    results["meta"]["loadavg_after"] = list(os.getloadavg())
    return results


def _render(results: dict[str, Any]) -> str:
    """
    L{bench.report.render}, with the sections it does not render itself
    (abuse, by its own module) after the others and before the run's notes.
    """
    table = render(results)
    if "abuse" not in results:
        return table
    lines = table.rstrip("\n").split("\n")
    at = next((n for n, line in enumerate(lines) if line.startswith("note: ")), len(lines))
    head, notes = lines[:at], lines[at:]
    while head and not head[-1]:
        head.pop()
    section = abuse.render(results["abuse"], notes=False).split("\n")
    return "\n".join([*head, "", *section, *(["", *notes] if notes else [])]) + "\n"


def main(argv: list[str] | None = None) -> None:
    """The command line."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    results = run(args)
    table = _render(results)
    results["table"] = table
    write_json(results, args.json)
    sys.stdout.write(table)
    progress(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()

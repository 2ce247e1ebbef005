"""The results as a text table and as JSON."""

from __future__ import annotations

from typing import Any

from bench import checks, fanout, liveness
from bench.memory import IDLE_TARGET, LEVELS

__all__ = ["render"]

STARTUP_TARGET = 1.2


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def _throughput(results: dict[str, Any]) -> list[str]:
    meta = results["meta"]
    lines = [
        f"Throughput and latency: median of {meta['runs']} runs of {meta['duration']:g} s, "
        f"each after a {meta['warmup']:g} s warm-up; persistent connections.",
        "ratio = req/s / the reference's discover req/s with the same generator, transport "
        "and concurrency.",
        f"{'operation':<12} {'transport':<9} {'conc':>4} {'gen':<6} {'req/s':>8} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'ref req/s':>9} {'ratio':>6}",
    ]
    reference = results["reference"]
    for transport, by_conc in reference.items():
        for conc, cell in by_conc.items():
            lines.append(
                f"{'reference':<12} {transport:<9} {conc:>4} {cell['generator']:<6} "
                f"{cell['rps']:8.0f} {cell['p50_ms']:8.3f} {cell['p90_ms']:8.3f} "
                f"{cell['p99_ms']:8.3f} {'':>9} {1.0:6.2f}"
            )
    for operation, by_transport in results["throughput"].items():
        for transport, by_conc in by_transport.items():
            for conc, cell in by_conc.items():
                flag = ""
                if cell["non_2xx"] or cell["error_count"]:
                    flag = f"  !{cell['non_2xx']} non-2xx, {cell['error_count']} errors"
                lines.append(
                    f"{operation:<12} {transport:<9} {conc:>4} {cell['generator']:<6} "
                    f"{cell['rps']:8.0f} {cell['p50_ms']:8.3f} {cell['p90_ms']:8.3f} "
                    f"{cell['p99_ms']:8.3f} {cell['reference_rps']:9.0f} {cell['ratio']:6.2f}"
                    f"{flag}"
                )
    lines.append(
        "publish = the same module republished (steady state); publish_new = a new module "
        "per request (the registry grows; a second daemon)."
    )
    return lines


def _memory(results: dict[str, Any]) -> list[str]:
    memory = results["memory"]
    levels = [str(level) for level in LEVELS]
    lines = [
        "Memory: VmRSS in MiB of a fresh daemon, idle and after N published modules of 2 APIs "
        "each (published by the python generator over the transport).",
        "Klein = idle VmRSS of a bare Twisted+Klein process (twistd -n web "
        "--class=bench.bare_klein.resource, the same endpoints); "
        f"ratio = idle / Klein (target <= {IDLE_TARGET:.2f}).",
        f"{'transport':<9} {'idle':>7} {'Klein':>7} {'ratio':>6}      "
        + " ".join(f"{int(level):>8}" for level in levels)
        + f" {'per 1000':>9}  basis",
    ]
    for transport, cell in memory.items():
        after = cell["after_kib"]
        ratio = cell["idle_ratio_to_bare_klein"]
        verdict = "ok" if ratio <= IDLE_TARGET else "OVER"
        lines.append(
            f"{transport:<9} {_mib(cell['idle_kib']):>7} {_mib(cell['bare_klein_idle_kib']):>7} "
            f"{ratio:6.2f} {verdict:<4} "
            + " ".join(f"{_mib(after[level]) if level in after else '-':>8}" for level in levels)
            + f" {_mib(cell['per_1000_kib']):>9}  {cell['per_1000_basis']}"
        )
    return lines


def _store(results: dict[str, Any]) -> list[str]:
    st = results["store"]
    targets = st["targets"]
    generator = st.get("generator_version", st["generator"])
    lines = [
        "Store: publish with --store=memory and --store=sqlite:PATH (a new file in the run's "
        f"directory), over TCP, {generator}; median of {st['runs']} runs of "
        f"{st['duration']:g} s, each after a {st['warmup']:g} s warm-up; persistent connections.",
        "x mem = the SQLite figure / the memory store's in this run.  Targets: SQLite p99 < "
        f"{targets['p99_ms']:g} ms at concurrency {targets['p99_concurrency']}, SQLite req/s "
        f">= {targets['rps_ratio']:g} x the memory store's.",
        f"{'operation':<12} {'conc':>4} {'store':<6} {'gen':<6} {'req/s':>8} {'p50 ms':>8} "
        f"{'p90 ms':>8} {'p99 ms':>8}  {'req/s':>5} {'p50':>5} {'p90':>5} {'p99':>5}  "
        "verdict",
        f"{'':<12} {'':>4} {'':<6} {'':<6} {'':>8} {'':>8} {'':>8} {'':>8}  "
        f"{'x mem':>5} {'x mem':>5} {'x mem':>5} {'x mem':>5}",
    ]
    operations = list(st["memory"])
    for operation in operations:
        for conc in st["memory"][operation]:
            for store in ("memory", "sqlite"):
                cell = st[store][operation][conc]
                row = (
                    f"{operation:<12} {conc:>4} {store:<6} {cell['generator']:<6} "
                    f"{cell['rps']:8.0f} {cell['p50_ms']:8.3f} {cell['p90_ms']:8.3f} "
                    f"{cell['p99_ms']:8.3f}"
                )
                if store == "sqlite":
                    ratio = cell["ratio_to_memory"]
                    verdict = cell["verdict"]
                    parts = []
                    if verdict["p99_ok"] is not None:
                        parts.append("p99 " + ("ok" if verdict["p99_ok"] else "OVER"))
                    parts.append("req/s " + ("ok" if verdict["rps_ok"] else "UNDER"))
                    row += (
                        f"  {ratio['rps']:5.2f} {ratio['p50_ms']:5.2f} {ratio['p90_ms']:5.2f} "
                        f"{ratio['p99_ms']:5.2f}  " + ", ".join(parts)
                    )
                if cell["non_2xx"] or cell["error_count"]:
                    row += f"  !{cell['non_2xx']} non-2xx, {cell['error_count']} errors"
                lines.append(row.rstrip())
    lines.append(
        "publish = the same module republished (steady state); publish_new = a new module "
        "per request (the registry grows); one daemon per store and operation."
    )
    paced = st.get("paced")
    if paced is not None:
        lines.extend(_paced(paced))
    counted = st["sync_counter"] is not None
    lines.append(
        "SQLite commits: publishes acknowledged (2xx, warm-ups included) and the daemon's "
        + (
            "fdatasync calls counted by perf (kernel tracepoints); each commit syncs the WAL "
            "once, a checkpoint adds about 2."
            if counted
            else f"fdatasync calls: not counted ({st['sync_counter_unavailable']})."
        )
    )
    lines.append(
        f"{'operation':<12} {'conc':>4} {'acknowledged':>12} {'fdatasyncs':>10} {'per sync':>8}"
    )
    for operation in operations:
        for conc, cell in st["sqlite"][operation].items():
            syncs = cell["fdatasyncs"]
            per = cell["publishes_per_fdatasync"]
            lines.append(
                f"{operation:<12} {conc:>4} {cell['acknowledged']:>12} "
                f"{syncs if syncs is not None else '-':>10} "
                f"{format(per, '8.2f') if per is not None else '-':>8}"
            )
    if paced is not None:
        for rate, cell in paced["sqlite"].items():
            syncs = cell["fdatasyncs"]
            per = cell["publishes_per_fdatasync"]
            lines.append(
                f"{'paced ' + rate + '/s':<12} {paced['connections']:>4} "
                f"{cell['acknowledged']:>12} "
                f"{syncs if syncs is not None else '-':>10} "
                f"{format(per, '8.2f') if per is not None else '-':>8}"
            )
    for operation, f in st["sqlite_files"].items():
        what = (
            "1 module republished"
            if operation == "publish"
            else f"{f['acknowledged_modules']} new modules acknowledged"
        )
        slack = (
            f", up to {f['in_flight_bound']} more in flight when a generator stopped"
            if operation != "publish"
            else ""
        )
        lines.append(
            f"rows in the {operation} file after the run: {f['rows']} for {what}{slack}: "
            f"{'ok' if f['ok'] else 'MISMATCH'} ({_mib(f['bytes'] / 1024)} MiB)"
        )
    if paced is not None:
        f = paced["sqlite_file"]
        lines.append(
            f"rows in the paced file after the run: {f['rows']} for {f['modules']} modules "
            f"republished: {'ok' if f['ok'] else 'MISMATCH'} ({_mib(f['bytes'] / 1024)} MiB)"
        )
    bad = {name: code for name, code in st["exit_status"].items() if code != 0}
    if bad:
        lines.append(
            "daemons that did not exit 0 on SIGTERM: "
            + ", ".join(f"{name} ({code})" for name, code in bad.items())
        )
    return lines


def _paced(paced: dict[str, Any]) -> list[str]:
    """The store section's part "64 publishers at a fixed rate"."""
    n = paced["connections"]
    lines = [
        "",
        f"{n} publishers at a fixed rate (open loop; {paced['generator']} generator over "
        f"{paced['transport'].upper()}): {n} connections, each republishing its own module "
        f"({paced['modules']} modules of {paced['apis_per_module']} APIs),",
        "with a new metadata value on every publish (each one a change the store writes), on "
        "a fixed schedule, phases spread evenly; latency from the scheduled send time",
        f"(a late send counts); median of {paced['runs']} runs of {paced['duration']:g} s, each "
        f"after a {paced['warmup']:g} s warm-up.  Target: p99 < {paced['target_p99_ms']:g} ms.",
        f"{'rate/s':>6} {'store':<6} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'sent p99':>8} {'gen lag':>8}  {'rate kept':<9}  verdict",
    ]
    for rate in paced["memory"]:
        for store in ("memory", "sqlite"):
            cell = paced[store][rate]
            if cell["rate_kept"]:
                kept = "yes"
            else:
                kept = f"NO ({cell['behind_connections']} behind, {cell['unanswered']} unanswered)"
            row = (
                f"{rate:>6} {store:<6} {cell['rps']:8.0f} {cell['p50_ms']:8.3f} "
                f"{cell['p90_ms']:8.3f} {cell['p99_ms']:8.3f} {cell['max_ms']:8.3f} "
                f"{cell['from_send_p99_ms']:8.3f} {cell['timer_lag_p99_ms']:8.3f}  {kept:<9}  "
                "p99 " + ("ok" if cell["verdict"]["p99_ok"] else "OVER")
            )
            if cell["non_2xx"] or cell["error_count"]:
                row += f"  !{cell['non_2xx']} non-2xx, {cell['error_count']} errors"
            lines.append(row)
    lines.append(
        "rate kept = in every run, no connection more than "
        f"{paced['behind_limit_s']:g} s behind its schedule and every scheduled request "
        "answered; sent p99 = p99 from the actual send"
    )
    lines.append(
        "(what a closed-loop generator would report); gen lag = p99 of how late the "
        "generator's timer sent a request to an idle connection (its own share of the latency)."
    )
    return lines


def _startup(results: dict[str, Any]) -> list[str]:
    startup = results["startup"]
    meta = results["meta"]
    lines = [
        f"Start-up: exec to the first 200 from /api/v1/health, median of {meta['starts']} "
        f"(ms); ratio to the bare Klein twistd web (target <= {STARTUP_TARGET}).",
        f"{'command':<28} {'tcp ms':>7} {'ratio':>6}     {'unix ms':>7} {'ratio':>6}",
    ]
    for command, by_transport in startup.items():
        parts = []
        for transport in ("tcp", "unix"):
            cell = by_transport[transport]
            verdict = "ok" if cell["ratio_to_bare_klein"] <= STARTUP_TARGET else "OVER"
            parts.append(
                f"{cell['median_ms']:7.0f} {cell['ratio_to_bare_klein']:6.2f} {verdict:<4}"
            )
        lines.append((f"{command:<28} " + " ".join(parts)).rstrip())
    return lines


def _cleanup(results: dict[str, Any]) -> list[str]:
    c = results["cleanup"]
    return [
        "Cleanup: one CleanupService.run_once() in-process on a real reactor, 1 ms LoopingCall "
        "heartbeat; its log written to a file as the daemon's would be.",
        f"{'registrations':>13} {'expired':>8} {'pass ms':>9} {'max lag ms':>10} "
        f"{'baseline gap ms':>15} {'empty pass ms':>13}",
        f"{c['registrations']:>13} {c['expired']:>8} {c['pass_ms']:9.1f} {c['lag_ms']:10.1f} "
        f"{c['baseline_max_gap_ms']:15.1f} {c['empty_pass_ms']:13.2f}",
    ]


def _gc(results: dict[str, Any]) -> list[str]:
    g = results["gc"]
    target = g["target_ms"]
    lines = [
        "Garbage collector: every collection (gc.callbacks, wall-clock ms) in a daemon built as "
        "hsu-registry builds it, from its start to SIGTERM,",
        f"while {g['modules']} new modules of {g['apis_per_module']} APIs are published "
        f"({g['publish_connections']} connections), republished, then discovered for "
        f"{g['discover_s']:g} s at concurrency {g['discover_connections']} "
        f"({g['discover_generator']}); target: no pause over {target:g} ms.",
        f"{'daemon':<10} {'registered':>10} {'frozen objs':>11} "
        + " ".join(f"{'gen' + str(n) + ' n':>7} {'max ms':>7}" for n in range(3))
        + f" {'max ms':>7} {'cpu ms':>7} {'>' + format(target, 'g') + ' ms':>6}",
    ]
    for key, label in (("frozen", "frozen"), ("not_frozen", "not frozen")):
        if key not in g:
            continue
        cell = g[key]
        verdict = "ok" if cell["serving_max_ms"] <= target else "OVER"
        lines.append(
            f"{label:<10} {cell['registrations']:>10} {cell['frozen_objects']:>11} "
            + " ".join(
                f"{cell['collections'][str(n)]:>7} {cell['max_ms'][str(n)]:7.2f}" for n in range(3)
            )
            + f" {cell['serving_max_ms']:7.2f} {cell['serving_max_cpu_ms']:7.2f}"
            f" {cell['over_target']:>6}  {verdict}"
        )
    phases = ("start-up", "publish", "republish", "discover", "other")
    lines.append(
        f"{'by phase':<10} "
        + " ".join(f"{phase:>17}" for phase in phases)
        + "  (max ms, collections, full ones)"
    )
    for key, label in (("frozen", "frozen"), ("not_frozen", "not frozen")):
        if key not in g:
            continue
        by_phase = g[key]["by_phase"]
        lines.append(
            f"{label:<10} "
            + " ".join(
                format(
                    f"{by_phase[p]['max_ms']:.2f} {by_phase[p]['collections']} "
                    f"{by_phase[p]['full_collections']}",
                    ">17",
                )
                for p in phases
            )
        )
    for key, label in (("frozen", "frozen"), ("not_frozen", "not frozen")):
        longest = g.get(key, {}).get("longest")
        if longest:
            lines.append(
                f"longest while serving, {label}: gen{longest['generation']} "
                f"{longest['wall_ms']:.2f} ms ({longest['cpu_ms']:.2f} ms CPU) in "
                f"{longest['phase']}, {longest['after_start_s']:.1f} s after the start, "
                f"{longest['collected']} objects collected"
            )
    lines.append(
        "frozen = as the daemon runs (gc.freeze() once started); not frozen = freeze_gc off, for "
        "comparison; cpu ms = the longest in thread CPU time;"
    )
    lines.append(
        "start-up = imports and building the service, before it listens (not in the counts "
        "above, nor in the verdict); other = while serving, between the phases."
    )
    return lines


def _fanout(results: dict[str, Any]) -> list[str]:
    """bench.fanout's own table; its notes go with the run's (see L{bench.__main__})."""
    return fanout.render(results["fanout"], notes=False).splitlines()


def _liveness(results: dict[str, Any]) -> list[str]:
    """bench.liveness's own table; its notes go with the run's (see L{bench.__main__})."""
    return liveness.render(results["liveness"], notes=False).splitlines()


def _checks(results: dict[str, Any]) -> list[str]:
    """bench.checks's own table; its notes go with the run's (see L{bench.__main__})."""
    return checks.render(results["checks"], notes=False).splitlines()


def render(results: dict[str, Any]) -> str:
    """The whole table as text."""
    meta = results["meta"]
    lines = [
        f"hsu-registry benchmark  {meta['started']}  ({meta['elapsed_s']:.0f} s"
        f"{', quick' if meta['quick'] else ''})",
        f"hsu_registry {meta['hsu_registry_version']} (sources {meta['hsu_registry_digest']}) "
        f"from {meta['hsu_registry']}",
        f"Python {meta['python']}; Twisted {meta['twisted']}; {meta['cpus']} CPUs; "
        f"load generators: TCP {meta['tcp_generator']}, unix python",
        "",
    ]
    for name, section in (
        ("throughput", _throughput),
        ("store", _store),
        ("memory", _memory),
        ("startup", _startup),
        ("cleanup", _cleanup),
        ("gc", _gc),
        ("fanout", _fanout),
        ("liveness", _liveness),
        ("checks", _checks),
    ):
        if name in results:
            lines.extend(section(results))
            lines.append("")
    for note in meta.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines).rstrip() + "\n"

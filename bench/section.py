"""
What every standalone section (``python -m bench.fanout``, ``bench.liveness``,
``bench.checks``) and ``python -m bench`` share: progress lines on stderr,
SIGTERM as a clean exit (so ``finally`` blocks reap what a section started),
atomic JSON output, the command line's run-render-write sequence, and a
table cell that may be empty.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

__all__ = ["fmt", "on_sigterm", "progress", "section_main", "write_json"]

S = TypeVar("S")


def progress(line: str) -> None:
    """One progress line, on stderr (the table goes to stdout)."""
    print(line, file=sys.stderr, flush=True)


def fmt(value: float | None, spec: str) -> str:
    """C{value} formatted by C{spec} (a width and a precision), or a dash as wide."""
    if value is None:
        return "-".rjust(int(spec.split(".")[0]))
    return format(value, spec)


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler that exits through the usual unwinding."""
    raise SystemExit(128 + signum)


def write_json(results: dict[str, Any], path: str) -> None:
    """Write C{results} to C{path} (creating its directory), atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(partial, path)


def section_main(
    name: str,
    argv: list[str] | None,
    parse: Callable[[list[str] | None], tuple[S, str]],
    run: Callable[[S], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> None:
    """
    The command line of a standalone section: parse, run, print the table,
    write the JSON when asked; a C{RuntimeError} is one stderr line, exit 1.
    """
    settings, json_path = parse(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run(settings)
    except RuntimeError as e:
        print(f"bench.{name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(render(results), flush=True)
    if json_path:
        write_json(results, json_path)
        progress(f"wrote {json_path}")

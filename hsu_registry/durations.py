# -*- test-case-name: tests.test_durations -*-
"""
Go-style duration strings (``1m30s``, ``0.5s``, ``2h30m15s``) in and out.

The original registry is a Go program whose flags and ``uptime`` field use
Go's ``time.Duration`` syntax, so we accept and produce the same text.
"""

from __future__ import annotations

import math
import re

__all__ = ["format_duration", "parse_duration"]

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PART = re.compile(f"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_BARE = re.compile(_NUMBER)

# Longer than any sensible configuration value, short enough that a typo like
# "99999999h" is refused instead of overflowing a timer.
_MAX_SECONDS = 366 * 24 * 3600.0


def parse_duration(text: str) -> float:
    """
    Parse a Go ``time.ParseDuration`` string into seconds.

    A bare number is taken as seconds, for the convenience of shell users.

    @raise ValueError: when C{text} is not a duration, is negative, or is
        longer than a year.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    if s.startswith("-"):
        raise ValueError(f"negative duration: {text!r}")
    if s.startswith("+"):
        s = s[1:]
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    if _BARE.fullmatch(s):
        seconds = float(s)
    else:
        pos = 0
        seconds = 0.0
        while pos < len(s):
            match = _PART.match(s, pos)
            if match is None:
                raise ValueError(f"invalid duration {text!r} (expected e.g. 1m30s, 0.5s, 250ms)")
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
    if seconds > _MAX_SECONDS:
        raise ValueError(f"duration {text!r} is longer than a year")
    return seconds


def format_duration(seconds: float) -> str:
    """
    Format whole seconds the way Go's ``Duration.String`` does after
    ``Round(time.Second)``: ``0s``, ``45s``, ``1m0s``, ``2h30m15s``.
    """
    if not 0.0 < seconds < math.inf:  # negative, NaN or infinite
        return "0s"
    total = math.floor(seconds + 0.5)  # Go rounds halves away from zero
    if total == 0:
        return "0s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"

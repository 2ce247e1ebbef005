"""Order statistics shared by the load generator and the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["median", "percentile", "percentiles_ms"]


def percentile(ordered: Sequence[float], p: float) -> float:
    """
    The nearest-rank C{p}-th percentile (0 < p <= 100) of C{ordered}, which
    must be sorted and not empty.
    """
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def percentiles_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds of latencies given in seconds."""
    ordered = sorted(samples_s)
    return {
        "p50_ms": percentile(ordered, 50) * 1000.0,
        "p90_ms": percentile(ordered, 90) * 1000.0,
        "p99_ms": percentile(ordered, 99) * 1000.0,
        "max_ms": ordered[-1] * 1000.0,
    }


def median(values: Sequence[float]) -> float:
    """The median of C{values} (not empty)."""
    return float(statistics.median(values))

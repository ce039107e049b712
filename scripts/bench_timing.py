"""What the benchmark scripts share about timing on a machine whose speed drifts (by 10-40% over minutes on this
project's 2-core machine): compare methods whose steps ran back to back, never the medians of separate stretches."""

from __future__ import annotations

import statistics


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of times[i] / reference[i], the two taken in the same round: a drift in the machine's speed
    moves both of a round's steps and cancels in their ratio, where a ratio of two medians keeps it whole."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))

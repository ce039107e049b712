"""What the benchmark scripts share about timing on a machine whose speed drifts (by 10-40% over minutes on this
project's 2-core machine): compare methods whose steps ran back to back, never the medians of separate stretches."""

from __future__ import annotations

import random
import statistics


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of times[i] / reference[i], the two taken in the same round: a drift in the machine's speed
    moves both of a round's steps and cancels in their ratio, where a ratio of two medians keeps it whole."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def paired_ratio_interval(times: list[float], reference: list[float], confidence: float = 0.9,
                          resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap interval for `paired_ratio`: the median over rounds drawn again with replacement, `resamples`
    times, cut at the two tails of `confidence`. Seeded, so one run's rounds always give the same interval."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = int(resamples * (1 - confidence) / 2)
    return medians[tail], medians[resamples - 1 - tail]

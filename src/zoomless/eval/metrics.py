"""Accuracy with confidence intervals, the zooming gap, and latency statistics.

- Accuracy intervals are 95% Wilson score intervals (good coverage at small n and near 0 or 1,
  unlike the plain normal interval).
- The zooming gap is Acc(crop) - Acc(full) over the same questions. Its interval uses the paired
  per-question differences d_i = crop_i - full_i (each -1, 0 or +1): mean(d) +- z * sd(d) / sqrt(n),
  the normal approximation for a paired mean. Pairing removes the between-question variance that
  both views share, so the interval is much tighter than treating the two accuracies as
  independent. It is deterministic (no bootstrap seed to report). When every d_i is equal the
  interval collapses to a point; it says "no disagreement seen", not "no uncertainty".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Accuracy:
    n: int
    correct: int
    acc: float  # correct / n; 0.0 when n == 0
    lo: float
    hi: float


@dataclass(frozen=True)
class Gap:
    n: int  # paired questions
    gap: float  # mean(crop - full)
    lo: float
    hi: float


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)  # exact at the edges, not 1 - 1e-16
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


def accuracy(correct: Iterable[bool]) -> Accuracy:
    flags = list(correct)
    n, k = len(flags), sum(bool(c) for c in flags)
    lo, hi = wilson(k, n)
    return Accuracy(n=n, correct=k, acc=k / n if n else 0.0, lo=lo, hi=hi)


def by_dimension(correct: Sequence[bool], dimensions: Sequence[str | None]) -> dict[str, Accuracy]:
    """Accuracy per dimension (None becomes "other"), sorted by name, plus "all"."""
    groups: dict[str, list[bool]] = {}
    for c, d in zip(correct, dimensions, strict=True):
        groups.setdefault(d or "other", []).append(c)
    out = {d: accuracy(groups[d]) for d in sorted(groups)}
    out["all"] = accuracy(correct)
    return out


def paired_gap(full: Mapping[str, bool], crop: Mapping[str, bool], z: float = Z95) -> Gap:
    """Acc(crop) - Acc(full) over the ids both views answered, with a paired normal interval."""
    ids = [i for i in full if i in crop]
    n = len(ids)
    if n == 0:
        return Gap(0, 0.0, -1.0, 1.0)
    d = [int(crop[i]) - int(full[i]) for i in ids]
    mean = sum(d) / n
    if n == 1:
        return Gap(1, mean, -1.0, 1.0)  # one pair says nothing about the spread
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    half = z * math.sqrt(var / n)
    return Gap(n, mean, max(-1.0, mean - half), min(1.0, mean + half))


def gap_by_dimension(
    full: Mapping[str, bool], crop: Mapping[str, bool], dimension: Mapping[str, str | None]
) -> dict[str, Gap]:
    """The paired gap per dimension (keyed like `by_dimension`), plus "all"."""
    groups: dict[str, list[str]] = {}
    for i in full:
        if i in crop:
            groups.setdefault(dimension.get(i) or "other", []).append(i)
    out = {d: paired_gap({i: full[i] for i in ids}, {i: crop[i] for i in ids}) for d, ids in sorted(groups.items())}
    out["all"] = paired_gap(full, crop)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(latencies: Sequence[float], total_s: float | None = None) -> dict[str, float]:
    """p50/p90/p99/mean of per-item latencies and throughput. `total_s` is the time spent
    generating (the sum of batch times); without it the latencies are summed."""
    n = len(latencies)
    total = sum(latencies) if total_s is None else total_s
    return {
        "n": n,
        "p50_s": percentile(latencies, 50),
        "p90_s": percentile(latencies, 90),
        "p99_s": percentile(latencies, 99),
        "mean_s": total / n if n else float("nan"),
        "samples_per_s": n / total if total > 0 else float("nan"),
    }

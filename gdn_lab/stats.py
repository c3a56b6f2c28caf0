"""Numbers over seeds: mean and spread of a metric, and when a difference is a tie.

A workbook's claim "A beats B" holds only when the gap is larger than what changing the seed
does to either. `summarize` gives mean, standard deviation and range of a list of runs;
`compare` calls two summaries a tie when their means differ by less than the larger of the two
ranges (max - min over seeds), which with 3 seeds is a conservative test, and says which is
better otherwise; `difference` adds the gap and that margin. `percentile` and `interval` read
bootstrap samples (the scaling fits' uncertainty in `gdn_lab.scaling`).

    >>> compare(summarize([0.91, 0.93, 0.92]), summarize([0.50, 0.97, 0.70]))
    'tie'
    >>> compare(summarize([0.91, 0.93, 0.92]), summarize([0.20, 0.25, 0.22]))
    'better'
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def summarize(values: Sequence[float | None]) -> dict:
    """{"mean", "std" (sample, 0 for one value), "min", "max", "spread" (max - min), "n", "values"}
    over the finite values; a None or non-finite value (a run that diverged) is counted in
    "failed" and left out of the statistics (all None: every statistic None)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    summary = {"n": n, "failed": len(values) - n, "values": list(values)}
    if not finite:
        return {**summary, "mean": None, "std": None, "min": None, "max": None, "spread": None}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0
    return {**summary, "mean": mean, "std": std, "min": min(finite), "max": max(finite),
            "spread": max(finite) - min(finite)}


def compare(a: dict, b: dict, higher_is_better: bool = True) -> str:
    """'better', 'worse' or 'tie': summary `a` against summary `b` (from `summarize`). A tie when
    |mean_a - mean_b| <= the larger seed range of the two, or when either has no finished run."""
    if a["mean"] is None or b["mean"] is None:
        return "tie"
    gap = a["mean"] - b["mean"]
    if abs(gap) <= max(a["spread"], b["spread"]):
        return "tie"
    return "better" if (gap > 0) == higher_is_better else "worse"


def format_summary(summary: dict, digits: int = 3) -> str:
    """'0.921 ± 0.010 (3 seeds)': mean ± std and the number of runs ('n/a' when none finished)."""
    if summary["mean"] is None:
        return f"n/a ({summary['failed']} failed)"
    runs = f"{summary['n']} seed{'s' if summary['n'] != 1 else ''}"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} ({runs})"


def difference(a: dict, b: dict, higher_is_better: bool = True) -> dict:
    """Summary `a` against summary `b`: {"delta": mean_a - mean_b (None when either has no finished
    run), "margin": the larger seed range of the two (what a gap must exceed), "verdict": `compare`'s
    'better', 'worse' or 'tie' for `a`}."""
    if a["mean"] is None or b["mean"] is None:
        return {"delta": None, "margin": None, "verdict": "tie"}
    return {"delta": a["mean"] - b["mean"], "margin": max(a["spread"], b["spread"]),
            "verdict": compare(a, b, higher_is_better)}


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, linearly interpolated between order statistics
    (numpy's default): percentile([1, 2, 3, 4], 50) -> 2.5."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q}; use a percentage in [0, 100]")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def interval(values: Sequence[float], level: float = 0.9) -> tuple[float, float]:
    """The central `level` interval of `values` (bootstrap samples, say): the (1-level)/2 and
    (1+level)/2 percentiles. interval(samples, 0.9) -> (5th, 95th percentile)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level}; use a fraction in (0, 1), e.g. 0.9")
    tail = 50 * (1 - level)
    return percentile(values, tail), percentile(values, 100 - tail)

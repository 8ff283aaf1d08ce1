"""Statistics for benchmark samples: median with a distribution-free 95% interval, speed-up summaries.

Timings are skewed (a few slow outliers, never fast ones), so every result is a median; the interval is the
order-statistic interval of the median, which assumes nothing about the distribution. With fewer than six
samples it is simply [min, max] and covers less than 95%: `Summary.n` says how many there were.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

# A speed-up within this fraction of 1.0 is a tie: it does not count as a win or a loss.
TIE_BAND = 0.05


def _finite_samples(samples: Iterable[float], what: str) -> list[float]:
    values = [float(x) for x in samples]
    if not values:
        raise ValueError(f"{what} needs at least one sample, got none")
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise ValueError(f"{what} got non-finite samples {bad[:3]}: every sample must be a finite number")
    return values


def median_interval(samples: Sequence[float]) -> tuple[float, float]:
    """Distribution-free ~95% interval of the median: order statistics at ranks n/2 -+ 1.96 sqrt(n)/2."""
    ordered = sorted(_finite_samples(samples, "median_interval"))
    n = len(ordered)
    half = 1.96 * math.sqrt(n) / 2
    low, high = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[high]


@dataclass(frozen=True)
class Summary:
    """Median, mean, extremes and the 95% interval of the median of some samples (one unit, stated)."""

    median: float
    mean: float
    min: float
    max: float
    ci95_low: float
    ci95_high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def summarize_samples(samples: Sequence[float]) -> Summary:
    """Summary of finite samples; raises ValueError naming the problem for none or non-finite ones."""
    values = _finite_samples(samples, "summarize_samples")
    low, high = median_interval(values)
    return Summary(
        median=statistics.median(values),
        mean=statistics.fmean(values),
        min=min(values),
        max=max(values),
        ci95_low=low,
        ci95_high=high,
        n=len(values),
    )


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of positive numbers (the right average of ratios)."""
    values = _finite_samples(values, "geometric_mean")
    if any(x <= 0 for x in values):
        raise ValueError(f"geometric_mean needs positive values, got {[x for x in values if x <= 0][:3]}")
    return statistics.geometric_mean(values)


def speedup_summary(speedups: Sequence[float], *, tie_band: float = TIE_BAND) -> dict:
    """Mean, geometric mean, median, min and max of speed-ups, and wins/losses/ties beyond `tie_band`.

    A speed-up s > 1 + tie_band is a win, s < 1 - tie_band a loss, anything between a tie.
    Returns {"count": 0} when there is nothing to summarize.
    """
    if not 0 <= tie_band < 1:
        raise ValueError(f"tie_band={tie_band!r} must lie in [0, 1), e.g. 0.05")
    values = [float(s) for s in speedups if s is not None]
    if not values:
        return {"count": 0}
    values = _finite_samples(values, "speedup_summary")
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "geomean": geometric_mean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "wins": sum(s > 1 + tie_band for s in values),
        "losses": sum(s < 1 - tie_band for s in values),
        "ties": sum(1 - tie_band <= s <= 1 + tie_band for s in values),
        "tie_band": tie_band,
    }

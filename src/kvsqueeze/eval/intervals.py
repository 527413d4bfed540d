"""95% intervals for eval scores: Wilson for pass rates, percentile bootstrap for mean scores, and a
paired bootstrap for a recipe's score relative to the full cache on the same samples.

Scores come in strata (one list per task): the statistic is the mean of the stratum means, as in
the summary tables, and a bootstrap resamples samples within each stratum, because the number of
samples per task is fixed by the run's design. Bootstraps use ``RESAMPLES`` resamples drawn from a
NumPy generator seeded with ``SEED``, so a report renders the same intervals every time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval ``[low, high]``."""

    low: float
    high: float

    def clears(self, target: float) -> bool:
        """Whether the whole interval is at or above ``target`` (its lower end clears it)."""
        return self.low >= target


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def wilson(passed: int, total: int, level: float = LEVEL) -> Interval:
    """Wilson score interval for a pass rate of ``passed`` out of ``total`` (Wilson, 1927)."""
    if total < 1 or not 0 <= passed <= total:
        raise ValueError(f"need 0 <= passed <= total and total >= 1, got {passed} of {total}")
    _check_level(level)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    rate = passed / total
    denominator = 1 + z * z / total
    centre = (rate + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def _arrays(strata: Sequence[Sequence[float]]) -> list[np.ndarray]:
    arrays = [np.asarray(stratum, dtype=np.float64) for stratum in strata]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("every stratum needs at least one score")
    return arrays


def _resampled_means(arrays: list[np.ndarray], picks: list[np.ndarray]) -> np.ndarray:
    """``[resamples]`` means of the stratum means, each stratum read at its resampled indices."""
    return np.mean([values[index].mean(axis=1) for values, index in zip(arrays, picks, strict=True)], axis=0)


def _picks(arrays: list[np.ndarray], resamples: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, a.size, size=(resamples, a.size)) for a in arrays]


def _percentile(statistics: np.ndarray, level: float) -> Interval:
    _check_level(level)
    tail = (1 - level) / 2
    low, high = np.quantile(statistics, [tail, 1 - tail])
    return Interval(float(low), float(high))


def bootstrap_mean(
    strata: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval:
    """Percentile bootstrap interval of the mean of the stratum means (samples resampled within
    each stratum, with replacement)."""
    arrays = _arrays(strata)
    return _percentile(_resampled_means(arrays, _picks(arrays, resamples, seed)), level)


def mean_interval(strata: Sequence[Sequence[float]], level: float = LEVEL) -> Interval:
    """The interval the summaries show for a mean score: Wilson when it is one pass rate (a single
    stratum of 0/1 scores), the stratified bootstrap otherwise."""
    arrays = _arrays(strata)
    if len(arrays) == 1 and np.isin(arrays[0], (0.0, 1.0)).all():
        return wilson(int(arrays[0].sum()), arrays[0].size, level)
    return bootstrap_mean(strata, level=level)


def paired_ratio(
    scores: Sequence[Sequence[float]],
    baseline: Sequence[Sequence[float]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Interval:
    """Paired bootstrap interval of mean(``scores``) / mean(``baseline``), where ``scores[s][i]``
    and ``baseline[s][i]`` are the same sample: each resample draws sample ids and reads both at
    them. Resamples whose baseline mean is 0 (the ratio is undefined there) are left out."""
    mine, base = _arrays(scores), _arrays(baseline)
    if [a.size for a in mine] != [a.size for a in base]:
        raise ValueError("scores and baseline must hold the same samples")
    picks = _picks(mine, resamples, seed)
    numerator, denominator = _resampled_means(mine, picks), _resampled_means(base, picks)
    defined = denominator > 0
    if not defined.any():
        raise ValueError("the baseline scores 0 on every resample: no ratio")
    return _percentile(numerator[defined] / denominator[defined], level)

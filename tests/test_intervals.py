"""Intervals against references computed here another way: Wilson from its defining equation,
bootstraps from a plain-Python resampling loop, the paired ratio against an unpaired one."""

from __future__ import annotations

import random
from statistics import NormalDist, mean

import numpy as np
import pytest

from kvsqueeze.eval.intervals import Interval, bootstrap_mean, mean_interval, paired_ratio, wilson

Z = NormalDist().inv_cdf(0.975)
FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.25, 1.0, 0.75] * 3


def _score_test_roots(passed: int, total: int) -> list[float]:
    """The rates p with (p̂ - p)² = z² p (1 - p) / n: the ends of Wilson's interval."""
    rate = passed / total
    k = Z * Z / total
    return sorted(float(r) for r in np.roots([1 + k, -(2 * rate + k), rate * rate]))


@pytest.mark.parametrize(("passed", "total"), [(7, 10), (1, 30), (22, 30), (5, 6)])
def test_wilson_solves_the_score_test_equation(passed, total):
    interval = wilson(passed, total)
    low, high = _score_test_roots(passed, total)
    assert interval.low == pytest.approx(low, abs=1e-12)
    assert interval.high == pytest.approx(high, abs=1e-12)


def test_wilson_published_values_and_edges():
    seven = wilson(7, 10)
    assert (round(seven.low, 4), round(seven.high, 4)) == (0.3968, 0.8922)
    assert wilson(0, 10).low == pytest.approx(0.0, abs=1e-12) and 0 < wilson(0, 10).high < 0.35
    assert wilson(10, 10).high == pytest.approx(1.0, abs=1e-12) and wilson(10, 10).low > 0.65
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_bootstrap_of_equal_scores_has_zero_width():
    assert bootstrap_mean([[0.75] * 12]) == Interval(0.75, 0.75)
    assert bootstrap_mean([[1.0] * 5, [0.5] * 7]) == Interval(0.75, 0.75)


def _python_bootstrap(strata, resamples=20_000, seed=1):
    rng = random.Random(seed)
    stats = sorted(
        mean(mean(rng.choices(stratum, k=len(stratum))) for stratum in strata) for _ in range(resamples)
    )
    return stats[int(0.025 * resamples)], stats[int(0.975 * resamples) - 1]


def test_bootstrap_matches_a_plain_resampling_loop():
    ours = bootstrap_mean([FRACTIONS])
    low, high = _python_bootstrap([FRACTIONS])
    assert ours.low == pytest.approx(low, abs=0.02) and ours.high == pytest.approx(high, abs=0.02)
    assert ours.low < mean(FRACTIONS) < ours.high


def test_stratified_bootstrap_matches_a_plain_loop_and_is_seeded():
    strata = [[1.0, 0.0] * 5, FRACTIONS[:10], [0.0] * 9 + [1.0]]
    ours = bootstrap_mean(strata)
    low, high = _python_bootstrap(strata)
    assert ours.low == pytest.approx(low, abs=0.02) and ours.high == pytest.approx(high, abs=0.02)
    assert bootstrap_mean(strata) == ours
    spread = [[0.1 * i + 0.01 * i * i for i in range(10)]]  # many distinct means: a seed shows
    assert bootstrap_mean(spread, seed=1) != bootstrap_mean(spread)


def test_mean_interval_is_wilson_for_a_pass_rate_and_a_bootstrap_otherwise():
    passes = [1.0] * 7 + [0.0] * 3
    assert mean_interval([passes]) == wilson(7, 10)
    assert mean_interval([FRACTIONS]) == bootstrap_mean([FRACTIONS])
    assert mean_interval([passes, passes]) == bootstrap_mean([passes, passes])


def test_paired_ratio_of_identical_scores_is_exactly_one():
    assert paired_ratio([FRACTIONS], [FRACTIONS]) == Interval(1.0, 1.0)
    assert paired_ratio([[1.0, 0.0] * 5, FRACTIONS], [[1.0, 0.0] * 5, FRACTIONS]) == Interval(1.0, 1.0)


def test_paired_ratio_is_narrower_than_unpaired_when_one_answer_differs():
    full = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0] * 3
    recipe = list(full)
    recipe[0] = 0.0  # loses one answer, never gains one
    paired = paired_ratio([recipe], [full])
    # unpaired: the two means resampled independently, as if they came from different samples
    rng = np.random.default_rng(0)
    draws = lambda scores: np.asarray(scores)[rng.integers(0, 30, size=(10_000, 30))].mean(axis=1)  # noqa: E731
    ratio = draws(recipe) / draws(full)
    unpaired_low, unpaired_high = np.quantile(ratio, [0.025, 0.975])
    point = mean(recipe) / mean(full)
    assert paired.low <= point <= paired.high == 1.0  # no resample can favour the recipe
    assert unpaired_high > 1.2
    assert (unpaired_high - unpaired_low) > 3 * (paired.high - paired.low)


def test_paired_ratio_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same samples"):
        paired_ratio([[1.0, 0.0]], [[1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="at least one score"):
        paired_ratio([[]], [[]])
    with pytest.raises(ValueError, match="no ratio"):
        paired_ratio([[1.0, 0.0]], [[0.0, 0.0]])


def test_an_interval_clears_a_target_only_with_its_lower_end():
    assert Interval(0.95, 1.02).clears(0.95)
    assert not Interval(0.94, 1.10).clears(0.95)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([[0.5]], level=1.0)

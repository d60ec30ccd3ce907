"""Tests of kerasunet.compare: paired bootstrap comparison of experiment arms."""

import math
import re

import numpy as np
import pytest

from kerasunet.compare import bootstrap_interval, compare_arms, compare_pair, paired_differences

CASES, REPEATS = 10, 3


def arm(mean: float, spread: float, seed: int) -> dict:
    """``{(case, repeat): dice}`` whose per-repeat means have this mean and (population) spread.

    Cases share a difficulty across arms; each repeat adds zero-mean noise of its own.
    """
    rng = np.random.default_rng(seed)
    step = spread / math.sqrt(2 / 3)  # population std of (m - step, m, m + step)
    difficulty = np.linspace(-0.1, 0.1, CASES)
    scores = {}
    for repeat, repeat_mean in enumerate((mean - step, mean, mean + step)):
        noise = rng.normal(0, 0.05, CASES)
        for case in range(CASES):
            scores[(f"case-{case}", repeat)] = repeat_mean + difficulty[case] + noise[case] - noise.mean()
    return scores


def repeat_spread(scores: dict) -> float:
    means = [np.mean([v for (_, r), v in scores.items() if r == repeat]) for repeat in range(REPEATS)]
    return float(np.std(means))


def test_demo_run_a_against_c_differs():
    # The demo run: A 0.511 ± 0.022, B spread 0.174, C 0.822 ± 0.011. The old rule compared the
    # gap (0.311) with twice the largest spread (0.348) and called it noise.
    scores = {"A": arm(0.511, 0.022, 1), "B": arm(0.674, 0.174, 2), "C": arm(0.822, 0.011, 3)}
    assert [round(repeat_spread(s), 3) for s in scores.values()] == [0.022, 0.174, 0.011]
    result = {(c.first, c.second): c for c in compare_arms(scores)}
    assert list(result) == [("A", "B"), ("A", "C"), ("B", "C")]
    a_c = result[("A", "C")]
    assert a_c.mean_difference == pytest.approx(0.511 - 0.822)
    assert a_c.high < 0 and a_c.differ and a_c.pairs == CASES * REPEATS
    assert a_c.describe() == (f"A - C: -0.311 (95% CI {a_c.low:+.3f} to {a_c.high:+.3f}, 30 pairs): differ")


def test_clear_difference_is_detected():
    rng = np.random.default_rng(4)
    base = {(f"case-{c}", r): rng.uniform(0.3, 0.9) for c in range(10) for r in range(2)}
    better = {key: value + 0.05 + rng.normal(0, 0.01) for key, value in base.items()}
    result = compare_pair("3D", better, "2D", base)
    assert result.low > 0.04 and result.high < 0.06 and result.differ
    assert result.describe().endswith(": differ")


def test_noisy_zero_mean_difference_is_not_called_a_difference():
    rng = np.random.default_rng(5)
    size = np.abs(rng.normal(0, 0.1, 10))
    diffs = np.concatenate([size, -size])  # large, noisy and exactly zero on average
    base = {(f"case-{c}", 0): 0.5 for c in range(20)}
    other = {key: 0.5 + d for key, d in zip(base, diffs)}
    result = compare_pair("A", other, "B", base)
    assert result.low < 0 < result.high and not result.differ
    assert result.describe().endswith("20 pairs): no clear difference")


def test_pairs_by_key_not_by_order():
    first = {("a", 0): 0.9, ("b", 0): 0.1, ("c", 0): 0.5, ("d", 1): 0.7}
    second = {("c", 0): 0.4, ("a", 0): 0.8, ("b", 0): 0.0, ("e", 1): 0.2}  # shuffled; d and e unpaired
    np.testing.assert_allclose(paired_differences(first, second), [0.1, 0.1, 0.1])
    result = compare_pair("x", first, "y", second)
    assert result.pairs == 3 and result.low == pytest.approx(0.1) and result.high == pytest.approx(0.1)


def test_nan_scores_drop_their_pair():
    first = {("a", 0): 0.9, ("b", 0): float("nan"), ("c", 0): 0.5}
    second = {("a", 0): 0.8, ("b", 0): 0.3, ("c", 0): 0.4}
    assert compare_pair("x", first, "y", second).pairs == 2


def test_interval_has_the_normal_width_and_a_fixed_seed():
    diffs = np.random.default_rng(6).normal(0.2, 1.0, 400)
    low, high = bootstrap_interval(diffs)
    half = 1.96 * diffs.std(ddof=1) / math.sqrt(len(diffs))
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert (low + high) / 2 == pytest.approx(diffs.mean(), abs=0.02)
    assert bootstrap_interval(diffs) == (low, high)
    assert bootstrap_interval(diffs, seed=1) != (low, high)


def test_too_few_pairs():
    message = "Expected at least 2 (case, repeat) pairs scored by both 'A' and 'B'. Received: pairs=1"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        compare_pair("A", {("a", 0): 0.5, ("b", 0): 0.4}, "B", {("a", 0): 0.6})

"""Do two arms of an experiment differ? A paired bootstrap on per-case Dice.

Comparing the gap between the best and the worst arm with twice the largest spread of any
arm lets one unstable arm hide every other difference. On a demo run that rule called
model A (scratch, Dice 0.511 ± 0.022 over repeats) against model C (freeze, 0.822 ±
0.011) "noise", because model B's spread was 0.174. Here each pair of arms is compared on
its own: the unit is one test case in one repeat, scored by both arms, and the statistic
is the mean of the paired Dice differences. Pairing removes what the arms share (how hard
a case is, what a repeat's split and seed did). A percentile bootstrap over the pairs,
with a fixed seed, gives a 95 % interval; the arms "differ" only where it excludes 0.

Example: per-case Dice built like the demo run above (3 repeats of 10 cases with those
means and spreads; ``tests/kerasunet/test_compare.py`` builds them)::

    >>> compare_pair("A", dice["A"], "C", dice["C"]).describe()    # doctest: +SKIP
    'A - C: -0.311 (95% CI -0.336 to -0.287, 30 pairs): differ'

The resampled unit is a (case, repeat) pair, so the interval speaks for these test cases
and these repeats; with few cases it is narrower than an interval over new cases would be.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class PairComparison:
    """The paired comparison of arm ``first`` with arm ``second`` (differences first − second)."""

    first: str
    second: str
    mean_difference: float
    low: float
    high: float
    pairs: int
    level: float = LEVEL

    @property
    def differ(self) -> bool:
        """True only where the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def describe(self) -> str:
        """E.g. ``A - C: -0.311 (95% CI -0.318 to -0.304, 30 pairs): differ``."""
        verdict = "differ" if self.differ else "no clear difference"
        return (f"{self.first} - {self.second}: {self.mean_difference:+.3f} ({self.level:.0%} CI "
                f"{self.low:+.3f} to {self.high:+.3f}, {self.pairs} pairs): {verdict}")


def paired_differences(first: dict, second: dict) -> np.ndarray:
    """``first[key] - second[key]`` for every key both score, in sorted key order.

    Keys are ``(case, repeat)`` (any sortable keys); a NaN score (no Dice for that case)
    drops its pair.
    """
    keys = sorted(set(first) & set(second))
    diffs = np.array([first[k] - second[k] for k in keys], np.float64)
    return diffs[~np.isnan(diffs)]


def bootstrap_interval(differences, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences``.

    Resamples the values with replacement ``resamples`` times (``numpy`` generator seeded
    with ``seed``) and returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of
    the resampled means.
    """
    differences = np.asarray(differences, np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2**20 // max(len(differences), 1))  # bounded memory for many pairs
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        means[start:start + n] = differences[rng.integers(0, len(differences), (n, len(differences)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def compare_pair(first: str, first_scores: dict, second: str, second_scores: dict, level: float = LEVEL,
                 resamples: int = RESAMPLES, seed: int = SEED) -> PairComparison:
    """Compares two arms on their paired per-case Dice.

    Args:
        first: Name of the first arm, e.g. ``"A"`` or ``"3D"``.
        first_scores: ``{(case, repeat): dice}`` of the first arm.
        second: Name of the second arm.
        second_scores: ``{(case, repeat): dice}`` of the second arm.
        level: Confidence level of the interval.
        resamples: Bootstrap resamples.
        seed: Seed of the resampling (fixed, so a report is reproducible).

    Returns:
        A :class:`PairComparison` of ``first - second``.

    Raises:
        ValueError: fewer than 2 pairs scored by both arms, or ``level`` not in (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"Expected 0 < level < 1. Received: level={level}")
    diffs = paired_differences(first_scores, second_scores)
    if len(diffs) < 2:
        raise ValueError(f"Expected at least 2 (case, repeat) pairs scored by both {first!r} and {second!r}. "
                         f"Received: pairs={len(diffs)}")
    low, high = bootstrap_interval(diffs, level, resamples, seed)
    return PairComparison(first, second, float(diffs.mean()), low, high, len(diffs), level)


def compare_arms(scores: dict, level: float = LEVEL, resamples: int = RESAMPLES,
                 seed: int = SEED) -> list[PairComparison]:
    """Every pair of arms, in the order of ``scores`` (A-B, A-C, B-C for A, B, C).

    Args:
        scores: ``{arm: {(case, repeat): dice}}``.
        level, resamples, seed: As :func:`compare_pair`.

    Returns:
        One :class:`PairComparison` per pair of arms.
    """
    return [compare_pair(a, scores[a], b, scores[b], level, resamples, seed)
            for a, b in itertools.combinations(scores, 2)]


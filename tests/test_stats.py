"""reproduce/stats.py: the Welch comparison against scipy's, seeds sharpening a verdict, Holm across a
family, equivalence within a margin, the direction of a lower-is-better figure (fast, no model)."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from orthodiff.reproduce.stats import (
    CANNOT,
    EQUIVALENT,
    FAILS,
    HOLDS,
    Comparison,
    compare,
    decide,
    equivalence_margin,
    format_difference,
    holm,
)


def arm(mean: float, std: float, n: int, reverse: bool = False) -> np.ndarray:
    """n seeds with exactly this mean and sample std (standardized evenly spaced values, rescaled)."""
    z = np.linspace(-1, 1, n)[::-1 if reverse else 1]
    return mean + std * (z - z.mean()) / z.std(ddof=1)


def test_ci_and_p_are_welchs():
    ours, theirs = [0.31, 0.35, 0.29, 0.33], [0.26, 0.27, 0.30]
    c = compare(ours, theirs, higher_is_better=True, margin=0.01)
    welch = scipy_stats.ttest_ind(ours, theirs, equal_var=False)
    assert c.difference == pytest.approx(np.mean(ours) - np.mean(theirs), abs=1e-12)
    assert c.p == pytest.approx(welch.pvalue, rel=1e-9)
    assert c.ci == pytest.approx(tuple(welch.confidence_interval(0.95)), rel=1e-9)
    assert (c.n_ours, c.n_theirs, c.margin) == (4, 3, 0.01)
    # TOST by hand: Welch's standard error and degrees of freedom, the larger one-sided p.
    va, vb = np.var(ours, ddof=1) / 4, np.var(theirs, ddof=1) / 3
    se, df = math.sqrt(va + vb), (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    tost = max(scipy_stats.t.sf((c.difference + 0.01) / se, df), scipy_stats.t.cdf((c.difference - 0.01) / se, df))
    assert c.p_equivalent == pytest.approx(tost, rel=1e-9)
    assert math.isnan(compare(ours, theirs, True).p_equivalent)  # no margin, no equivalence test


def test_the_same_means_and_stds_decide_with_more_seeds_and_not_with_fewer():
    few = compare(arm(0.30, 0.04, 3), arm(0.25, 0.04, 3, reverse=True), higher_is_better=True)
    many = compare(arm(0.30, 0.04, 12), arm(0.25, 0.04, 12, reverse=True), higher_is_better=True)
    for values in (arm(0.30, 0.04, 3), arm(0.30, 0.04, 12)):
        assert (values.mean(), values.std(ddof=1)) == pytest.approx((0.30, 0.04))
    assert few.difference == pytest.approx(many.difference) == pytest.approx(0.05)
    [(few_label, _)], [(many_label, reason)] = decide([few]), decide([many])
    assert few_label == CANNOT and many_label == HOLDS
    assert reason.startswith("difference +0.050 [95 % CI +0.01") and "n=12/12" in reason and reason.endswith("ours is better")


def test_one_seed_is_never_decided_however_far_apart():
    c = compare([0.9, math.nan], [0.10, 0.12, 0.11], higher_is_better=True, margin=0.5)  # a diverged seed is dropped
    assert (c.n_ours, c.n_theirs) == (1, 3) and c.difference == pytest.approx(0.79)
    assert math.isnan(c.p) and math.isnan(c.p_equivalent) and all(map(math.isnan, c.ci))
    assert decide([c]) == [(CANNOT, "fewer than 2 seeds in an arm (n=1/3)")]


def test_holm_adjusts_across_the_family():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 0.04 lifted to 0.06: monotone
    adjusted = holm([0.01, math.nan, 0.04])  # NaN (an undecidable row) is not counted: m = 2
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped
    # A p of 0.03 holds on its own, not among three claims.
    c = Comparison(0.1, (0.01, 0.19), 3, 3, 0.03, math.nan, None, True)
    weak = Comparison(0.01, (-0.1, 0.12), 3, 3, 0.5, math.nan, None, True)
    assert decide([c])[0][0] == HOLDS
    label, reason = decide([c, weak, weak])[0]
    assert label == CANNOT and "Holm p=0.09 over 3 comparisons" in reason


def test_equivalent_within_the_margin_and_not_beyond_it():
    margin = equivalence_margin(base=0.035, ceiling=0.435)
    assert margin == pytest.approx(0.02) and equivalence_margin(7.6, 6.9) == pytest.approx(0.035)  # either direction
    close = compare(arm(0.300, 0.002, 6), arm(0.301, 0.002, 6, reverse=True), True, margin=margin)
    assert decide([close])[0][0] == EQUIVALENT and close.p_equivalent < 0.01
    apart = compare(arm(0.325, 0.03, 6), arm(0.300, 0.03, 6, reverse=True), True, margin=margin)  # 0.025 > margin
    assert apart.p > 0.05 and apart.p_equivalent > 0.05 and decide([apart])[0][0] == CANNOT


def test_worse_does_not_hold_and_lower_is_better_flips_the_direction():
    low, high = arm(6.9, 0.1, 4), arm(7.6, 0.2, 4, reverse=True)
    assert decide([compare(low, high, higher_is_better=True)])[0][0] == FAILS
    assert decide([compare(low, high, higher_is_better=False)])[0][0] == HOLDS  # e.g. a landmark error
    assert decide([compare(high, low, higher_is_better=False)])[0][0] == FAILS
    # Both arms without spread (steps on the validation grid): decided by the means alone.
    apart, tied = compare([400] * 3, [600] * 3, False, margin=100), compare([400] * 3, [400] * 3, False, margin=100)
    assert (apart.p, apart.p_equivalent, tied.p, tied.p_equivalent) == (0, 1, 1, 0)
    assert [label for label, _ in decide([apart, tied])] == [HOLDS, EQUIVALENT]


def test_format_difference():
    c = Comparison(0.041, (0.020, 0.062), 3, 3, 0.004, math.nan, None, True)
    assert format_difference(c) == "+0.041 [+0.020, +0.062]"
    assert format_difference(Comparison(-412.0, (-620.4, -180.0), 3, 3, 0.01, math.nan, None, False), 0) == "-412 [-620, -180]"
    one_seed = compare([0.9], [0.10, 0.12], True)
    assert format_difference(one_seed) == "+0.790" and format_difference(compare([], [0.1, 0.2], True)) == "n/a"

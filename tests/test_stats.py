"""ussf_lib.evaluation.stats: the Nadeau–Bengio corrected resampled t-test and the bootstrap CI of a paired difference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ussf_lib.errors import UserError
from ussf_lib.evaluation.stats import bootstrap_ci, corrected_resampled_ttest, paired_comparison

# Worked example: 5-fold CV, per-fold accuracy differences (model A - model B).
DIFFS = [0.02, 0.03, 0.01, 0.04, 0.00]


def _t4_two_sided_p(t: float) -> float:
    """Two-sided p of Student's t with 4 degrees of freedom, from its closed-form CDF (no scipy)."""
    a = 1 + t * t / 4
    cdf = 0.5 + 3 / 8 * (t / math.sqrt(a)) * (1 - t * t / (12 * a))
    return 2 * (1 - cdf)


def test_corrected_ttest_matches_the_hand_computed_example():
    # By hand: mean 0.02; deviations 0, .01, -.01, .02, -.02 -> s^2 = (0 + 1 + 1 + 4 + 4)e-4 / 4 = 2.5e-4.
    # 5 folds: n_test/n_train = 1/4, variance factor 1/5 + 1/4 = 0.45 -> se = sqrt(0.45 * 2.5e-4) = 0.0106066.
    # t = 0.02 / 0.0106066 = 1.8856 with 4 degrees of freedom -> p = 0.1324.
    t, p, df = corrected_resampled_ttest(DIFFS, test_train_ratio=0.25)
    assert df == 4
    assert t == pytest.approx(0.02 / math.sqrt(0.45 * 2.5e-4), rel=1e-12) == pytest.approx(1.8856, abs=1e-4)
    assert p == pytest.approx(_t4_two_sided_p(t), rel=1e-9) == pytest.approx(0.1324, abs=1e-4)


def test_ratio_zero_is_the_naive_paired_ttest_and_the_correction_is_more_conservative():
    from scipy import stats

    a = np.array([0.90, 0.91, 0.88, 0.93, 0.90])
    b = a - np.array(DIFFS)
    t0, p0, _ = corrected_resampled_ttest(a - b, 0.0)
    ref = stats.ttest_rel(a, b)
    assert t0 == pytest.approx(ref.statistic) and p0 == pytest.approx(ref.pvalue)
    assert p0 < 0.05 < corrected_resampled_ttest(a - b, 0.25)[1]  # "significant" only without the correction


def test_zero_variance_and_bad_input():
    for equal in ([0.0, 0.0, 0.0], [0.01, 0.01, 0.01], [-3.12, -3.12]):  # no spread: no test, not p = 0
        t, p, df = corrected_resampled_ttest(equal, 0.5)
        assert math.isnan(t) and math.isnan(p) and df == len(equal) - 1
    with pytest.raises(UserError, match="at least 2"):
        corrected_resampled_ttest([0.1], 0.25)
    with pytest.raises(UserError, match="NaN"):
        corrected_resampled_ttest([0.1, float("nan")], 0.25)
    with pytest.raises(UserError, match="test_train_ratio"):
        corrected_resampled_ttest(DIFFS, -1)


def test_bootstrap_ci_contains_the_mean_and_is_deterministic_by_seed():
    low, high = bootstrap_ci(DIFFS, seed=0)
    assert low <= np.mean(DIFFS) <= high and min(DIFFS) <= low < high <= max(DIFFS)
    assert bootstrap_ci(DIFFS, seed=0) == (low, high)
    irregular = [0.013, -0.021, 0.047, 0.002, 0.031]  # values off a grid, so the seed visibly matters
    assert bootstrap_ci(irregular, n_boot=500, seed=1) != bootstrap_ci(irregular, n_boot=500, seed=2)
    narrow = bootstrap_ci(DIFFS, level=0.5, seed=0)
    assert low <= narrow[0] <= narrow[1] <= high
    with pytest.raises(UserError, match="level"):
        bootstrap_ci(DIFFS, level=95)


def test_paired_comparison_collects_everything():
    a = [0.90, 0.91, 0.88, 0.93, 0.90]
    res = paired_comparison(a, np.subtract(a, DIFFS), test_train_ratio=0.25, seed=0)
    assert res.n_folds == 5 and res.df == 4 and res.diffs == pytest.approx(DIFFS)
    assert res.mean_diff == pytest.approx(0.02) and res.std_diff == pytest.approx(math.sqrt(2.5e-4))
    assert res.p_value == pytest.approx(0.1324, abs=1e-4) and res.naive_p_value < res.p_value
    assert res.ci_low <= res.mean_diff <= res.ci_high
    assert set(res.to_dict()) >= {"t", "p_value", "ci_low", "ci_high", "diffs"}
    with pytest.raises(UserError, match="folds"):
        paired_comparison([0.1, 0.2], [0.1, 0.2, 0.3], 0.25)

"""Paired comparison of two models cross-validated on the same folds: corrected t-test and bootstrap CI.

Introduced in ``notebooks/06_compare_baselines.ipynb``; ``ussf compare`` writes its ``paired.csv`` with it.

Why a *corrected* test. In k-fold cross-validation the k per-fold differences ``d_j = a_j - b_j`` between
two models are not independent: any two training sets share a fraction ``(k - 2) / (k - 1)`` of their
images. The ordinary paired t-test treats them as independent, underestimates the variance of the mean
difference and so reports far too many "significant" differences (Dietterich 1998; Nadeau & Bengio 2003).
Nadeau and Bengio's *corrected resampled t-test* inflates the variance by the ratio of test to training
set size::

    d̄   = (1/k) Σ_j d_j
    σ̂²  = 1/(k-1) Σ_j (d_j - d̄)²                      (sample variance, ddof = 1)
    t    = d̄ / sqrt( (1/k + n_test/n_train) · σ̂² )     (instead of d̄ / sqrt(σ̂² / k))
    p    = 2 · (1 - F_t(|t|; k - 1))                     (two-sided, Student's t with k - 1 degrees of freedom)

For plain k-fold CV ``n_test/n_train = 1/(k-1)`` (0.25 for 5 folds), so the variance factor is
``1/5 + 1/4 = 0.45`` instead of ``0.2``. Bouckaert & Frank (2004) showed that this correction gives a test
whose type-I error stays near its nominal level and whose result is far more replicable than the naive
paired t-test; they recommend it (preferably over repeated CV runs) for comparing learners.

The bootstrap interval resamples the k fold differences with replacement (percentile method, seeded). With
k = 5 it is a coarse description of the spread of the per-fold differences, *not* a correction for the
overlap of training sets: read the corrected p-value for the inference, the interval for the size.

References:

* C. Nadeau, Y. Bengio. Inference for the generalization error. *Machine Learning* 52:239-281 (2003).
* R. R. Bouckaert, E. Frank. Evaluating the replicability of significance tests for comparing learning
  algorithms. *PAKDD 2004*, LNCS 3056:3-12.
* T. G. Dietterich. Approximate statistical tests for comparing supervised classification learning
  algorithms. *Neural Computation* 10(7):1895-1923 (1998).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

from ussf_lib.errors import UserError

#: Bootstrap resamples used by default (enough for a stable 95% percentile interval).
N_BOOT: int = 10_000


def _diffs(values: ArrayLike, name: str = "differences") -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size < 2:
        raise UserError(f"{name}: need at least 2 paired folds, got {arr.size}; run with --folds 2 or more")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{name}: holds NaN or infinite values; every fold needs a finite metric for both models")
    return arr


def corrected_resampled_ttest(diffs: ArrayLike, test_train_ratio: float) -> tuple[float, float, int]:
    """Nadeau–Bengio corrected resampled t-test of ``mean(diffs) == 0``: returns ``(t, p_two_sided, df)``.

    ``diffs`` are the per-fold differences of a metric between two models trained and tested on the same
    folds; ``test_train_ratio`` is ``n_test / n_train`` (``1/(k-1)`` for k-fold CV). ``test_train_ratio=0``
    gives the ordinary (uncorrected) paired t-test. When all differences are equal the sample variance is 0
    and the test is undefined: ``t`` and ``p`` are NaN (with 2 folds of small test sets, equal differences
    happen, e.g. one image each; reporting ``p = 0`` there would call noise significant).
    """
    d = _diffs(diffs)
    if not (test_train_ratio >= 0 and math.isfinite(test_train_ratio)):
        raise UserError(f"test_train_ratio={test_train_ratio}: must be a finite n_test/n_train >= 0")
    k = d.size
    mean = float(d.mean())
    var = float(d.var(ddof=1))
    df = k - 1
    if var == 0.0:
        return math.nan, math.nan, df
    t = mean / math.sqrt((1.0 / k + test_train_ratio) * var)
    p = float(2.0 * sps.t.sf(abs(t), df))
    return float(t), min(1.0, p), df


def bootstrap_ci(diffs: ArrayLike, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (resampled with replacement, deterministic by ``seed``)."""
    d = _diffs(diffs)
    if not 0 < level < 1:
        raise UserError(f"level={level}: pass a confidence level between 0 and 1, e.g. 0.95")
    if n_boot < 1:
        raise UserError(f"n_boot={n_boot}: pass a positive number of bootstrap resamples")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


@dataclass
class PairedResult:
    """One metric of one model pair, compared fold by fold (``diffs = a - b``)."""

    diffs: list[float]
    mean_diff: float
    std_diff: float
    t: float
    df: int
    p_value: float
    ci_low: float
    ci_high: float
    test_train_ratio: float
    n_folds: int
    naive_p_value: float = field(default=math.nan)  #: the uncorrected paired t-test, for contrast

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparison(a: ArrayLike, b: ArrayLike, test_train_ratio: float, level: float = 0.95,
                      n_boot: int = N_BOOT, seed: int = 0) -> PairedResult:
    """Compare per-fold scores ``a`` and ``b`` (same folds, same order): corrected t-test and bootstrap CI of ``a - b``."""
    a_arr, b_arr = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a_arr.shape != b_arr.shape:
        raise UserError(f"paired scores have {a_arr.size} and {b_arr.size} folds; pass one score per fold for both models")
    d = _diffs(a_arr - b_arr)
    t, p, df = corrected_resampled_ttest(d, test_train_ratio)
    _, naive_p, _ = corrected_resampled_ttest(d, 0.0)
    low, high = bootstrap_ci(d, level=level, n_boot=n_boot, seed=seed)
    return PairedResult(diffs=[float(x) for x in d], mean_diff=float(d.mean()), std_diff=float(d.std(ddof=1)),
                        t=t, df=df, p_value=p, ci_low=low, ci_high=high, test_train_ratio=float(test_train_ratio),
                        n_folds=int(d.size), naive_p_value=naive_p)

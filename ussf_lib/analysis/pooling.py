"""Pooled over folds or averaged over folds: the same metric, two numbers that can differ a lot.

Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``. Cross-validation tests every image once, so
the folds' predictions can be pooled into one table and scored once; the run's tables instead score each fold
and average. With folds of equal size and similar models the two agree; with few folds, small folds or models
whose probabilities sit on different scales they need not. A pooled AUC ranks the probabilities of *different*
models (one per fold) against each other, which no single model's AUC does, so it can land well above or well
below every fold's AUC.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from ussf_lib.evaluation.metrics import predictions_frame_metrics

#: Per-class metrics compared pooled against per fold.
COMPARED: tuple[str, ...] = ("sensitivity", "auc")


def pooled_vs_per_fold(pred: pd.DataFrame, classes: Sequence[str], metrics: Sequence[str] = COMPARED) -> pd.DataFrame:
    """Per class, in percent: each metric of the pooled predictions, the mean and range of the folds' values,
    and pooled minus mean. ``pred`` is every fold's ``predictions.csv`` (``fold``, ``label``, ``prob_<class>``).
    Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``."""
    pooled = predictions_frame_metrics(pred, classes)["per_class"]
    folds = pd.concat({k: predictions_frame_metrics(rows, classes)["per_class"]
                       for k, rows in pred.groupby("fold", sort=True)}, names=["fold"])
    out = pd.DataFrame(index=pd.Index([str(c) for c in classes], name="class"))
    for m in metrics:
        per_fold = folds[m].unstack("fold")
        out[f"{m} pooled"] = 100 * pooled[m]
        out[f"{m} fold mean"] = 100 * per_fold.mean(axis=1)
        out[f"{m} fold range"] = [f"{100 * lo:.1f} to {100 * hi:.1f}"
                                  for lo, hi in zip(per_fold.min(axis=1), per_fold.max(axis=1))]
        out[f"{m} pooled - mean"] = out[f"{m} pooled"] - out[f"{m} fold mean"]
    return out.round(1)

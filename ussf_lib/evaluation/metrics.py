"""Classification metrics from labels and probabilities: per fold, per class, and summarised over folds.

Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``. This module never touches a model: it takes
integer labels and class probabilities (or a predictions table with ``label`` and ``prob_<class>`` columns)
and computes overall accuracy (the paper's Table 1), macro averages of one-vs-rest precision, sensitivity and
specificity (the paper's abstract; the means of its Table 2), plus macro F1 and AUC (which the paper does not
report), per-class one-vs-rest metrics (its Table 2), each as mean ± std over the k folds. Two calibration
figures ride along (:data:`CALIBRATION_METRICS`, lower is better, also not in the paper): the 15-bin expected
calibration error of the top-class probability (:func:`expected_calibration_error`) and the multi-class Brier
score (:func:`brier_score`). :func:`patient_predictions` turns image predictions into one row per patient (mean
probability over the patient's images), so every metric here can be computed per patient too.

The work is done by scikit-learn (``confusion_matrix``, ``precision_recall_fscore_support``,
``roc_auc_score``), always with ``labels=range(n_classes)`` so that a fold lacking a class keeps its columns.

Conventions for undefined values (a fold of a small dataset may lack a class):

* A class **absent from** ``y_true`` (support 0): its sensitivity, F1 and AUC are NaN, not 0 -- the fold
  holds no positives to find. Its precision is 0.0 when the model predicted it anyway (every such prediction
  is a false positive) and NaN when it was never predicted either.
* A class **present but never predicted**: precision is 0/0 and scored 0.0 (scikit-learn's
  ``zero_division=0``), so a model that ignores a class is penalised; its sensitivity and F1 are then 0.0 too.
* Specificity ``TN / (TN + FP)`` is NaN only when every sample of the fold belongs to the class.
* AUC of a class is NaN when the fold has no positives or no negatives for it.
* Macro averages are the unweighted ``nanmean`` over classes: NaN entries are skipped. Macro F1 is the mean of
  per-class F1 (scikit-learn's ``average="macro"``), and macro AUC equals
  ``roc_auc_score(multi_class="ovr", average="macro")`` when every class is present.
* Over folds, means are ``nanmean`` and stds use ``ddof=1`` over the finite values; a std from fewer than two
  finite values (e.g. a single fold) is ``None`` in the JSON summary and NaN in DataFrames.

All values are fractions in [0, 1]; :func:`format_mean_std` turns them into the paper's ``"92.89 ± 0.42"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import (accuracy_score, brier_score_loss, confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score)

from ussf_lib.errors import UserError
from ussf_lib.paper import METRIC_NAMES, PER_CLASS_METRICS

#: Tolerance on ``probs`` rows summing to 1 (CSV rounding is fine; logits are not).
_PROB_SUM_TOL = 1e-2

#: Calibration metrics computed beside :data:`~ussf_lib.paper.METRIC_NAMES` (lower is better; not in the paper):
#: each fold's ``metrics.json`` and ``summary.json`` carry them like the others.
CALIBRATION_METRICS: tuple[str, ...] = ("ece", "brier")

#: Equal-width confidence bins of the expected calibration error and of the reliability diagram.
ECE_BINS = 15

#: How a patient's prediction is made from its images' (the rule ``summary.json``'s ``patient_level`` records).
PATIENT_RULE = "mean probability over a patient's images"

#: What happens to a patient whose images carry more than one label.
MIXED_LABEL_RULE = "patients whose images carry more than one label are left out (their label is ambiguous)"


def _nanmean(values: ArrayLike) -> float:
    """Mean of the finite values, NaN when there are none (no RuntimeWarning)."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _nanstd(values: ArrayLike) -> float:
    """Sample std (``ddof=1``) of the finite values, NaN when fewer than two."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.std(ddof=1)) if arr.size >= 2 else math.nan


def _json_float(value: Any) -> float | None:
    """A python float for JSON, ``None`` for NaN/None."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _check_labels(y_true: ArrayLike, n_classes: int, name: str = "y_true") -> np.ndarray:
    """``y_true`` as a 1-D int64 array of class indices in ``[0, n_classes)``."""
    arr = np.asarray(y_true)
    if arr.ndim != 1:
        raise UserError(f"{name} has shape {arr.shape}; pass a 1-D array of integer class indices")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        elif arr.dtype.kind == "b":
            arr = arr.astype(np.int64)
        else:
            raise UserError(f"{name} has dtype {arr.dtype}; pass integer class indices 0..{n_classes - 1}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n_classes)]
    if bad.size:
        raise UserError(f"{name} holds class index {int(bad[0])}, outside 0..{n_classes - 1}; "
                        f"labels must index the {n_classes} classes")
    return arr


def confusion(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> np.ndarray:
    """Confusion matrix of counts, shape ``(n_classes, n_classes)``: rows are true classes, columns predicted.

    Every class has its row and column even when absent from both ``y_true`` and ``y_pred``.
    """
    if n_classes < 1:
        raise UserError(f"n_classes={n_classes}; pass the number of classes (at least 1)")
    yt = _check_labels(y_true, n_classes, "y_true")
    yp = _check_labels(y_pred, n_classes, "y_pred")
    if yt.shape != yp.shape:
        raise UserError(f"y_true has {yt.size} labels but y_pred has {yp.size}; pass one prediction per label")
    return confusion_matrix(yt, yp, labels=list(range(n_classes))).astype(np.int64)


def _check_probs(probs: ArrayLike, n_classes: int, n_samples: int) -> np.ndarray:
    arr = np.asarray(probs, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != n_classes:
        raise UserError(f"probs has shape {arr.shape}; pass an (n_samples, {n_classes}) array, "
                        f"one column per class in class order")
    if arr.shape[0] != n_samples:
        raise UserError(f"probs has {arr.shape[0]} rows but y_true has {n_samples} labels; "
                        "pass one probability row per label")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise UserError("probs holds negative or non-finite values; pass softmax probabilities, not logits")
    sums = arr.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0))) if sums.size else 0
    if sums.size and abs(sums[worst] - 1.0) > _PROB_SUM_TOL:
        raise UserError(f"probs row {worst} sums to {sums[worst]:.4f}, not 1; pass softmax probabilities, "
                        "not logits")
    return arr


def top_label_confidence(y_true: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(confidence, correct)`` per sample: the top-class probability and whether that class (the argmax, the
    first class on ties, as everywhere here) is the true one (as 0.0/1.0). What ECE and the reliability diagram
    bin."""
    pr = np.asarray(probs, dtype=float)
    if pr.ndim != 2:
        raise UserError(f"probs has shape {pr.shape}; pass an (n_samples, n_classes) array")
    yt = _check_labels(y_true, pr.shape[1])
    pr = _check_probs(pr, pr.shape[1], yt.size)
    confidence = np.clip(pr.max(axis=1), 0.0, 1.0)
    correct = (pr.argmax(axis=1) == yt).astype(float)
    return confidence, correct


def confidence_bins(confidence: ArrayLike, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin index (0..n_bins-1) of each confidence: equal-width bins ``((b-1)/n, b/n]``, the first one closed at 0.

    The same assignment as :func:`sklearn.calibration.calibration_curve` (``strategy="uniform"``), so the ECE and
    the reliability diagram (:func:`ussf_lib.evaluation.plots.plot_calibration`) bin alike.
    """
    if int(n_bins) < 1:
        raise UserError(f"n_bins={n_bins}; pass at least 1 bin")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    return np.searchsorted(edges[1:-1], np.asarray(confidence, dtype=float))


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-class probability (Guo et al. 2017, eq. 3), equal-width bins.

    Each sample's confidence (its largest probability) goes into one of ``n_bins`` equal-width bins of [0, 1]
    (:func:`confidence_bins`); ECE is the sample-weighted mean over bins of ``|accuracy - mean confidence|``::

        ECE = sum_b (n_b / n) * |acc_b - conf_b| = sum_b |sum_{i in b} (correct_i - confidence_i)| / n

    0 for a model whose confidence matches its accuracy within every bin; at most 1. Empty bins add nothing.

    Written here on numpy because scikit-learn (1.9 at the time of writing) has no ECE: it ships the proper
    scoring rules (``brier_score_loss``, ``log_loss``) and the binary ``calibration_curve`` (the per-bin points of
    a reliability diagram, without the counts that weight them), and its requests for an ECE (issue #18268; pull
    requests #11096 and #28831, both closed) stalled on which estimator to adopt -- a binned ECE depends on the
    number and placement of the bins and is biased, and the top-label reduction of a multi-class problem is one
    choice among several (class-wise, L1 or L2). This is the usual deep-learning figure: top label, L1, 15 bins.
    """
    confidence, correct = top_label_confidence(y_true, probs)
    if confidence.size == 0:
        raise UserError("y_true is empty; the calibration error needs at least one prediction")
    bins = confidence_bins(confidence, n_bins)
    gap = np.bincount(bins, weights=correct - confidence, minlength=int(n_bins))
    return float(np.abs(gap).sum() / confidence.size)


def brier_score(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Multi-class Brier score: mean over samples of ``sum_k (p_k - [y == k])^2``, in [0, 2] (0 is perfect).

    :func:`sklearn.metrics.brier_score_loss`, which takes ``(n, n_classes)`` probabilities since scikit-learn
    1.7, called with ``labels=range(n_classes)`` (a fold lacking a class keeps its column) and
    ``scale_by_half=False``, so that two classes get the same sum over classes as more (its default halves the
    binary score only). Its check that rows sum to 1 within ~1.5e-8 is silenced: rows were already checked to
    the tolerance used throughout this module (float32 softmax outputs and CSV rounding miss 1.5e-8).
    """
    pr = np.asarray(probs, dtype=float)
    if pr.ndim != 2:
        raise UserError(f"probs has shape {pr.shape}; pass an (n_samples, n_classes) array")
    yt = _check_labels(y_true, pr.shape[1])
    pr = _check_probs(pr, pr.shape[1], yt.size)
    if yt.size == 0:
        raise UserError("y_true is empty; the Brier score needs at least one prediction")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The y_prob values do not sum to one", category=UserWarning)
        return float(brier_score_loss(yt, pr, labels=list(range(pr.shape[1])), scale_by_half=False))


def temperature_scale(probs: ArrayLike, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by ``temperature``: ``softmax(log(p) / T)`` (the log-probabilities
    differ from the logits by a constant per row, which the softmax cancels). ``T`` > 0 keeps every argmax."""
    logp = np.log(np.clip(np.asarray(probs, dtype=float), 1e-12, None)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    scaled = np.exp(logp)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(y_true: ArrayLike, probs: ArrayLike) -> float:
    """The temperature minimizing the negative log-likelihood of held-out predictions (Guo et al. 2017), searched
    on log T in [-3, 3] by :func:`scipy.optimize.minimize_scalar` (one parameter; no library fits it)."""
    from scipy.optimize import minimize_scalar

    pr = np.asarray(probs, dtype=float)
    yt = _check_labels(y_true, pr.shape[1])
    if yt.size == 0:
        raise UserError("no held-out predictions to fit a temperature on")

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(temperature_scale(pr, np.exp(log_t))[np.arange(yt.size), yt], 1e-12,
                                     None)).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded").x))


def classification_metrics(y_true: ArrayLike, probs: ArrayLike, classes: Sequence[str]) -> dict:
    """Accuracy, macro one-vs-rest metrics, a per-class table and the confusion matrix for one fold.

    ``y_true`` holds integer class indices into ``classes``; ``probs`` is ``(n, len(classes))`` with rows
    summing to 1; the prediction is the argmax (first class on ties). Returns::

        {"accuracy", "precision", "sensitivity", "specificity", "f1", "auc": float (macro, nanmean over classes),
         "ece", "brier": float (calibration: expected_calibration_error, brier_score),
         "per_class": DataFrame(index=classes, columns=[precision, sensitivity, specificity, f1, auc, support]),
         "confusion": ndarray (n_classes, n_classes), rows = true}

    See the module docstring for NaN and zero-division conventions.
    """
    classes = [str(c) for c in classes]
    n_classes = len(classes)
    if n_classes < 2:
        raise UserError(f"classes={classes}; classification metrics need at least 2 classes")
    if len(set(classes)) != n_classes:
        raise UserError(f"classes={classes} has duplicates; pass each class name once")
    yt = _check_labels(y_true, n_classes)
    if yt.size == 0:
        raise UserError("y_true is empty; metrics need at least one labelled prediction")
    pr = _check_probs(probs, n_classes, yt.size)
    yp = pr.argmax(axis=1)
    labels = list(range(n_classes))

    cm = confusion_matrix(yt, yp, labels=labels).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        yt, yp, labels=labels, average=None, zero_division=0
    )
    precision = precision.astype(float)
    recall = recall.astype(float)
    f1 = f1.astype(float)
    support = support.astype(np.int64)

    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    negatives = tn + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = np.where(negatives > 0, tn / np.maximum(negatives, 1), np.nan)

    absent = support == 0
    predicted = cm.sum(axis=0)
    recall[absent] = np.nan
    f1[absent] = np.nan
    precision[absent & (predicted == 0)] = np.nan

    auc = np.full(n_classes, np.nan)
    for k in labels:
        positives = yt == k
        if 0 < positives.sum() < yt.size:
            auc[k] = roc_auc_score(positives, pr[:, k])

    per_class = pd.DataFrame(
        {
            "precision": precision,
            "sensitivity": recall,
            "specificity": specificity,
            "f1": f1,
            "auc": auc,
            "support": support,
        },
        index=pd.Index(classes, name="class"),
    )
    out: dict[str, Any] = {"accuracy": float(accuracy_score(yt, yp))}
    for name in PER_CLASS_METRICS:
        out[name] = _nanmean(per_class[name].to_numpy())
    out["ece"] = expected_calibration_error(yt, pr)
    out["brier"] = brier_score(yt, pr)
    out["per_class"] = per_class
    out["confusion"] = cm
    return out


def _frame_to_arrays(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, probs)`` from a predictions table: ``label`` (class name) and ``prob_<class>`` columns.

    Probability columns are read in the order of ``classes``, whatever their order in the table.
    """
    classes = [str(c) for c in classes]
    if not isinstance(pred, pd.DataFrame):
        raise UserError(f"predictions must be a DataFrame, got {type(pred).__name__}; read the CSV with pandas")
    prob_cols = [f"prob_{c}" for c in classes]
    missing = [c for c in ["label", *prob_cols] if c not in pred.columns]
    if missing:
        raise UserError(f"predictions table lacks column(s) {missing}; it needs label and prob_<class> for "
                        f"each of {classes}")
    extra = [c for c in pred.columns if str(c).startswith("prob_") and c not in prob_cols]
    if extra:
        raise UserError(f"predictions table has {extra} for classes not in {classes}; pass the classes the "
                        "model was trained on")
    if len(pred) == 0:
        raise UserError("predictions table is empty; metrics need at least one row")
    labels = pred["label"].astype(str)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise UserError(f"label {unknown[0]!r} in the predictions table is not one of {classes}; "
                        "pass the classes the model was trained on")
    index = {c: i for i, c in enumerate(classes)}
    y_true = labels.map(index).to_numpy(dtype=np.int64)
    probs = pred[prob_cols].to_numpy(dtype=float)
    return y_true, probs


def predictions_frame_metrics(pred: pd.DataFrame, classes: Sequence[str]) -> dict:
    """:func:`classification_metrics` from a predictions table.

    ``pred`` has columns ``label`` (class name) and ``prob_<class>`` for each class (others such as ``path``,
    ``fold``, ``pred`` are ignored; the prediction is recomputed as the argmax of the probabilities).
    """
    y_true, probs = _frame_to_arrays(pred, classes)
    return classification_metrics(y_true, probs, classes)


def _check_per_fold(per_fold: Sequence[dict]) -> list[dict]:
    folds = list(per_fold)
    if not folds:
        raise UserError("no folds to summarise; pass one metrics dict per fold")
    for i, fold in enumerate(folds):
        missing = [m for m in METRIC_NAMES if m not in fold]
        if missing:
            raise UserError(f"fold {i} metrics lack {missing}; pass dicts from classification_metrics")
    return folds


def summarize_folds(per_fold: Sequence[dict], classes: Sequence[str]) -> dict:
    """Mean and std (``ddof=1``) over folds of each headline metric, JSON-serialisable.

    Returns ``{metric: {"mean": float|None, "std": float|None} for metric in METRIC_NAMES,
    "per_fold": [{metric: float|None, ...}, ...], "classes": [...], "n_folds": k}``, with
    :data:`CALIBRATION_METRICS` beside the others when every fold has them. Means skip NaN folds; the std is
    ``None`` with fewer than two finite fold values (e.g. a single fold). A ``"fold"`` key in an input dict is
    carried into its ``per_fold`` entry.
    """
    folds = _check_per_fold(per_fold)
    names = [*METRIC_NAMES, *(m for m in CALIBRATION_METRICS if all(m in f for f in folds))]
    summary: dict[str, Any] = {}
    for name in names:
        values = [np.nan if f[name] is None else float(f[name]) for f in folds]
        summary[name] = {"mean": _json_float(_nanmean(values)), "std": _json_float(_nanstd(values))}
    entries = []
    for f in folds:
        entry: dict[str, Any] = {}
        if "fold" in f:
            fold_id = f["fold"]
            entry["fold"] = fold_id.item() if isinstance(fold_id, np.generic) else fold_id
        entry.update({name: _json_float(f[name]) for name in names})
        entries.append(entry)
    summary["per_fold"] = entries
    summary["classes"] = [str(c) for c in classes]
    summary["n_folds"] = len(folds)
    return summary


def per_class_summary(per_fold: Sequence[dict], classes: Sequence[str]) -> pd.DataFrame:
    """Table 2: per-class one-vs-rest metrics as mean and std (``ddof=1``) over folds.

    One row per class, in class order; columns ``class``, ``<metric>_mean``, ``<metric>_std`` for precision,
    sensitivity, specificity, f1, auc, and ``support`` (total over folds). A fold where a metric is NaN for a
    class (e.g. the class is absent) is skipped for that class and metric; a std from fewer than two values
    is NaN.
    """
    folds = _check_per_fold(per_fold)
    classes = [str(c) for c in classes]
    tables = []
    for i, fold in enumerate(folds):
        table = fold.get("per_class")
        if not isinstance(table, pd.DataFrame):
            raise UserError(f"fold {i} has no per_class table; pass dicts from classification_metrics")
        missing = [c for c in classes if c not in table.index]
        if missing:
            raise UserError(f"fold {i} per_class table lacks class(es) {missing}; pass the classes the folds "
                            "were computed with")
        tables.append(table.loc[classes])
    rows = []
    for cls in classes:
        row: dict[str, Any] = {"class": cls}
        for name in PER_CLASS_METRICS:
            values = [float(t.at[cls, name]) for t in tables]
            row[f"{name}_mean"] = _nanmean(values)
            row[f"{name}_std"] = _nanstd(values)
        row["support"] = int(sum(int(t.at[cls, "support"]) for t in tables))
        rows.append(row)
    return pd.DataFrame(rows)


def temperature_summary(pred: pd.DataFrame, classes: Sequence[str], temperatures: dict[int, float]) -> dict | None:
    """ECE and Brier of the folds' predictions after temperature scaling (``temperatures``: fold -> T fitted on
    held-out training images), beside the raw ones, as mean ± std over those folds; ``None`` without any."""
    raw, scaled = {"ece": [], "brier": []}, {"ece": [], "brier": []}
    for fold, temperature in sorted(temperatures.items()):
        y, probs = _frame_to_arrays(pred[pred["fold"] == fold], classes)
        for values, p in ((raw, probs), (scaled, temperature_scale(probs, temperature))):
            values["ece"].append(expected_calibration_error(y, p))
            values["brier"].append(brier_score(y, p))
    if not temperatures:
        return None
    summary: dict = {"temperatures": {str(k): v for k, v in sorted(temperatures.items())},
                     "rule": "softmax(log p / T), T fitted per fold on held-out training images"}
    for name in ("ece", "brier"):
        summary[name] = {"mean": _nanmean(scaled[name]), "std": _nanstd(scaled[name])}
        summary[f"{name}_raw"] = {"mean": _nanmean(raw[name]), "std": _nanstd(raw[name])}
    return summary


def fold_confusions(pred: pd.DataFrame, classes: Sequence[str]) -> dict[int, np.ndarray]:
    """Confusion matrix (rows true, columns predicted = argmax of ``prob_<class>``) of each fold, keyed by fold.

    ``pred`` is a predictions table with ``fold``, ``label`` and ``prob_<class>`` columns (e.g. every fold's
    ``predictions.csv`` concatenated); the folds' matrices add up to the pooled one. Introduced in
    ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    if not isinstance(pred, pd.DataFrame) or "fold" not in pred.columns:
        raise UserError("predictions table lacks a fold column; read every fold's predictions.csv with "
                        "ussf_lib.evaluation.report.load_predictions")
    out: dict[int, np.ndarray] = {}
    for fold_id, rows in pred.groupby("fold", sort=True):
        y_true, probs = _frame_to_arrays(rows, classes)
        out[int(fold_id)] = confusion(y_true, probs.argmax(axis=1), len(classes))
    return out


def pooled_confusion(per_fold: Sequence[dict]) -> np.ndarray:
    """Sum of the folds' confusion matrices (every sample counted once when folds partition the data)."""
    mats = [np.asarray(f["confusion"]) for f in per_fold] if per_fold else []
    if not mats:
        raise UserError("no folds to pool; pass one metrics dict per fold")
    shapes = {m.shape for m in mats}
    if len(shapes) != 1:
        raise UserError(f"fold confusion matrices have different shapes {sorted(shapes)}; "
                        "compute every fold with the same classes")
    return np.sum(mats, axis=0).astype(np.int64)


def summarize_predictions(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[dict, pd.DataFrame]:
    """Per-fold metrics from a predictions table with a ``fold`` column, summarised over folds.

    Returns ``(summarize_folds(...), per_class_summary(...))``; folds are taken in sorted order and each
    ``per_fold`` entry carries its ``fold`` id.
    """
    if not isinstance(pred, pd.DataFrame) or "fold" not in pred.columns:
        raise UserError("predictions table lacks a fold column; use predictions_frame_metrics for one fold")
    per_fold = []
    for fold_id, rows in pred.groupby("fold", sort=True):
        metrics = predictions_frame_metrics(rows, classes)
        metrics["fold"] = fold_id.item() if isinstance(fold_id, np.generic) else fold_id
        per_fold.append(metrics)
    return summarize_folds(per_fold, classes), per_class_summary(per_fold, classes)


def patient_predictions(pred: pd.DataFrame, classes: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Image predictions aggregated to one row per patient (and fold): :data:`PATIENT_RULE`.

    ``pred`` has ``group`` (patient id), ``fold``, ``label`` and ``prob_<class>`` columns. Each patient's
    probability row is the mean of its images' rows (it sums to 1 again, and its argmax is the patient's
    prediction); its label is the one its images share. Returns ``(table, mixed)``: ``table`` has columns
    ``group``, ``fold``, ``label``, ``images`` (how many were averaged) and ``prob_<class>``, sorted by fold then
    group, which every function here that reads a predictions table accepts; ``mixed`` lists the patients whose
    images carry more than one label, which are left out (:data:`MIXED_LABEL_RULE`). A patient whose images sit in
    two folds (splits that did not keep patients whole) gives one row per fold: each fold's model scores its own.
    """
    classes = [str(c) for c in classes]
    _frame_to_arrays(pred, classes)  # checks the label and prob_<class> columns
    missing = [c for c in ("group", "fold") if c not in pred.columns]
    if missing:
        raise UserError(f"predictions table lacks column(s) {missing}; patient-level metrics need each image's "
                        "patient (group) and fold")
    if pred["group"].isna().any():
        raise UserError(f"{int(pred['group'].isna().sum())} prediction(s) have no group; every image needs its "
                        "patient id")
    prob_cols = [f"prob_{c}" for c in classes]
    frame = pred.assign(group=pred["group"].astype(str), label=pred["label"].astype(str))
    labels_per_patient = frame.groupby("group")["label"].nunique()
    mixed = sorted(labels_per_patient.index[labels_per_patient > 1])
    frame = frame[~frame["group"].isin(mixed)]
    grouped = frame.groupby(["fold", "group"], sort=True)
    table = grouped[prob_cols].mean()
    table.insert(0, "images", grouped.size())
    table.insert(0, "label", grouped["label"].first())
    table = table.reset_index()[["group", "fold", "label", "images", *prob_cols]]
    return table, mixed


def format_mean_std(mean: float | None, std: float | None, percent: bool = True, digits: int = 2) -> str:
    """``"92.89 ± 0.42"`` from fractions (``percent=True`` multiplies by 100).

    A missing std (None/NaN, e.g. one fold) gives the mean alone, ``"92.89"``; a missing mean gives ``"n/a"``.
    """
    if mean is None or not math.isfinite(float(mean)):
        return "n/a"
    scale = 100.0 if percent else 1.0
    text = f"{float(mean) * scale:.{digits}f}"
    if std is None or not math.isfinite(float(std)):
        return text
    return f"{text} ± {float(std) * scale:.{digits}f}"

"""Worked examples for ussf_lib.evaluation.metrics, checked against scikit-learn and against counts written out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from ussf_lib.errors import UserError
from ussf_lib.paper import METRIC_NAMES
from ussf_lib.evaluation.metrics import (
    classification_metrics,
    confusion,
    fold_confusions,
    format_mean_std,
    per_class_summary,
    pooled_confusion,
    predictions_frame_metrics,
    summarize_folds,
    summarize_predictions,
)

CLASSES3 = ["a", "b", "c"]

# A 3-class fold of 10 images. True labels and argmax predictions:
#   true a: predicted a, a, a, b        -> row a = [3, 1, 0]
#   true b: predicted b, b, c           -> row b = [0, 2, 1]
#   true c: predicted c, c, a           -> row c = [1, 0, 2]
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
CM_BY_HAND = np.array([[3, 1, 0],
                       [0, 2, 1],
                       [1, 0, 2]])
# One-vs-rest counts read off CM_BY_HAND (n = 10):
#   a: TP 3, FP 1 (c->a), FN 1 (a->b), TN 5
#   b: TP 2, FP 1 (a->b), FN 1 (b->c), TN 6
#   c: TP 2, FP 1 (b->c), FN 1 (c->a), TN 6
SPECIFICITY_BY_HAND = np.array([5 / 6, 6 / 7, 6 / 7])
PRECISION_BY_HAND = np.array([3 / 4, 2 / 3, 2 / 3])
SENSITIVITY_BY_HAND = np.array([3 / 4, 2 / 3, 2 / 3])


def probs_for(y_pred: np.ndarray, n_classes: int, seed: int = 0) -> np.ndarray:
    """Random probability rows whose argmax is ``y_pred`` (varied confidence, so AUCs are non-trivial)."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.0, 1.0, size=(len(y_pred), n_classes))
    raw[np.arange(len(y_pred)), y_pred] = raw.max(axis=1) + rng.uniform(0.1, 1.0, size=len(y_pred))
    return raw / raw.sum(axis=1, keepdims=True)


PROBS = probs_for(Y_PRED, 3)


def test_probs_helper_has_the_intended_argmax():
    assert np.array_equal(PROBS.argmax(1), Y_PRED)
    assert np.allclose(PROBS.sum(1), 1.0)


def test_confusion_matches_hand_counts():
    assert np.array_equal(confusion(Y_TRUE, Y_PRED, 3), CM_BY_HAND)
    # A class nobody has or predicts still gets its row and column.
    cm = confusion([0, 1], [1, 1], 4)
    assert cm.shape == (4, 4)
    assert cm.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_classification_metrics_worked_example():
    m = classification_metrics(Y_TRUE, PROBS, CLASSES3)
    assert np.array_equal(m["confusion"], CM_BY_HAND)
    pc = m["per_class"]
    assert list(pc.index) == CLASSES3
    assert list(pc.columns) == ["precision", "sensitivity", "specificity", "f1", "auc", "support"]

    # Hand-computed one-vs-rest values.
    np.testing.assert_allclose(pc["specificity"], SPECIFICITY_BY_HAND)
    np.testing.assert_allclose(pc["precision"], PRECISION_BY_HAND)
    np.testing.assert_allclose(pc["sensitivity"], SENSITIVITY_BY_HAND)
    assert pc["support"].tolist() == [4, 3, 3]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["specificity"] == pytest.approx(SPECIFICITY_BY_HAND.mean())

    # The same values from scikit-learn.
    p, r, f, s = precision_recall_fscore_support(Y_TRUE, Y_PRED, labels=[0, 1, 2], average=None)
    np.testing.assert_allclose(pc["precision"], p)
    np.testing.assert_allclose(pc["sensitivity"], r)
    np.testing.assert_allclose(pc["f1"], f)
    assert m["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED))
    for name, avg in (("precision", p), ("sensitivity", r), ("f1", f)):
        assert m[name] == pytest.approx(avg.mean())
    macro = precision_recall_fscore_support(Y_TRUE, Y_PRED, average="macro")
    assert (m["precision"], m["sensitivity"], m["f1"]) == pytest.approx(macro[:3])

    # AUC: per class one-vs-rest, and the macro equals sklearn's multi_class='ovr'.
    for k in range(3):
        assert pc["auc"].iloc[k] == pytest.approx(roc_auc_score(Y_TRUE == k, PROBS[:, k]))
    assert m["auc"] == pytest.approx(roc_auc_score(Y_TRUE, PROBS, multi_class="ovr", average="macro"))

    for name in METRIC_NAMES:
        assert isinstance(m[name], float)


def test_perfect_predictions():
    y = np.array([0, 1, 2, 0, 1, 2])
    m = classification_metrics(y, np.eye(3)[y], CLASSES3)
    for name in METRIC_NAMES:
        assert m[name] == pytest.approx(1.0)


def test_fold_missing_a_class_keeps_columns_aligned():
    # Four classes; class "c" (index 2) is absent from y_true and never predicted.
    classes = ["a", "b", "c", "d"]
    y_true = np.array([0, 0, 1, 1, 3, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 3, 3, 0])
    probs = probs_for(y_pred, 4, seed=1)
    m = classification_metrics(y_true, probs, classes)
    pc = m["per_class"]
    assert m["confusion"].shape == (4, 4)
    assert m["confusion"][2].sum() == 0 and m["confusion"][:, 2].sum() == 0

    row_c = pc.loc["c"]
    assert math.isnan(row_c["sensitivity"]) and math.isnan(row_c["auc"]) and math.isnan(row_c["f1"])
    assert math.isnan(row_c["precision"])  # never predicted and absent: nothing to measure
    assert row_c["specificity"] == pytest.approx(1.0)  # 7 negatives, no false positives
    assert row_c["support"] == 0

    # The other classes carry the values sklearn gives with explicit labels.
    present = [0, 1, 3]
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=present, average=None)
    np.testing.assert_allclose(pc.loc[["a", "b", "d"], "precision"], p)
    np.testing.assert_allclose(pc.loc[["a", "b", "d"], "sensitivity"], r)
    np.testing.assert_allclose(pc.loc[["a", "b", "d"], "f1"], f)
    assert pc.loc[["a", "b", "d"], "support"].tolist() == s.tolist()
    for cls, k in zip(["a", "b", "d"], present):
        assert pc.loc[cls, "auc"] == pytest.approx(roc_auc_score(y_true == k, probs[:, k]))

    # Macro averages skip the NaN class (nanmean over the three present classes).
    assert m["sensitivity"] == pytest.approx(r.mean())
    assert m["precision"] == pytest.approx(p.mean())
    assert m["specificity"] == pytest.approx(pc["specificity"].mean())
    assert not math.isnan(m["auc"])


def test_absent_class_that_is_predicted_has_precision_zero():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 2, 1, 1])  # class 2 absent but predicted once: a false positive
    m = classification_metrics(y_true, probs_for(y_pred, 3), CLASSES3)
    assert m["per_class"].loc["c", "precision"] == 0.0
    assert math.isnan(m["per_class"].loc["c", "sensitivity"])


def test_present_class_never_predicted_scores_zero():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 1])  # class c is present, never predicted
    m = classification_metrics(y_true, probs_for(y_pred, 3), CLASSES3)
    row = m["per_class"].loc["c"]
    assert row["precision"] == 0.0 and row["sensitivity"] == 0.0 and row["f1"] == 0.0
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert (m["precision"], m["sensitivity"], m["f1"]) == pytest.approx((p, r, f))


def test_predictions_frame_reads_prob_columns_by_class_name():
    classes = ["normal", "benign", "primary"]
    names = np.array(classes)[Y_TRUE]
    frame = pd.DataFrame({
        "path": [f"img{i}.png" for i in range(10)],
        "label": names,
        "prob_normal": PROBS[:, 0],
        "prob_benign": PROBS[:, 1],
        "prob_primary": PROBS[:, 2],
    })
    shuffled = frame[["prob_primary", "path", "prob_normal", "label", "prob_benign"]]
    m = predictions_frame_metrics(shuffled, classes)
    ref = classification_metrics(Y_TRUE, PROBS, classes)
    assert np.array_equal(m["confusion"], CM_BY_HAND)
    for name in METRIC_NAMES:
        assert m[name] == pytest.approx(ref[name])
    pd.testing.assert_frame_equal(m["per_class"], ref["per_class"])


def _three_folds():
    rng = np.random.default_rng(3)
    folds = []
    for seed in range(3):
        y = rng.integers(0, 3, size=30)
        y[:3] = [0, 1, 2]
        pred = np.where(rng.uniform(size=30) < 0.7, y, rng.integers(0, 3, size=30))
        folds.append(classification_metrics(y, probs_for(pred, 3, seed=seed), CLASSES3))
    return folds


def test_summarize_folds_uses_ddof1_and_is_json_serialisable():
    folds = _three_folds()
    summary = summarize_folds(folds, CLASSES3)
    assert summary["n_folds"] == 3
    assert summary["classes"] == CLASSES3
    for name in METRIC_NAMES:
        values = np.array([f[name] for f in folds])
        assert summary[name]["mean"] == pytest.approx(values.mean())
        assert summary[name]["std"] == pytest.approx(np.std(values, ddof=1))
        assert type(summary[name]["mean"]) is float
    assert [e["accuracy"] for e in summary["per_fold"]] == pytest.approx([f["accuracy"] for f in folds])
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text)["n_folds"] == 3


def test_summarize_single_fold_std_is_none():
    summary = summarize_folds(_three_folds()[:1], CLASSES3)
    assert summary["accuracy"]["std"] is None
    assert summary["accuracy"]["mean"] is not None
    json.dumps(summary, allow_nan=False)
    table = per_class_summary(_three_folds()[:1], CLASSES3)
    assert table["precision_std"].isna().all()


def test_per_class_summary_and_pooled_confusion():
    folds = _three_folds()
    table = per_class_summary(folds, CLASSES3)
    assert table["class"].tolist() == CLASSES3
    expected_cols = ["class"] + [f"{m}_{s}" for m in ("precision", "sensitivity", "specificity", "f1", "auc")
                                 for s in ("mean", "std")] + ["support"]
    assert list(table.columns) == expected_cols
    for cls in CLASSES3:
        for metric in ("precision", "sensitivity", "specificity", "f1", "auc"):
            values = np.array([f["per_class"].loc[cls, metric] for f in folds])
            row = table.set_index("class").loc[cls]
            assert row[f"{metric}_mean"] == pytest.approx(values.mean())
            assert row[f"{metric}_std"] == pytest.approx(np.std(values, ddof=1))
    pooled = pooled_confusion(folds)
    assert np.array_equal(pooled, sum(f["confusion"] for f in folds))
    assert table["support"].tolist() == pooled.sum(axis=1).tolist() == [
        sum(int(f["per_class"].loc[c, "support"]) for f in folds) for c in CLASSES3]


def test_per_class_summary_skips_fold_where_class_absent():
    folds = _three_folds()
    y = np.array([0, 0, 1, 1])  # class c absent from this fold
    folds.append(classification_metrics(y, probs_for(y, 3), CLASSES3))
    table = per_class_summary(folds, CLASSES3).set_index("class")
    values = np.array([f["per_class"].loc["c", "sensitivity"] for f in folds[:3]])
    assert table.loc["c", "sensitivity_mean"] == pytest.approx(values.mean())
    assert table.loc["c", "sensitivity_std"] == pytest.approx(np.std(values, ddof=1))


def test_summarize_predictions_by_fold():
    classes = ["x", "y", "z"]
    rows = []
    folds = []
    for k, seed in enumerate((5, 6)):
        rng = np.random.default_rng(seed)
        y = np.tile([0, 1, 2], 4)
        pred = np.where(rng.uniform(size=12) < 0.6, y, rng.integers(0, 3, size=12))
        probs = probs_for(pred, 3, seed=seed)
        folds.append(classification_metrics(y, probs, classes))
        frame = pd.DataFrame({"path": [f"f{k}_{i}" for i in range(12)], "label": np.array(classes)[y], "fold": k})
        for i, c in enumerate(classes):
            frame[f"prob_{c}"] = probs[:, i]
        rows.append(frame)
    pred_table = pd.concat(rows[::-1], ignore_index=True)  # folds out of order in the table
    summary, table = summarize_predictions(pred_table, classes)
    assert summary["n_folds"] == 2
    assert [e["fold"] for e in summary["per_fold"]] == [0, 1]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean([f["accuracy"] for f in folds]))
    pd.testing.assert_frame_equal(table, per_class_summary(folds, classes))
    json.dumps(summary, allow_nan=False)


def test_fold_confusions_split_the_hand_counted_matrix_by_fold():
    frame = pd.DataFrame({"label": np.array(CLASSES3)[Y_TRUE], "fold": [1, 0] * 5})
    for i, c in enumerate(reversed(CLASSES3)):  # column order differs from the class order on purpose
        frame[f"prob_{c}"] = PROBS[:, len(CLASSES3) - 1 - i]
    per_fold = fold_confusions(frame, CLASSES3)
    assert list(per_fold) == [0, 1]
    even, odd = np.arange(0, 10, 2), np.arange(1, 10, 2)  # fold 1 holds the even rows, fold 0 the odd ones
    np.testing.assert_array_equal(per_fold[1], confusion(Y_TRUE[even], Y_PRED[even], 3))
    np.testing.assert_array_equal(per_fold[0], confusion(Y_TRUE[odd], Y_PRED[odd], 3))
    np.testing.assert_array_equal(per_fold[0] + per_fold[1], CM_BY_HAND)
    with pytest.raises(UserError, match="lacks a fold column"):
        fold_confusions(frame.drop(columns="fold"), CLASSES3)


def test_user_errors():
    with pytest.raises(UserError, match="shape"):
        classification_metrics(Y_TRUE, PROBS[:, :2], CLASSES3)
    with pytest.raises(UserError, match="rows"):
        classification_metrics(Y_TRUE[:5], PROBS, CLASSES3)
    with pytest.raises(UserError, match="outside"):
        classification_metrics(np.array([0, 3]), PROBS[:2], CLASSES3)
    with pytest.raises(UserError, match="logits"):
        classification_metrics(Y_TRUE, PROBS * 3, CLASSES3)
    frame = pd.DataFrame({"label": ["a", "q"], "prob_a": [0.5, 0.5], "prob_b": [0.5, 0.5]})
    with pytest.raises(UserError, match="'q'"):
        predictions_frame_metrics(frame, ["a", "b"])
    with pytest.raises(UserError, match="prob_c"):
        predictions_frame_metrics(frame.assign(label="a"), ["a", "b", "c"])
    with pytest.raises(UserError, match="fold"):
        summarize_predictions(frame.assign(label="a"), ["a", "b"])
    with pytest.raises(UserError):
        summarize_folds([], CLASSES3)


def test_format_mean_std():
    assert format_mean_std(0.92891, 0.00421) == "92.89 ± 0.42"
    assert format_mean_std(0.5, 0.25, percent=False, digits=3) == "0.500 ± 0.250"
    assert format_mean_std(0.9, None) == "90.00"
    assert format_mean_std(0.9, float("nan")) == "90.00"
    assert format_mean_std(None, None) == "n/a"

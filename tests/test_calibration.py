"""Calibration (ECE, Brier, calibration.png) and patient-level metrics, on examples worked out by hand.

The run folders here are written by hand (classes.json, splits.csv, folds/K/predictions.csv): write_report needs
nothing else, and no model is trained.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve

from ussf_lib.evaluation.metrics import (CALIBRATION_METRICS, PATIENT_RULE, brier_score, classification_metrics,
                                         expected_calibration_error, patient_predictions, summarize_folds)
from ussf_lib.evaluation.plots import plot_calibration
from ussf_lib.evaluation.report import run_groups, write_report
from ussf_lib.errors import UserError


def _two_class(p_first: list[float]) -> np.ndarray:
    p = np.asarray(p_first, dtype=float)
    return np.column_stack([p, 1.0 - p])


# --- ECE ------------------------------------------------------------------------------------------------------

def test_ece_is_zero_when_confidence_matches_accuracy_in_every_bin():
    # 10 predictions at confidence 0.8, 8 of them right; 20 at confidence 0.65, 13 of them right
    probs = np.vstack([_two_class([0.8] * 10), _two_class([0.65] * 20)])
    y = np.array([0] * 8 + [1] * 2 + [0] * 13 + [1] * 7)
    assert expected_calibration_error(y, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_worked_example():
    # 15 bins of width 1/15. Confidences (top-class probabilities) and whether the argmax is right:
    #   0.9  right  -> bin (13/15, 14/15] = (0.867, 0.933]
    #   0.9  wrong  -> same bin: accuracy 0.5, mean confidence 0.9 -> |gap| 0.4, weight 2/4 -> 0.2
    #   0.65 right  -> bin (0.6, 0.667]:  |1 - 0.65| * 1/4 = 0.0875
    #   0.7  right  -> bin (0.667, 0.733]: |1 - 0.7| * 1/4 = 0.075      (class 1 at 0.7)
    probs = _two_class([0.9, 0.9, 0.65, 0.3])
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(y, probs) == pytest.approx(0.2 + 0.0875 + 0.075)
    # one bin: |overall accuracy - mean confidence| = |3/4 - (0.9 + 0.9 + 0.65 + 0.7)/4|
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(abs(0.75 - 3.15 / 4))
    # always right at confidence 1: calibrated; always wrong at confidence 1: the worst there is
    assert expected_calibration_error([0, 1], np.eye(2)) == 0.0
    assert expected_calibration_error([1, 0], np.eye(2)) == 1.0


def test_ece_agrees_with_sklearns_calibration_curve_weighted_by_bin_counts():
    rng = np.random.default_rng(0)
    raw = rng.gamma(1.0, size=(200, 4))
    probs = raw / raw.sum(axis=1, keepdims=True)
    y = rng.integers(0, 4, size=200)
    confidence, correct = probs.max(1), (probs.argmax(1) == y).astype(int)
    accuracy, mean_conf = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 16)[1:-1], confidence), minlength=15)
    expected = np.sum(np.abs(accuracy - mean_conf) * counts[counts > 0]) / 200
    assert expected_calibration_error(y, probs) == pytest.approx(expected)


# --- Brier ----------------------------------------------------------------------------------------------------

def test_brier_score_by_hand():
    # [0.7, 0.2, 0.1], true 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14;  [0.2, 0.5, 0.3], true 2: 0.2^2 + 0.5^2 + 0.7^2 = 0.78
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    assert brier_score([0, 2], probs) == pytest.approx((0.14 + 0.78) / 2)
    # Two classes: the sum over both classes (twice the textbook binary score), so the scale matches 3+ classes.
    # [0.8, 0.2] true 1: 0.64 + 0.64;  [0.6, 0.4] true 0: 0.16 + 0.16
    assert brier_score([1, 0], _two_class([0.8, 0.6])) == pytest.approx((1.28 + 0.32) / 2)
    # a fold lacking a class keeps its column: true 0 at [0.5, 0.25, 0.25] -> 0.25 + 0.0625 + 0.0625
    assert brier_score([0], np.array([[0.5, 0.25, 0.25]])) == pytest.approx(0.375)


def test_brier_takes_float32_rows_without_sklearns_sum_warning():
    probs = np.array([[0.7, 0.2, 0.1]], dtype=np.float32).astype(float)  # sums to 1 within float32, not 1.5e-8
    probs[0, 0] += 3e-7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert brier_score([0], probs) == pytest.approx(0.14, abs=1e-5)


def test_fold_metrics_and_summary_carry_ece_and_brier():
    y = np.array([0, 1, 0, 1])
    folds = [classification_metrics(y, _two_class(p), ["a", "b"]) for p in ([0.9, 0.9, 0.65, 0.3],
                                                                              [0.6, 0.2, 0.7, 0.45])]
    assert folds[0]["ece"] == pytest.approx(0.3625)
    assert folds[0]["brier"] == pytest.approx(brier_score(y, _two_class([0.9, 0.9, 0.65, 0.3])))
    summary = summarize_folds(folds, ["a", "b"])
    for name in CALIBRATION_METRICS:
        values = [f[name] for f in folds]
        assert summary[name] == {"mean": pytest.approx(np.mean(values)), "std": pytest.approx(np.std(values, ddof=1))}
        assert [e[name] for e in summary["per_fold"]] == pytest.approx(values)


def test_calibration_inputs_are_checked():
    with pytest.raises(UserError, match="not 1"):
        expected_calibration_error([0], np.array([[2.0, 3.0]]))
    with pytest.raises(UserError, match="outside 0..1"):
        brier_score([2], _two_class([0.5]))


# --- hand-made run folders ------------------------------------------------------------------------------------

CLASSES = ["a", "b"]

# Two folds of patients (label; each image's prob_a). A patient's prediction is the mean of its images' prob_a.
#   fold 0: A (a) 0.9, 0.3 -> 0.6 right    B (b) 0.2, 0.4 -> 0.3 right   C (a) 0.4, 0.2 -> 0.3 wrong
#           D (b) 0.1 -> right                                            patient accuracy 3/4, images 4/7
#   fold 1: E (a) 0.7, 0.9 -> 0.8 right    F (b) 0.6, 0.2, 0.1 -> 0.3 right   G (b) 0.55, 0.65 -> 0.6 wrong
#           H (a) 0.35 -> wrong                                            patient accuracy 2/4, images 4/8
PATIENTS = {
    0: [("A", "a", [0.9, 0.3]), ("B", "b", [0.2, 0.4]), ("C", "a", [0.4, 0.2]), ("D", "b", [0.1])],
    1: [("E", "a", [0.7, 0.9]), ("F", "b", [0.6, 0.2, 0.1]), ("G", "b", [0.55, 0.65]), ("H", "a", [0.35])],
}


def _images(patients: dict = PATIENTS) -> pd.DataFrame:
    rows = []
    for fold, members in patients.items():
        for patient, label, probs in members:
            for i, p in enumerate(probs):
                rows.append({"path": f"{label}/{patient}_{i}.png", "label": label, "group": patient, "fold": fold,
                             "prob_a": p, "prob_b": 1.0 - p})
    return pd.DataFrame(rows)


def make_run(root: Path, images: pd.DataFrame, group_in_predictions: bool = False) -> Path:
    """A run folder as `ussf cv` leaves it, minus what write_report does not read (config, checkpoints)."""
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(CLASSES))
    images[["path", "label", "group", "fold"]].to_csv(root / "splits.csv", index=False)
    for fold, rows in images.groupby("fold"):
        pred = rows.assign(pred=np.where(rows["prob_a"] >= rows["prob_b"], "a", "b"))
        cols = ["path", "label", *(["group"] if group_in_predictions else []), "fold", "pred", "prob_a", "prob_b"]
        (root / "folds" / str(fold)).mkdir(parents=True)
        pred[cols].to_csv(root / "folds" / str(fold) / "predictions.csv", index=False)
    return root


def test_patient_predictions_average_each_patients_images():
    table, mixed = patient_predictions(_images(), CLASSES)
    assert mixed == []
    assert table["group"].tolist() == list("ABCDEFGH") and table["images"].tolist() == [2, 2, 2, 1, 2, 3, 2, 1]
    assert table["prob_a"].tolist() == pytest.approx([0.6, 0.3, 0.3, 0.1, 0.8, 0.3, 0.6, 0.35])
    assert np.allclose(table[["prob_a", "prob_b"]].sum(axis=1), 1.0)
    assert table["label"].tolist() == list("abababba") and table["fold"].tolist() == [0] * 4 + [1] * 4


def test_write_report_with_patients_adds_patient_level(tmp_path):
    run = make_run(tmp_path / "run", _images())
    notes: list[str] = []
    summary = write_report(run, log=notes.append)
    assert notes == []
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))

    # image level: calibration beside the other metrics, each fold's from its own predictions
    images = _images()
    for name, fn in (("ece", expected_calibration_error), ("brier", brier_score)):
        per_fold = [fn((rows["label"] == "b").astype(int).to_numpy(), rows[["prob_a", "prob_b"]].to_numpy())
                    for _, rows in images.groupby("fold")]
        assert on_disk[name]["mean"] == pytest.approx(np.mean(per_fold))
        assert on_disk[name]["std"] == pytest.approx(np.std(per_fold, ddof=1))
        fold0 = json.loads((run / "folds" / "0" / "metrics.json").read_text())
        assert fold0[name] == pytest.approx(per_fold[0])
    assert on_disk["accuracy"]["mean"] == pytest.approx((4 / 7 + 4 / 8) / 2)

    patients = on_disk["patient_level"]
    assert patients["rule"] == PATIENT_RULE == "mean probability over a patient's images"
    assert (patients["patients"], patients["images"], patients["mixed_label_patients"]) == (8, 15, 0)
    assert [e["patients"] for e in patients["per_fold"]] == [4, 4]
    assert [e["accuracy"] for e in patients["per_fold"]] == pytest.approx([0.75, 0.5])
    assert patients["accuracy"]["mean"] == pytest.approx(0.625)
    assert patients["accuracy"]["std"] == pytest.approx(np.std([0.75, 0.5], ddof=1))
    # fold 0's patients [0.6, 0.4] a, [0.3, 0.7] b, [0.3, 0.7] a, [0.1, 0.9] b: 0.32, 0.18, 0.98, 0.02
    assert patients["per_fold"][0]["brier"] == pytest.approx((0.32 + 0.18 + 0.98 + 0.02) / 4)
    assert patients["per_fold"][0]["ece"] == pytest.approx(
        expected_calibration_error([0, 1, 0, 1], _two_class([0.6, 0.3, 0.3, 0.1])))
    assert set(patients) >= {"precision", "sensitivity", "specificity", "f1", "auc", "ece", "brier"}
    fold1 = json.loads((run / "folds" / "1" / "metrics.json").read_text())
    assert fold1["patient_level"]["patients"] == 4 and fold1["patient_level"]["accuracy"] == pytest.approx(0.5)

    per_class = pd.read_csv(run / "per_class_patient.csv").set_index("class")
    assert per_class["support"].to_dict() == {"a": 4, "b": 4}  # patients, not images
    # class a's patients: fold 0 A right, C wrong; fold 1 E right, H wrong -> sensitivity 1/2 in both folds
    assert per_class.at["a", "sensitivity_mean"] == pytest.approx(0.5)
    assert pd.read_csv(run / "per_class.csv")["support"].tolist() == [7, 8]  # images
    results = (run / "results.md").read_text()
    assert "## Calibration" in results and "## Patient level (8 patients, 15 images;" in results
    assert (run / "calibration.png").stat().st_size > 1000


def test_patient_ids_in_predictions_are_used_before_splits(tmp_path):
    images = _images()
    run = make_run(tmp_path / "run", images, group_in_predictions=True)
    # splits.csv holding only paths as groups would mean "no patients"; the predictions' own column wins
    images.assign(group=images["path"])[["path", "label", "group", "fold"]].to_csv(run / "splits.csv", index=False)
    groups, source = run_groups(run, pd.concat(pd.read_csv(f) for f in sorted(run.glob("folds/*/predictions.csv"))))
    assert source == "predictions.csv's group column" and groups.nunique() == 8
    assert write_report(run, log=lambda _: None)["patient_level"]["patients"] == 8


def test_a_patient_with_two_labels_is_left_out_and_named(tmp_path):
    patients = {**PATIENTS, 1: [*PATIENTS[1], ("M", "a", [0.9])]}
    images = _images(patients)
    images.loc[len(images)] = {"path": "b/M_1.png", "label": "b", "group": "M", "fold": 1, "prob_a": 0.2,
                               "prob_b": 0.8}
    run = make_run(tmp_path / "run", images)
    notes: list[str] = []
    patient_level = write_report(run, log=notes.append)["patient_level"]
    assert (patient_level["patients"], patient_level["images"], patient_level["mixed_label_patients"]) == (8, 15, 1)
    assert patient_level["accuracy"]["mean"] == pytest.approx(0.625)  # as without M
    assert len(notes) == 1 and "1 patient(s) have images of more than one label (e.g. 'M')" in notes[0]


@pytest.mark.parametrize("grouping", ["own path", "near-duplicate's path"])
def test_without_patient_ids_there_is_no_patient_level(tmp_path, grouping):
    images = _images()
    images["group"] = images["path"]
    if grouping == "near-duplicate's path":  # folds that kept two near-duplicates together name them by one path
        images.loc[1, "group"] = images.loc[0, "path"]
    run = make_run(tmp_path / "run", images)
    (run / "per_class_patient.csv").write_text("class\nstale\n")  # from an earlier report: removed
    notes: list[str] = []
    summary = write_report(run, log=notes.append)
    assert "patient_level" not in summary and "patient_level" not in json.loads((run / "summary.json").read_text())
    assert not (run / "per_class_patient.csv").exists()
    assert "patient_level" not in json.loads((run / "folds" / "0" / "metrics.json").read_text())
    assert len(notes) == 1 and notes[0].startswith("patient level: not computed, the run has no patient ids")
    assert "ece" in summary and "brier" in summary and (run / "calibration.png").is_file()
    assert "## Patient level" not in (run / "results.md").read_text()


def test_ussf_report_rebuilds_calibration_png_and_says_why_there_is_no_patient_level(tmp_path, capsys):
    from ussf_lib.cli import main

    images = _images().assign(group=lambda t: t["path"])
    run = make_run(tmp_path / "run", images)
    assert main(["report", str(run)]) == 0
    captured = capsys.readouterr()
    assert "report rebuilt" in captured.out
    assert captured.err.count("patient level: not computed") == 1
    assert (run / "calibration.png").is_file() and "ece" in json.loads((run / "summary.json").read_text())


def test_plot_calibration_writes_the_reliability_diagram(tmp_path):
    import matplotlib.pyplot as plt

    pred = _images()
    fig = plot_calibration(pred, CLASSES, out=tmp_path / "cal.png")
    assert (tmp_path / "cal.png").stat().st_size > 1000
    top, bottom = fig.axes
    assert "ECE" in top.get_title() and sum(p.get_height() for p in bottom.patches) == len(pred)
    plt.close(fig)


def test_an_unreadable_splits_csv_costs_the_patient_level_only(tmp_path):
    run = make_run(tmp_path / "run", _images())
    (run / "splits.csv").write_bytes(b"\xff\xfe\x00garbage")
    notes: list[str] = []
    summary = write_report(run, log=notes.append)
    assert "patient_level" not in summary and "ece" in summary
    assert len(notes) == 1 and notes[0].startswith("patient level: not computed, splits.csv is not readable")

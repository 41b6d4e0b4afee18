"""Temperature scaling: fitted on held-out training images, reported beside the raw calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ussf_lib.data.folds import calibration_split
from ussf_lib.evaluation.metrics import brier_score, expected_calibration_error, fit_temperature, temperature_scale


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_fit_temperature_recovers_the_temperature_that_generated_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(logits / 2.0)])  # labels from T = 2
    overconfident = _softmax(logits)
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(2.0, rel=0.1)
    scaled = temperature_scale(overconfident, t)
    assert np.array_equal(scaled.argmax(1), overconfident.argmax(1))  # accuracy unchanged
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, overconfident)
    assert brier_score(y, scaled) < brier_score(y, overconfident)
    np.testing.assert_allclose(temperature_scale(overconfident, 1.0), overconfident, atol=1e-9)


def test_calibration_split_holds_out_whole_patients_of_every_class():
    labels = np.repeat([0, 1], 100)
    groups = np.array([f"p{i // 4}" for i in range(200)])
    train_idx = np.arange(200)
    fit, cal = calibration_split(train_idx, labels, groups, seed=0)
    assert len(set(fit) & set(cal)) == 0 and len(fit) + len(cal) == 200
    assert 10 <= len(cal) <= 30 and set(labels[cal]) == {0, 1}
    assert not set(groups[fit]) & set(groups[cal])


def test_cv_with_temperature_scaling_reports_raw_and_scaled_side_by_side(tmp_path, phantom_dir):
    from ussf_lib.cli import main

    out = tmp_path / "run"
    assert main(["cv", "--manifest", str(phantom_dir / "manifest.csv"), "--group-col", "patient", "--model",
                 "us_sfnet_tiny", "--epochs", "1", "--folds", "2", "--image-size", "32", "--batch-size", "16",
                 "--out", str(out), "--no-progress", "--temperature-scaling"]) == 0
    temps = [json.loads((out / "folds" / str(k) / "temperature.json").read_text()) for k in (0, 1)]
    assert all(t["temperature"] > 0 and t["calibration_images"] > 0 for t in temps)
    summary = json.loads((out / "summary.json").read_text())
    scaled = summary["temperature_scaled"]
    assert set(scaled["temperatures"]) == {"0", "1"}
    assert scaled["ece_raw"]["mean"] == pytest.approx(summary["ece"]["mean"])
    assert 0 <= scaled["ece"]["mean"] <= 1 and 0 <= scaled["brier"]["mean"] <= 2
    assert "temperature-scaled" in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["temperature_scaling"] is True

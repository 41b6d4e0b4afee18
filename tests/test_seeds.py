"""Comparisons repeated over seeds: tables pooled over folds and seeds, the corrected test over all pairs."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from ussf_lib.evaluation.report import write_report
from ussf_lib.evaluation.seeds import seed_folder, write_seed_tables

CLASSES = ["a", "b"]


def _run(folder, labels, preds, folds):
    """A finished run folder from hand-made predictions (probability 0.9 on the predicted class)."""
    folder.mkdir(parents=True)
    paths = [f"img{i}.png" for i in range(len(labels))]
    (folder / "classes.json").write_text(json.dumps(CLASSES))
    pd.DataFrame({"path": paths, "label": labels, "group": paths, "fold": folds}).to_csv(folder / "splits.csv",
                                                                                        index=False)
    for k in sorted(set(folds)):
        rows = [i for i, f in enumerate(folds) if f == k]
        p_a = [0.9 if preds[i] == "a" else 0.1 for i in rows]
        (folder / "folds" / str(k)).mkdir(parents=True)
        pd.DataFrame({"path": [paths[i] for i in rows], "label": [labels[i] for i in rows], "fold": k,
                      "pred": [preds[i] for i in rows], "prob_a": p_a, "prob_b": [1 - p for p in p_a]}
                     ).to_csv(folder / "folds" / str(k) / "predictions.csv", index=False)
    write_report(folder, log=lambda _: None)


def test_seed_tables_pool_folds_and_seeds_and_test_over_all_pairs(tmp_path):
    labels, folds = ["a", "a", "b", "b"] * 2, [0, 0, 0, 0, 1, 1, 1, 1]
    right = labels
    one_wrong = ["b", "a", "b", "b", "a", "a", "b", "b"]
    two_wrong = ["b", "b", "b", "b", "a", "a", "a", "b"]
    for seed, other in ((0, one_wrong), (1, two_wrong)):
        folder = seed_folder(tmp_path, seed)
        _run(folder / "us_sfnet_tiny", labels, right, folds)
        _run(folder / "us_sfnet_tiny_nofft", labels, other, folds)
        (folder / "splits.csv").write_text((folder / "us_sfnet_tiny" / "splits.csv").read_text())
    tables = write_seed_tables(tmp_path, [0, 1], ["us_sfnet_tiny", "us_sfnet_tiny_nofft"])
    table = tables["table"].set_index("model")
    assert table.loc["us_sfnet_tiny", "n"] == 4 and table.loc["us_sfnet_tiny", "accuracy_mean"] == 1.0
    # nofft's fold accuracies: seed 0 -> 0.75, 1.0; seed 1 -> 0.5, 0.75
    assert table.loc["us_sfnet_tiny_nofft", "accuracy_mean"] == pytest.approx(0.75)
    assert table.loc["us_sfnet_tiny_nofft", "accuracy_std"] == pytest.approx(np.std([0.75, 1, 0.5, 0.75], ddof=1))
    assert table.loc["us_sfnet_tiny_nofft", "sens_a_mean"] == pytest.approx(np.mean([0.5, 1, 0, 1]))
    paired = tables["paired"].set_index("metric").loc["accuracy"]
    diffs = np.array([0.25, 0.0, 0.5, 0.25])
    t = diffs.mean() / math.sqrt((1 / 4 + 1.0) * diffs.var(ddof=1))  # 1/(k r) + n_test/n_train (equal folds: 1)
    assert paired["n_pairs"] == 4 and paired["mean_diff"] == pytest.approx(25.0) and paired["t"] == pytest.approx(t)
    for name in ("seeds_folds.csv", "seeds_table.csv", "seeds_paired.csv", "seeds.md"):
        assert (tmp_path / name).is_file()
    assert "| us_sfnet_tiny_nofft | accuracy |         4 | +25.0 [" in (tmp_path / "seeds.md").read_text()
    assert "us_sfnet_tiny − model" in (tmp_path / "seeds.md").read_text()  # the sign of the difference


def test_seeds_flag_refuses_a_seed_beside_it_and_bad_values(tmp_path, capsys):
    from ussf_lib.cli import main

    base = ["compare", "--data", str(tmp_path), "--models", "us_sfnet_tiny", "--out", str(tmp_path / "o")]
    assert main([*base, "--seeds", "0,1", "--seed", "3"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main([*base, "--seeds", "0,x"]) == 2
    assert "--seeds 0,x: 'x' is not a whole number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

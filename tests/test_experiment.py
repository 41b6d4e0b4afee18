"""ussf_lib.training.experiment + report: a complete run folder, reproducible, resumable, rebuilt from predictions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import pytest

from ussf_lib.errors import UserError
from ussf_lib.training.experiment import CVConfig, load_config, run_cv
from ussf_lib.paper import METRIC_NAMES, PAPER_CLASSES, paper_headline
from ussf_lib.evaluation.report import table2_beside_paper, write_report

QUIET = dict(progress=False)


def _cfg(phantom_dir, out, **kw) -> CVConfig:
    base = dict(out=str(out), manifest=str(phantom_dir / "manifest.csv"), group_col="patient",
                classes=list(PAPER_CLASSES), model="us_sfnet_tiny", folds=2, epochs=1, image_size=32, batch_size=16, seed=0, **QUIET)
    base.update(kw)
    return CVConfig(**base)


@pytest.fixture(scope="module")
def run_dir(phantom_dir, tmp_path_factory):
    return run_cv(_cfg(phantom_dir, tmp_path_factory.mktemp("runs") / "cv"), log=lambda _: None)


def test_run_folder_contract(run_dir, phantom_dir):
    for name in ("config.json", "environment.json", "splits.csv", "classes.json", "summary.json", "per_class.csv",
                 "results.csv", "results.md", "confusion_matrix.png", "learning_curves.png", "roc.png"):
        assert (run_dir / name).is_file(), name
    for k in (0, 1):
        for name in ("history.csv", "predictions.csv", "metrics.json", "checkpoint.pt"):
            assert (run_dir / "folds" / str(k) / name).is_file(), (k, name)
    summary = json.loads((run_dir / "summary.json").read_text())
    for m in METRIC_NAMES:
        assert set(summary[m]) == {"mean", "std"} and 0.0 <= summary[m]["mean"] <= 1.0
    assert summary["classes"] == ["normal", "benign", "primary", "metastatic"]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"].startswith("2.14.1") and len(env["data_fingerprint"]) == 64
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lr"] == 1e-3 and config["weight_decay"] == 1e-4 and config["betas"] == [0.9, 0.999]
    # each fold's checkpoint carries what a resume needs: weights, optimizer, scaler, RNG states, fold, config
    state = torch.load(run_dir / "folds" / "1" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "scaler", "shuffle_rng", "torch_rng", "epoch", "fold", "meta", "config"} <= set(state)
    assert state["fold"] == 1 and state["config"] == config and state["meta"]["classes"] == summary["classes"]


def test_out_of_fold_predictions_cover_every_image_once_and_no_patient_leaks(run_dir, phantom_dir):
    splits = pd.read_csv(run_dir / "splits.csv")
    manifest = pd.read_csv(phantom_dir / "manifest.csv")
    assert len(splits) == len(manifest) == 80
    assert (splits.groupby("group")["fold"].nunique() == 1).all()
    pred = pd.concat(pd.read_csv(run_dir / "folds" / str(k) / "predictions.csv") for k in (0, 1))
    assert sorted(pred["path"]) == sorted(splits["path"])
    probs = pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy()
    assert probs.shape[1] == 4 and np.allclose(probs.sum(1), 1, atol=1e-5)
    merged = pred.merge(splits, on="path", suffixes=("", "_split"))
    assert (merged["fold"] == merged["fold_split"]).all()


def test_history_has_one_row_per_epoch(run_dir):
    history = pd.read_csv(run_dir / "folds" / "0" / "history.csv")
    assert history["epoch"].tolist() == [1]
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(history.columns)


def test_eval_every_leaves_validation_gaps_in_history_and_a_whole_report(phantom_dir, tmp_path):
    out = run_cv(_cfg(phantom_dir, tmp_path / "sparse", epochs=3, eval_every=2, checkpoint_every=2),
                 log=lambda _: None)
    for k in (0, 1):
        history = pd.read_csv(out / "folds" / str(k) / "history.csv")
        assert history["epoch"].tolist() == [1, 2, 3]
        assert history["val_loss"].notna().tolist() == [False, True, True]  # epoch 2, and the last
        assert torch.load(out / "folds" / str(k) / "checkpoint.pt", weights_only=True)["epoch"] == 3
    assert (out / "learning_curves.png").is_file() and (out / "summary.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["eval_every"], config["checkpoint_every"]) == (2, 2)


def test_report_is_rebuilt_from_predictions_alone(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for name in ("summary.json", "per_class.csv", "results.csv", "confusion_matrix.png"):
        (copy / name).unlink()
    for ckpt in copy.glob("folds/*/checkpoint.pt"):
        ckpt.unlink()  # no model needed
    write_report(copy)
    assert json.loads((copy / "summary.json").read_text()) == json.loads((run_dir / "summary.json").read_text())
    pd.testing.assert_frame_equal(pd.read_csv(copy / "per_class.csv"), pd.read_csv(run_dir / "per_class.csv"))


def test_table2_beside_paper_only_for_the_papers_classes(run_dir, tmp_path):
    table = table2_beside_paper(run_dir)  # the phantom has the paper's four classes
    per_class = pd.read_csv(run_dir / "per_class.csv").set_index("class")
    assert list(table.index) == json.loads((run_dir / "classes.json").read_text())
    mean, std = per_class.at["normal", "sensitivity_mean"], per_class.at["normal", "sensitivity_std"]
    assert table.at["normal", "sensitivity"] == f"{100 * mean:.2f} ± {100 * std:.2f}"
    assert table.at["benign", "paper US-SFNet precision"] == "85.86 ± 3.40"  # the paper's Table 2
    results = pd.read_csv(run_dir / "results.csv").set_index("metric")["paper US-SFNet (%)"]
    assert results.drop(["f1", "auc"]).to_dict() == paper_headline() and results[["f1", "auc"]].isna().all()
    assert results["precision"] == 90.46 and results["specificity"] == 97.49  # the abstract's figures
    headline_md = (run_dir / "results.md").read_text().split("## Per class")[0]
    assert "nan" not in headline_md and headline_md.count("n/a") == 2  # no paper F1 or AUC: said, not "nan"
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "classes.json").write_text(json.dumps(["normal", "benign", "malignant", "metastatic"]))
    renamed = per_class.rename(index={"primary": "malignant"})
    renamed.to_csv(other / "per_class.csv")
    table = table2_beside_paper(other)
    assert list(table.columns) == ["precision", "sensitivity", "specificity", "f1"]
    baseline = tmp_path / "baseline"  # the paper's classes, but another model: US-SFNet's figures do not belong
    shutil.copytree(run_dir, baseline)
    config = json.loads((baseline / "config.json").read_text())
    (baseline / "config.json").write_text(json.dumps({**config, "model": "densenet121"}))
    assert list(table2_beside_paper(baseline).columns) == ["precision", "sensitivity", "specificity", "f1"]
    write_report(baseline)
    assert "paper US-SFNet (%)" not in pd.read_csv(baseline / "results.csv").columns


def test_same_seed_gives_identical_summary(run_dir, phantom_dir, tmp_path):
    again = run_cv(_cfg(phantom_dir, tmp_path / "again"), log=lambda _: None)
    assert (again / "summary.json").read_text() == (run_dir / "summary.json").read_text()
    assert (again / "splits.csv").read_text() == (run_dir / "splits.csv").read_text()


def test_interrupted_run_resumes_to_the_same_result(run_dir, phantom_dir, tmp_path):
    out = tmp_path / "cut"
    with pytest.warns(UserWarning, match=r"fold\(s\) \[1\] of 2 have no predictions.csv"):  # tables of fold 0
        run_cv(_cfg(phantom_dir, out), folds_to_run=[0], log=lambda _: None)
    assert not (out / "folds" / "1" / "predictions.csv").exists()
    with pytest.raises(UserError, match="--resume"):
        run_cv(_cfg(phantom_dir, out), log=lambda _: None)
    with pytest.raises(UserError, match=r"settings \['epochs'\] differ"):
        run_cv(_cfg(phantom_dir, out, epochs=2), resume=True, log=lambda _: None)
    logs: list[str] = []
    run_cv(load_config(out), resume=True, log=logs.append)
    assert any("fold 0: already finished" in line for line in logs)
    assert (out / "summary.json").read_text() == (run_dir / "summary.json").read_text()


def test_saved_splits_are_reused(run_dir, phantom_dir, tmp_path):
    out = run_cv(_cfg(phantom_dir, tmp_path / "reuse", seed=5, splits=str(run_dir / "splits.csv")),
                 log=lambda _: None)
    assert pd.read_csv(out / "splits.csv")["fold"].tolist() == pd.read_csv(run_dir / "splits.csv")["fold"].tolist()


def test_splits_that_split_a_patient_are_refused_and_reused_splits_record_the_patients(run_dir, phantom_dir,
                                                                                      tmp_path):
    from ussf_lib.training.experiment import compute_splits

    # Folds made from the folder tree know no patients, so they spread each patient's images over both folds.
    ungrouped = compute_splits(CVConfig(out=str(tmp_path / "t"), data=str(phantom_dir), folds=2, image_size=32,
                                        seed=0, **QUIET), log=lambda _: None)
    ungrouped.to_csv(tmp_path / "ungrouped.csv", index=False)
    with pytest.raises(UserError, match=r"ungrouped.csv: \d+ 'patient' group\(s\) have images in more than one fold"):
        run_cv(_cfg(phantom_dir, tmp_path / "leak", splits=str(tmp_path / "ungrouped.csv")), log=lambda _: None)
    assert not (tmp_path / "leak").exists()
    # Grouped splits whose group column was rewritten (another run's ids) are reused with the data's own patients.
    table = pd.read_csv(run_dir / "splits.csv")
    table["group"] = [f"other{i}" for i in range(len(table))]
    table.to_csv(tmp_path / "renamed.csv", index=False)
    out = run_cv(_cfg(phantom_dir, tmp_path / "reuse", splits=str(tmp_path / "renamed.csv")), log=lambda _: None)
    manifest = pd.read_csv(phantom_dir / "manifest.csv")
    written = pd.read_csv(out / "splits.csv").merge(manifest, on="path")
    assert len(written) == len(manifest) and (written["group"] == written["patient"]).all()


def test_folds_made_here_that_test_no_image_of_a_class_say_so(phantom_dir, tmp_path, monkeypatch):
    import ussf_lib.data.folds as cv_mod
    from ussf_lib.training.experiment import compute_splits

    manifest = pd.read_csv(phantom_dir / "manifest.csv")
    # Few patients of a class can all land outside one fold; the folds below put no metastatic image in fold 2.
    folds = np.where(manifest["label"] == "metastatic", np.arange(len(manifest)) % 2, np.arange(len(manifest)) % 3)
    monkeypatch.setattr(cv_mod, "folds_for_index", lambda *a, **k: folds)
    logs: list[str] = []
    compute_splits(_cfg(phantom_dir, tmp_path / "t", folds=3, group_col=None), log=logs.append)
    assert "warning: fold 2 of the folds made with --seed 0 tests no 'metastatic' image" in "\n".join(logs)
    only_fold_0 = np.where(manifest["label"] == "metastatic", 0, np.arange(len(manifest)) % 3)
    monkeypatch.setattr(cv_mod, "folds_for_index", lambda *a, **k: only_fold_0)
    with pytest.raises(UserError, match="fold 0 trains on no 'metastatic' image .*; use fewer --folds, another --seed"):
        compute_splits(_cfg(phantom_dir, tmp_path / "t", folds=3, group_col=None), log=logs.append)


def test_reused_splits_record_their_groups_only_where_the_folds_kept_them_whole(run_dir, phantom_dir, tmp_path):
    table = pd.read_csv(run_dir / "splits.csv")
    table["group"] = "one_group_in_every_fold"  # a group column these folds do not keep whole
    table.to_csv(tmp_path / "odd.csv", index=False)
    out = run_cv(_cfg(phantom_dir, tmp_path / "tree", manifest=None, group_col=None, data=str(phantom_dir),
                      splits=str(tmp_path / "odd.csv")), log=lambda _: None)
    written = pd.read_csv(out / "splits.csv")
    assert (written["group"] == written["path"]).all()  # every image its own group, not the file's false one
    assert (written.groupby("group")["fold"].nunique() == 1).all()


def test_splits_with_another_fold_count_are_refused_before_any_work(run_dir, phantom_dir, tmp_path):
    with pytest.raises(UserError, match=r"splits.csv: has 2 folds but --folds is 3; make them agree"):
        run_cv(_cfg(phantom_dir, tmp_path / "x", folds=3, splits=str(run_dir / "splits.csv")), log=lambda _: None)
    assert not (tmp_path / "x").exists()


def test_bad_settings_fail_before_any_work(phantom_dir, tmp_path):
    with pytest.raises(UserError, match="unknown model 'no_such_model'"):
        run_cv(_cfg(phantom_dir, tmp_path / "x", model="no_such_model"), log=lambda _: None)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="fewer than --folds 9"):
        run_cv(_cfg(phantom_dir, tmp_path / "y", folds=9), log=lambda _: None)


def test_config_names_the_models_own_size_limits(tmp_path):
    with pytest.raises(UserError, match=r"image_size=8 is too small for us_sfnet_tiny; use 15 px or more"):
        CVConfig(out=str(tmp_path / "r"), model="us_sfnet_tiny", image_size=8)
    with pytest.raises(UserError, match=r"image_size=40 is not a multiple of 16, which vit_b_16 needs"):
        CVConfig(out=str(tmp_path / "r"), model="vit_b_16", image_size=40)
    with pytest.raises(UserError, match=r"--seed -1: must be 0 or more"):
        CVConfig(out=str(tmp_path / "r"), seed=-1)
    cfg = CVConfig(out="relative/run", data="~/images")
    assert Path(cfg.out).is_absolute() and cfg.data == str(Path.home() / "images")  # stored as config.json has it


def test_classes_named_like_missing_values_survive_the_run_folder(tmp_path):
    # pandas reads "NA", "None" and "nan" as missing by default; a run's own tables must keep them as names.
    from PIL import Image

    rows, rng = [], np.random.default_rng(0)
    for label in ("NA", "None"):
        (tmp_path / "d" / label).mkdir(parents=True)
        for i in range(6):  # noise: no two images are near-duplicates, so every image is its own fold group
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "d" / label / f"{i}.png")
            rows.append(f"{label}/{i}.png,{label}")
    (tmp_path / "d" / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg = CVConfig(out=str(tmp_path / "run"), manifest=str(tmp_path / "d" / "m.csv"), model="us_sfnet_tiny", folds=2,
                   epochs=1, image_size=16, batch_size=4, progress=False)
    out = run_cv(cfg, log=lambda _: None)
    assert json.loads((out / "summary.json").read_text())["classes"] == ["NA", "None"]
    assert pd.read_csv(out / "per_class.csv", keep_default_na=False)["class"].tolist() == ["NA", "None"]
    assert write_report(out)["n_folds"] == 2  # re-read from predictions.csv and splits.csv


def test_a_damaged_predictions_file_is_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "folds" / "1" / "predictions.csv").write_text("")
    with pytest.raises(UserError, match=r"folds/1/predictions.csv: damaged \(No columns to parse from file\); "
                                        r"delete it and run `ussf cv --resume .*run` to predict that fold again"):
        write_report(run)
    (run / "folds" / "1" / "predictions.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match=r"damaged \(no path, label, fold, pred column\)"):
        write_report(run)


def test_a_config_with_an_unknown_setting_is_named(run_dir, tmp_path):
    from ussf_lib.training.experiment import load_config

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "mixup_alpha": 0.2}))
    with pytest.raises(UserError, match=r"config.json: unknown setting\(s\) \['mixup_alpha'\]; valid settings are"):
        load_config(run)
    (run / "config.json").write_text(json.dumps({**config, "epochs": "lots"}))
    with pytest.raises(UserError, match=r"config.json: setting epochs='lots' should be of type int \(like 150\); "
                                        "the run folder is damaged"):
        load_config(run)
    (run / "config.json").write_text(json.dumps(config))
    assert load_config(run).to_dict() == config  # an intact config passes, betas list included

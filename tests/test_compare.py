"""ussf_lib.training.compare and `ussf compare`: identical folds for every model, Tables 1 and 2, paired tests, reruns."""

from __future__ import annotations

import json
import os
import shutil

import pandas as pd
import pytest
import torch

from ussf_lib.cli import main
from ussf_lib.training.compare import compare, parse_models
from ussf_lib.evaluation.tables import fold_test_train_ratio, reference_model, write_comparison
from ussf_lib.errors import UserError
from ussf_lib.training.experiment import CVConfig

# The two cheapest registered models at 32 px on CPU (densenet121 is the cheapest torchvision baseline there).
MODELS = ["us_sfnet_tiny", "densenet121"]
ARGS = ["--folds", "2", "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def comparison(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "cmp"
    code = main(["compare", "--manifest", str(phantom_dir / "manifest.csv"), "--group-col", "patient",
                 "--models", ",".join(MODELS), *ARGS, "--out", str(out)])
    assert code == 0
    return out


def test_compare_writes_both_tables_the_chart_and_the_paired_test(comparison):
    for name in ("splits.csv", "compare.json", "table1.csv", "table1.md", "table2.csv", "table2.md", "paired.csv",
                 "paired.md", "per_class_bars.png"):
        assert (comparison / name).is_file(), name
    assert (comparison / "per_class_bars.png").stat().st_size > 5000
    t1 = pd.read_csv(comparison / "table1.csv")
    assert t1["model"].tolist() == MODELS
    # fractions, as in each model's summary.json (the markdown prints percent)
    for m in ("accuracy", "precision", "sensitivity", "specificity", "f1"):
        assert t1[f"{m}_mean"].between(0, 1).all() and t1[f"{m}_std"].notna().all()
        for model in MODELS:
            summary = json.loads((comparison / model / "summary.json").read_text())
            assert t1.set_index("model").at[model, f"{m}_mean"] == pytest.approx(summary[m]["mean"])
    for model in MODELS:  # training time: the epochs' steps without evaluation, summed over the folds
        steps = sum(pd.read_csv(f)["train_seconds"].sum() for f in (comparison / model).glob("folds/*/history.csv"))
        assert t1.set_index("model").at[model, "train_seconds"] == pytest.approx(steps, abs=0.051)
    # meta.paper_table1() prints the paper's 90.59 %
    assert t1.set_index("model").at["densenet121", "paper_accuracy_mean"] == 0.9059  # exactly, as printed
    assert pd.isna(t1.set_index("model").at["us_sfnet_tiny", "paper_accuracy_mean"])
    t2 = pd.read_csv(comparison / "table2.csv")
    assert len(t2) == 2 * 4 and set(t2["class"]) == {"normal", "benign", "primary", "metastatic"}
    for m in ("precision", "sensitivity", "specificity", "f1"):
        assert t2[f"{m}_mean"].between(0, 1).all()
    keyed = t2.set_index(["model", "class"])  # the phantom's classes are the paper's: its Table 2 sits beside ours
    assert keyed.at[("densenet121", "benign"), "paper_precision_mean"] == pytest.approx(0.8225)
    assert keyed.loc["us_sfnet_tiny", "paper_precision_mean"].isna().all()
    paired = pd.read_csv(comparison / "paired.csv")
    assert paired["metric"].tolist() == ["accuracy", "f1"]
    assert (paired["reference"] == "us_sfnet_tiny").all() and (paired["model"] == "densenet121").all()
    assert paired["p_value"].between(0, 1).all() and (paired["ci_low"] <= paired["ci_high"]).all()
    assert paired["test_train_ratio"].iloc[0] == pytest.approx(fold_test_train_ratio(comparison / "splits.csv"))
    # the mean difference is the mean of the per-fold differences, which come from the runs' summaries
    acc = {m: [f["accuracy"] for f in json.loads((comparison / m / "summary.json").read_text())["per_fold"]]
           for m in MODELS}
    diffs = [100 * (a - b) for a, b in zip(acc["us_sfnet_tiny"], acc["densenet121"])]
    row = paired.iloc[0]
    assert [row["diff_fold_0"], row["diff_fold_1"]] == pytest.approx(diffs)
    assert row["mean_diff"] == pytest.approx(sum(diffs) / 2)
    md = (comparison / "paired.md").read_text()
    assert "Nadeau" in md and "Bouckaert" in md


def test_every_model_ran_on_the_shared_folds(comparison):
    shared = pd.read_csv(comparison / "splits.csv")
    assert (shared.groupby("group")["fold"].nunique() == 1).all()  # patients never split
    for m in MODELS:
        own = pd.read_csv(comparison / m / "splits.csv")
        assert own[["path", "fold"]].equals(shared[["path", "fold"]])
        assert json.loads((comparison / m / "config.json").read_text())["splits"] == str((comparison / "splits.csv").resolve())



def test_the_papers_figures_stay_out_of_tables_for_other_classes(comparison, tmp_path):
    # A BUSI-like task: 'benign' there is a breast lesion, not the paper's benign lymph node.
    other = tmp_path / "busi_like"
    shutil.copytree(comparison, other)
    rename = {"primary": "malignant", "metastatic": "cyst"}
    for m in MODELS:
        per_class = pd.read_csv(other / m / "per_class.csv")
        per_class["class"] = per_class["class"].replace(rename)
        per_class.to_csv(other / m / "per_class.csv", index=False)
        summary = json.loads((other / m / "summary.json").read_text())
        summary["classes"] = [rename.get(c, c) for c in summary["classes"]]
        (other / m / "summary.json").write_text(json.dumps(summary))
    tables = write_comparison(other)
    assert tables["table1"].filter(like="paper_").isna().all().all()
    assert tables["table2"].filter(like="paper_").isna().all().all()
    for name in ("table1.md", "table2.md"):
        text = (other / name).read_text()
        assert "paper" not in text.split("\n\n", 2)[2], name  # no paper column and no note about one
    assert "90.59" in (comparison / "table1.md").read_text()  # the paper's own classes keep them
    assert "2 folds (shared `splits.csv`), 1 epoch, 32 px" in (comparison / "table1.md").read_text()

def test_rerun_skips_finished_models(comparison, phantom_dir, tmp_path, capsys):
    again = tmp_path / "cmp"  # a copy: the rerun rewrites the tables, which other tests read
    shutil.copytree(comparison, again)
    before = {m: (again / m / "summary.json").stat().st_mtime_ns for m in MODELS}
    capsys.readouterr()
    assert main(["compare", "--manifest", str(phantom_dir / "manifest.csv"), "--group-col", "patient",
                 "--models", ",".join(MODELS), *ARGS, "--out", str(again)]) == 0
    out = capsys.readouterr().out
    assert out.count("already finished, skipped") == 2
    assert {m: (again / m / "summary.json").stat().st_mtime_ns for m in MODELS} == before


def test_interrupted_comparison_continues_where_it_stopped(comparison, phantom_dir, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    (out / "densenet121" / "summary.json").unlink()  # as if killed during densenet121's last fold
    (out / "densenet121" / "folds" / "1" / "predictions.csv").unlink()
    kept = (out / "densenet121" / "folds" / "0" / "predictions.csv").stat().st_mtime_ns
    for name in ("table1.csv", "table2.csv", "paired.csv"):
        (out / name).unlink()
    cfg = CVConfig(manifest=str(phantom_dir / "manifest.csv"), group_col="patient", folds=2, epochs=1, image_size=32,
                   batch_size=16, seed=0, progress=False)
    lines: list[str] = []
    with pytest.raises(UserError, match="differ"):  # the settings used to start are checked first
        compare(MODELS, CVConfig(**{**cfg.to_dict(), "epochs": 2}), out, log=lines.append)
    compare(MODELS, cfg, out, log=lines.append)
    assert any("us_sfnet_tiny: already finished" in line for line in lines)
    assert any("densenet121: resuming" in line for line in lines)
    assert any("fold 0: already finished, skipped" in line for line in lines)
    assert (out / "densenet121" / "folds" / "0" / "predictions.csv").stat().st_mtime_ns == kept
    assert (out / "densenet121" / "summary.json").is_file() and (out / "paired.csv").is_file()


def test_tables_rebuild_from_run_folders_alone(comparison, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out, ignore=shutil.ignore_patterns("checkpoint.pt", "table*", "paired*", "*.png"))
    tables = write_comparison(out)
    assert tables["table1"]["model"].tolist() == MODELS
    assert pd.read_csv(out / "table1.csv").equals(pd.read_csv(comparison / "table1.csv"))
    assert pd.read_csv(out / "paired.csv").equals(pd.read_csv(comparison / "paired.csv"))
    assert main(["compare", "--out", str(out), "--tables-only"]) == 0


def test_paired_refuses_runs_on_other_folds(comparison, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out, ignore=shutil.ignore_patterns("checkpoint.pt"))
    splits = pd.read_csv(out / "densenet121" / "splits.csv")
    splits["fold"] = 1 - splits["fold"]
    splits.to_csv(out / "densenet121" / "splits.csv", index=False)
    with pytest.raises(UserError, match="other folds"):
        write_comparison(out)


def test_model_list_errors_before_any_work(tmp_path, phantom_dir, capsys):
    assert parse_models(" us_sfnet , densenet121 ") == ["us_sfnet", "densenet121"]
    assert reference_model(["resnet101", "us_sfnet"]) == "us_sfnet" and reference_model(["resnet101"]) == "resnet101"
    with pytest.raises(UserError, match="more than once"):
        parse_models("resnet101,resnet101")
    with pytest.raises(UserError, match="no models"):
        parse_models(",")
    for models, match in (("us_sfnet_tiny,nope", "unknown model 'nope'"), ("vit_b_16", "multiple of 16")):
        code = main(["compare", "--data", str(phantom_dir), "--models", models, "--image-size", "40",
                     "--out", str(tmp_path / "out")])
        assert code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main(["compare", "--data", str(phantom_dir), "--models", "us_sfnet_tiny,densenet121", "--weights",
                 str(tmp_path / "w.pt"), "--out", str(tmp_path / "out")])
    assert code == 2 and "fits one architecture" in capsys.readouterr().err
    assert main(["compare", "--data", str(phantom_dir), "--out", str(tmp_path / "out")]) == 2
    assert "--models" in capsys.readouterr().err
    # found while reading the data or making the folds: still before the comparison folder is created
    for args, match in ((["--folds", "99"], "fewer than --folds 99"), (["--device", "gpu7"], "not a device name"),
                        (["--out", str(phantom_dir / "cmp")], "is inside the data folder")):
        code = main(["compare", "--data", str(phantom_dir), "--models", "us_sfnet_tiny,densenet121", "--image-size",
                     "32", "--out", str(tmp_path / "out"), "--no-progress", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and match in err and "\n" not in err, err
    assert not (tmp_path / "out").exists() and not (phantom_dir / "cmp").exists()


def test_devices_run_the_models_at_once_with_the_same_results(comparison, phantom_dir, tmp_path, monkeypatch):
    """compare(devices=["cpu", "cpu"]): one pinned worker per model, same folds, tables and predictions as in order."""
    # Each cpu slot gets cpu_count // 2 threads; give it the thread count the sequential run had. (With 1 thread
    # against 2, densenet121's probabilities differ by ~5e-3 after one epoch: summation order, not placement.)
    monkeypatch.setattr(os, "cpu_count", lambda: 2 * torch.get_num_threads())
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # more threads than cores here: idle ones sleep, not spin
    cfg = CVConfig(manifest=str(phantom_dir / "manifest.csv"), group_col="patient", folds=2, epochs=1, image_size=32,
                   batch_size=16, seed=0, progress=False)
    out = tmp_path / "cmp"
    lines: list[str] = []
    compare(MODELS, cfg, out, log=lines.append, devices=["cpu", "cpu"])
    assert pd.read_csv(out / "splits.csv").equals(pd.read_csv(comparison / "splits.csv"))
    for m in MODELS:  # the workers' lines come back prefixed with their model
        assert any(line.startswith(f"[{m}] fold 1: test accuracy") for line in lines)
        assert f"[{m}] finished on device cpu" in lines
        env = json.loads((out / m / "environment.json").read_text())
        assert (env["placed_device"], env["visible_devices"], env["device"]) == ("cpu", "", "cpu")
        for k in (0, 1):
            ours = pd.read_csv(out / m / "folds" / str(k) / "predictions.csv")
            theirs = pd.read_csv(comparison / m / "folds" / str(k) / "predictions.csv")
            prob_cols = [c for c in ours.columns if c.startswith("prob_")]
            assert ours.drop(columns=prob_cols).equals(theirs.drop(columns=prob_cols))
            assert (ours[prob_cols] - theirs[prob_cols]).abs().to_numpy().max() < 1e-6
    ours, theirs = (pd.read_csv(d / "table1.csv").drop(columns="train_seconds") for d in (out, comparison))
    assert ours["model"].tolist() == MODELS
    pd.testing.assert_frame_equal(ours, theirs, rtol=0, atol=1e-4)  # percent
    assert json.loads((comparison / MODELS[0] / "environment.json").read_text())["placed_device"] is None

    lines.clear()  # a rerun with devices skips the finished models exactly as without
    compare(MODELS, cfg, out, log=lines.append, devices="cpu,cpu")
    assert sum("already finished, skipped" in line for line in lines) == 2
    assert not any(line.startswith("[us_sfnet_tiny] ") for line in lines)


def test_devices_a_failing_model_leaves_the_others_and_their_tables(comparison, phantom_dir, tmp_path):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out, ignore=shutil.ignore_patterns("table*", "paired*", "*.png"))
    (out / "us_sfnet_tiny" / "summary.json").unlink()  # interrupted after its last fold: resumes in a moment
    (out / "densenet121" / "summary.json").unlink()
    env_file = out / "densenet121" / "environment.json"
    env_file.write_text(json.dumps({**json.loads(env_file.read_text()), "data_fingerprint": "other data"}))
    cfg = CVConfig(manifest=str(phantom_dir / "manifest.csv"), group_col="patient", folds=2, epochs=1, image_size=32,
                   batch_size=16, seed=0, progress=False)
    lines: list[str] = []
    with pytest.raises(UserError) as info:
        compare(MODELS, cfg, out, log=lines.append, devices="cpu,cpu")
    message = str(info.value)  # the worker's UserError, named by its model, with what still holds
    assert message.startswith("densenet121: ") and "the data changed since this run started" in message
    assert "(tables written for us_sfnet_tiny)" in message and "\n" not in message
    assert "[us_sfnet_tiny] finished on device cpu" in lines
    assert any(line.startswith("[densenet121] FAILED: ") for line in lines)
    assert (out / "us_sfnet_tiny" / "summary.json").is_file() and not (out / "densenet121" / "summary.json").exists()
    assert pd.read_csv(out / "table1.csv")["model"].tolist() == ["us_sfnet_tiny"]


def test_tables_only_names_the_models_that_did_finish(comparison, capsys):
    assert main(["compare", "--tables-only", "--out", str(comparison), "--models", "resnet101"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ussf compare: error: {comparison}: no finished run of resnet101; finished here: densenet121, "
                   "us_sfnet_tiny (choose among them with --models, or leave --models out)")


def test_a_paired_test_without_spread_reads_undefined_not_significant():
    from ussf_lib.evaluation.tables import paired_markdown
    from ussf_lib.evaluation.stats import paired_comparison

    res = paired_comparison([0.25, 0.25], [0.28125, 0.28125], test_train_ratio=1.0)  # one image apart, both folds
    row = {"reference": "a", "model": "b", "metric": "accuracy", "diff_fold_0": -3.125, "diff_fold_1": -3.125,
           "mean_diff": 100 * res.mean_diff, "ci_low": 100 * res.ci_low, "ci_high": 100 * res.ci_high,
           "t": res.t, "p_value": res.p_value, "naive_p_value": res.naive_p_value}
    text = paired_markdown(pd.DataFrame([row]))
    assert text.count("undefined (no spread)") == 3 and "0.000" not in text and "inf" not in text


def test_report_on_a_comparison_folder_points_to_its_models(comparison, capsys):
    assert main(["report", str(comparison)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ussf report: error: {comparison}: is a comparison folder; report one of its models "
                   f"(`ussf report {comparison / 'densenet121'}`, ...), or rebuild its tables with "
                   f"`ussf compare --out {comparison} --tables-only`")


def test_predict_given_a_comparison_folder_names_the_model_runs_inside_it(comparison, capsys):
    assert main(["predict", "--checkpoint", str(comparison), str(comparison / "splits.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ussf predict: error: {comparison}: is a comparison folder holding the model runs densenet121, "
                   f"us_sfnet_tiny; pass one of them, e.g. --checkpoint {comparison / 'densenet121'}")

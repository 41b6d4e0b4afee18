"""ussf_lib.nbrun.sweep: grid files, run names, and a 2 models x 2 seeds sweep of notebook 04 on the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ussf_lib.errors import UserError
from ussf_lib.nbrun.sweep import Grid, load_grid, run_name, run_sweep

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04_train_cross_validation.ipynb"
#: The smallest setting: 16 px, 16 images per class (two synthetic patients of 8 views), one epoch, two folds.
FIXED = {"N_PER_CLASS": 16, "IMAGE_SIZE": 16, "EPOCHS": 1, "FOLDS": 2, "BATCH_SIZE": 32}


def test_load_grid_reads_axes_and_fixed_values(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("MODEL: [us_sfnet_tiny, us_sfnet]\nSEED: [0, 1]\nEPOCHS: 3\nfixed:\n  FOLDS: 2\n")
    grid = load_grid(path)
    assert grid.axes == {"MODEL": ["us_sfnet_tiny", "us_sfnet"], "SEED": [0, 1]}
    assert grid.fixed == {"FOLDS": 2, "EPOCHS": 3}  # a single top-level value is fixed too
    assert grid.runs() == [{"MODEL": "us_sfnet_tiny", "SEED": 0}, {"MODEL": "us_sfnet_tiny", "SEED": 1},
                           {"MODEL": "us_sfnet", "SEED": 0}, {"MODEL": "us_sfnet", "SEED": 1}]
    assert Grid(axes={}, fixed={"SEED": 1}).runs() == [{}]


@pytest.mark.parametrize("text,message", [
    ("SEED: []\n", "empty list"),
    ("- 1\n- 2\n", "mapping"),
    ("SEED: [0]\nfixed: [1]\n", "fixed"),
    ("SEED: [0]\nfixed: {SEED: 1}\n", "both an axis and fixed"),
    ("SEED: [0\n", "not valid YAML"),
])
def test_load_grid_rejects_malformed_grids(tmp_path, text, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_grid(path)
    with pytest.raises(UserError, match="no such grid file"):
        load_grid(tmp_path / "missing.yaml")


def test_run_names_are_safe_folder_names():
    assert run_name({"MODEL": "us_sfnet", "SEED": 0}) == "MODEL=us_sfnet,SEED=0"
    assert run_name({"DATA": "../shared/busi data", "CUTOFF": 0.1}) == "DATA=.._shared_busi_data,CUTOFF=0.1"
    assert run_name({}) == "run"


def test_unknown_grid_parameter_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"'EPOCS' is not a parameter of 04_train_cross_validation.ipynb; "
                                        r"its parameters are DATA, .*EPOCHS"):
        run_sweep(NOTEBOOK, {"MODEL": ["us_sfnet_tiny"], "fixed": {"EPOCS": 1}}, tmp_path / "s")
    with pytest.raises(UserError, match="OUT_DIR is set by the sweep"):
        run_sweep(NOTEBOOK, {"OUT_DIR": ["a", "b"]}, tmp_path / "s")
    with pytest.raises(UserError, match="EPOCHS takes values of type int"):
        run_sweep(NOTEBOOK, {"EPOCHS": ["many"]}, tmp_path / "s")
    with pytest.raises(UserError, match=r"DATA=no/such/tree: no such folder"):  # before any run starts
        run_sweep(NOTEBOOK, {"SEED": [0, 1], "fixed": {"DATA": "no/such/tree"}}, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_sweep_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    from ussf_lib.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text("MODLE: [us_sfnet_tiny]\n")
    assert main(["sweep", "--notebook", str(NOTEBOOK), "--grid", str(grid), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ussf sweep: error: grid parameter 'MODLE'") and "\n" not in err


@pytest.mark.slow
def test_sweep_two_models_two_seeds_then_skip_when_called_again(tmp_path):
    grid = {"MODEL": ["us_sfnet_tiny", "us_sfnet"], "SEED": [0, 1], "fixed": {**FIXED, "AMP": "bf16"}}
    out = tmp_path / "sweep"
    first = run_sweep(NOTEBOOK, grid, out, jobs=2, log=lambda line: None)
    assert first.failed == {} and len(first.ran) == 4 and first.skipped == []

    results = pd.read_csv(out / "results.csv")
    assert len(results) == 4
    assert list(results.columns[:3]) == ["run", "MODEL", "SEED"]
    assert sorted(zip(results["MODEL"], results["SEED"])) == [("us_sfnet", 0), ("us_sfnet", 1),
                                                             ("us_sfnet_tiny", 0), ("us_sfnet_tiny", 1)]
    for metric in ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc"):
        assert results[f"{metric}_mean"].between(0, 1).all() and f"{metric}_std" in results.columns
    assert (results["EPOCHS"] == 1).all() and (results["IMAGE_SIZE"] == 16).all()
    for name in results["run"]:
        assert (out / name / "04_train_cross_validation.ipynb").is_file()
        assert json.loads((out / name / "metrics.json").read_text())["parameters"]["IMAGE_SIZE"] == 16
        config = json.loads((out / name / "run" / "config.json").read_text())
        assert (config["amp"], config["image_size"], config["eval_every"]) == ("bf16", 16, 1)  # reached the run
    summary = (out / "summary.md").read_text()
    assert "| us_sfnet_tiny |" in summary and "| us_sfnet " in summary and "0,1" in summary
    assert len(pd.read_csv(out / "summary.csv")) == 2  # mean over seeds per model

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*.ipynb")}
    again = run_sweep(NOTEBOOK, grid, out, jobs=2, log=lambda line: None)
    assert again.ran == [] and sorted(again.skipped) == sorted(first.ran)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.ipynb")} == stamps  # nothing re-executed
    assert len(pd.read_csv(out / "results.csv")) == 4

    changed = {**grid, "fixed": {**grid["fixed"], "BATCH_SIZE": 16}}
    with pytest.raises(UserError, match="BATCH_SIZE=32 but the grid now gives BATCH_SIZE=16"):
        run_sweep(NOTEBOOK, changed, out, log=lambda line: None)


@pytest.mark.slow
def test_a_failing_run_is_reported_and_left_out(tmp_path):
    one_class = tmp_path / "one"  # exists, so only the notebook itself finds out that it cannot be used
    (one_class / "a").mkdir(parents=True)
    Image.new("L", (16, 16)).save(one_class / "a" / "x.png")
    out = tmp_path / "sweep"
    result = run_sweep(NOTEBOOK, {"SEED": [0], "fixed": {**FIXED, "DATA": str(one_class)}}, out, log=lambda line: None)
    assert list(result.failed) == ["SEED=0"]
    assert "only one class" in result.failed["SEED=0"]
    assert result.results.empty and "finished runs: 0 of 1" in (out / "summary.md").read_text()
    assert json.loads((out / "SEED=0" / "sweep.json").read_text())["status"] != "ok"
    # From the command line a sweep with a failed run exits 1 (not 0: scripts must notice; not 2: the grid was fine)
    from ussf_lib.cli import main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"SEED": [1], "fixed": {**FIXED, "DATA": str(one_class)}}))
    assert main(["sweep", "--notebook", str(NOTEBOOK), "--grid", str(grid), "--out", str(tmp_path / "cli")]) == 1
    assert json.loads((tmp_path / "cli" / "SEED=1" / "sweep.json").read_text())["status"] != "ok"


def test_values_a_run_would_refuse_are_refused_before_any_run(tmp_path):
    with pytest.raises(UserError, match=r"run MODEL=no_such_model: unknown model 'no_such_model'"):
        run_sweep(NOTEBOOK, {"MODEL": ["us_sfnet_tiny", "no_such_model"], "fixed": FIXED}, tmp_path / "s")
    with pytest.raises(UserError, match=r"run FOLDS=1: FOLDS=1 must be at least 2"):
        run_sweep(NOTEBOOK, {"FOLDS": [2, 1], "fixed": {"EPOCHS": 1}}, tmp_path / "s")
    with pytest.raises(UserError, match=r"run AMP=fp8: AMP='fp8' must be one of off, bf16, fp16"):
        run_sweep(NOTEBOOK, {"AMP": ["bf16", "fp8"], "fixed": FIXED}, tmp_path / "s")
    with pytest.raises(UserError, match=r"run EVAL_EVERY=0: EVAL_EVERY=0 must be at least 1"):
        run_sweep(NOTEBOOK, {"EVAL_EVERY": [0], "fixed": FIXED}, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_on_devices_records_where_each_run_went(tmp_path, capsys):
    from ussf_lib.cli import main

    grid = tmp_path / "grid.yaml"
    grid.write_text("SEED: [0, 1]\nfixed: {MODEL: us_sfnet_tiny, N_PER_CLASS: 16, IMAGE_SIZE: 16, EPOCHS: 1, "
                    "FOLDS: 2, BATCH_SIZE: 32}\n")
    out = tmp_path / "sweep"
    assert main(["sweep", "--notebook", str(NOTEBOOK), "--grid", str(grid), "--out", str(out),
                 "--devices", "cpu,cpu"]) == 0
    printed = capsys.readouterr().out
    assert "2 to run, 2 at a time on --devices cpu,cpu" in printed
    for name in ("SEED=0", "SEED=1"):
        record = json.loads((out / name / "sweep.json").read_text())
        assert record["status"] == "ok" and record["device"] == "cpu"
        assert f"{name}: done in" in printed and "on device cpu" in printed
        # the notebook's kernel inherited the pinned worker's environment: no GPU, the cpu slot recorded
        env = json.loads((out / name / "run" / "environment.json").read_text())
        assert (env["placed_device"], env["visible_devices"], env["device"]) == ("cpu", "", "cpu")
    assert len(pd.read_csv(out / "results.csv")) == 2


@pytest.mark.parametrize("where", ["DATA", "MANIFEST"])
def test_an_out_folder_inside_the_data_is_refused_before_anything_is_written(tmp_path, where):
    data = tmp_path / "mydata"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        Image.new("L", (16, 16)).save(data / label / "x.png")
    (data / "m.csv").write_text("path,label\na/x.png,a\nb/x.png,b\n")
    before = sorted(p.relative_to(data).as_posix() for p in data.rglob("*"))
    # A tree is data throughout; a manifest's data are the folders of its images (a run may sit beside them).
    value, inside = (str(data), data) if where == "DATA" else (str(data / "m.csv"), data / "a")
    with pytest.raises(UserError, match=f"--out {inside / 'sweep'}: is inside the data folder {inside}"):
        run_sweep(NOTEBOOK, {"SEED": [0], "fixed": {**FIXED, where: value}}, inside / "sweep")
    from ussf_lib.nbrun.runner import run_notebooks

    with pytest.raises(UserError, match=f"--out {inside / 'nb'}: is inside the data folder {inside}"):
        run_notebooks(inside / "nb", parameters={where: value}, notebooks=["01"])
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == before


def test_a_grid_that_is_not_text_is_one_clear_error(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match=f"{grid}: not a text file; a grid is YAML text"):
        load_grid(grid)


def test_a_notebook_without_a_parameters_cell_is_refused(tmp_path):
    import nbformat

    plain = tmp_path / "plain.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), plain)
    with pytest.raises(UserError, match="plain.ipynb: has no cell tagged 'parameters'"):
        run_sweep(plain, {"SEED": [0]}, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_results_read_headline_metrics_and_warn_about_a_run_without_them(tmp_path):
    import json

    from ussf_lib.nbrun.sweep import collect_results

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"accuracy": {"mean": 0.5, "std": 0.1}, "f1": 0.4}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text(json.dumps({"accuracy_by_model": {"m": 0.5}}))
    with pytest.warns(UserWarning, match=r"b/metrics.json: holds none of accuracy, precision"):
        table = collect_results(tmp_path, [("a", {"SEED": 0}), ("b", {"SEED": 1})]).set_index("run")
    assert table.at["a", "accuracy_mean"] == 0.5 and table.at["a", "accuracy_std"] == 0.1
    assert table.at["a", "f1_mean"] == 0.4 and np.isnan(table.at["a", "f1_std"])
    assert np.isnan(table.at["b", "accuracy_mean"])

"""The ``ussf`` command line: outputs of each command, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ussf_lib.cli import main


def _snapshot(root):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_phantom_command(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "ph"), "--n-per-class", "9", "--image-size", "16", "--seed", "1"]) == 0
    manifest = pd.read_csv(tmp_path / "ph" / "manifest.csv")
    assert list(manifest.columns) == ["path", "label", "patient"] and len(manifest) == 36
    assert "phantom written to" in capsys.readouterr().out


def test_every_command_prints_its_help(capsys):
    from ussf_lib.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and "cv" in a.choices).choices
    for name in commands:
        with pytest.raises(SystemExit) as stop:
            main([name, "--help"])
        assert stop.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: ussf {name}"), name


@pytest.fixture(scope="module")
def cli_run(phantom_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["cv", "--data", str(phantom_dir), "--model", "us_sfnet_tiny", "--folds", "2", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--seed", "0", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_cv_command_writes_the_documented_outputs(cli_run):
    summary = json.loads((cli_run / "summary.json").read_text())
    for m in ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc"):
        per_fold = [f[m] for f in summary["per_fold"]]
        assert len(per_fold) == 2 and 0 <= summary[m]["mean"] <= 1
        assert summary[m]["mean"] == pytest.approx(np.mean(per_fold))
        assert summary[m]["std"] == pytest.approx(np.std(per_fold, ddof=1))
    assert list(pd.read_csv(cli_run / "splits.csv").columns) == ["path", "label", "group", "fold"]
    per_class = pd.read_csv(cli_run / "per_class.csv")
    assert per_class["class"].tolist() == ["benign", "metastatic", "normal", "primary"]  # folder mode: sorted
    assert (cli_run / "confusion_matrix.png").stat().st_size > 1000


def test_predict_command_prints_probabilities(cli_run, phantom_dir, capsys):
    capsys.readouterr()
    images = sorted((phantom_dir / "benign").glob("*.png"))[:3]
    assert main(["predict", "--checkpoint", str(cli_run / "folds" / "0" / "checkpoint.pt"), *map(str, images)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "path,pred,prob_benign,prob_metastatic,prob_normal,prob_primary,n_models,tta"
    rows = [line.split(",") for line in out[1:]]
    assert len(rows) == 3 and all(abs(sum(map(float, r[2:6])) - 1) < 1e-4 for r in rows)
    assert all(r[6:] == ["1", "false"] for r in rows)


def test_predict_on_a_folder_counts_the_files_it_leaves_out(cli_run, phantom_dir, tmp_path, capsys):
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(sorted((phantom_dir / "benign").glob("*.png"))[:2]):
        shutil.copy(image, folder / "sub" / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(cli_run / "folds" / "0" / "checkpoint.pt"), str(folder)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 + 2  # header and the two images, from the sub-folder too
    assert captured.err.strip() == (f"ussf predict: warning: {folder}: ignored 1 non-image file(s), e.g. notes.txt "
                                    "(images are .bmp, .jpeg, .jpg, .png, .tif, .tiff)")


def test_predict_reproduces_the_folds_own_predictions(cli_run, phantom_dir, capsys):
    # Same checkpoint, same test images: predict must resize and normalize exactly as the fold's evaluation did.
    fold = pd.read_csv(cli_run / "folds" / "0" / "predictions.csv").head(8)
    capsys.readouterr()
    paths = [str(phantom_dir / p) for p in fold["path"]]
    assert main(["predict", "--checkpoint", str(cli_run / "folds" / "0" / "checkpoint.pt"), *paths]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    probs = [c for c in fold.columns if c.startswith("prob_")]
    np.testing.assert_allclose(printed[probs].to_numpy(), fold[probs].to_numpy(), atol=1e-4)
    assert printed["pred"].tolist() == fold["pred"].tolist()
    assert printed["pred"].tolist() == [p.removeprefix("prob_") for p in printed[probs].idxmax(axis=1)]


def test_report_command(cli_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    written = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    assert main(["report", str(run)]) == 0
    assert "report rebuilt" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text()) == written


def test_report_refuses_an_unfinished_run(cli_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cli_run, run)
    (run / "folds" / "0" / "predictions.csv").unlink()
    summary = (run / "summary.json").read_text()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "fold(s) [0] of 2 have no predictions.csv" in err and "ussf cv --resume" in err and "\n" not in err
    assert (run / "summary.json").read_text() == summary  # the finished run's tables are kept


def _one_class(tmp_path):
    (tmp_path / "only" / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "only" / "a" / "x.png")
    return ["--data", str(tmp_path / "only")]


def _few_images(tmp_path):
    for cls, n in (("a", 5), ("b", 2)):
        (tmp_path / "few" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), i * 20).save(tmp_path / "few" / cls / f"{i}.png")
    return ["--data", str(tmp_path / "few")]


def _users_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    return tmp_path / "notes"


def _users_file(tmp_path):
    (tmp_path / "results.txt").write_text("mine")
    return tmp_path / "results.txt"


@pytest.mark.parametrize("make_args,match", [
    (lambda t: ["--data", str(t / "missing")], "no such folder"),
    (lambda t: (t / "empty").mkdir() or ["--data", str(t / "empty")], "no images found"),
    (_one_class, "only one class"),
    (_few_images, "class 'b' has 2 images, fewer than --folds 5"),
    (lambda t: _few_images(t) + ["--model", "nope"], "unknown model 'nope'; choose one of: us_sfnet"),
    (lambda t: _few_images(t) + ["--folds", "2", "--out", str(_users_folder(t))],
     "folder exists and is not a ussf run folder; choose a new --out"),
    (lambda t: _few_images(t) + ["--folds", "2", "--out", str(_users_file(t))], "is a file, not a folder; choose a new --out"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, make_args, match):
    args = make_args(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = _snapshot(tmp_path)
    code = main(["cv", *args, "--epochs", "1", "--image-size", "16", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and match in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before  # nothing written, not even the run folder


@pytest.mark.parametrize("argv,match", [
    (["cv", "--data", "d", "--epochs", "0"], "ussf cv: error: argument --epochs: 0 must be at least 1"),
    (["cv", "--data", "d", "--lr", "abc"], "ussf cv: error: argument --lr: 'abc' is not a number"),
    (["cv", "--data", "d", "--manifest", "m.csv"], "ussf cv: error: argument --manifest: not allowed with argument --data"),
    (["cv", "--data", "d", "--amp", "fp8"], "ussf cv: error: argument --amp: invalid choice: 'fp8'"),
    (["cv", "--data", "d", "--compile-mode", "reduce-overhead"],
     "ussf cv: error: argument --compile-mode: invalid choice: 'reduce-overhead'"),
    (["audit", "--bogus", "d"], "ussf audit: error: unrecognized arguments: --bogus"),
    (["phantom", "--out", "x", "--n-per-class", "0"], "ussf phantom: error: argument --n-per-class"),
    (["sweep", "--notebook", "a", "--grid", "b", "--out", "c", "--jobs", "0"], "ussf sweep: error: argument --jobs"),
    (["frobnicate"], "ussf: error: argument command: invalid choice: 'frobnicate'"),
    (["cv", "--data", "d", "--seed", "-1"], "ussf cv: error: argument --seed: -1 must be 0 or more"),
    (["bench", "--sizes", ""], "ussf bench: error: argument --sizes: '' names nothing; give comma-separated values"),
    (["bench", "--models", ","], "ussf bench: error: argument --models: ',' names nothing"),
    (["notebooks", "--out", "x", "--only", ","], "ussf notebooks: error: argument --only: ',' names nothing"),
    (["cv", "--data", "d", "--out", ""], "ussf cv: error: --out is empty; give a file or folder name"),
    (["cv", "--data", " "], "ussf cv: error: --data is empty; give a file or folder name (use . for this folder)"),
    (["audit", ""], "ussf audit: error: DATA_DIR is empty"),
    (["report", ""], "ussf report: error: RUN is empty"),
    (["predict", "--checkpoint", "c.pt", "a.png", ""], "ussf predict: error: IMAGE_OR_DIR is empty"),
])
def test_flag_errors_are_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(match) and "--help" in err and "usage:" not in err
    assert list(tmp_path.iterdir()) == []


def test_console_module_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ussf_lib", "cv", "--data", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ussf cv: error:") and "Traceback" not in proc.stderr


TINY_MAIN_JOB = ["--n-per-class", "16", "--image-size", "32", "--epochs", "1", "--folds", "2"]
MAIN_JOB_FILES = ("results.md", "per_class.csv", "confusion_matrix.png", "learning_curves.png")


def test_main_job_without_notebooks_writes_the_results_it_prints(tmp_path, monkeypatch, capsys):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the current folder
    assert main(["main-job", "--no-notebooks", "--out", str(tmp_path / "main"), *TINY_MAIN_JOB]) == 0
    printed = capsys.readouterr().out
    run = tmp_path / "main" / "run"
    for name in MAIN_JOB_FILES:
        assert (run / name).is_file() and str(run / name) in printed
    config = json.loads((run / "config.json").read_text())
    assert (config["folds"], config["image_size"], config["group_col"]) == (2, 32, "patient")
    assert config["classes"] == ["normal", "benign", "primary", "metastatic"]
    assert config["manifest"] == str(tmp_path / "main" / "phantom" / "manifest.csv")
    assert sorted(p.name for p in (tmp_path / "main").iterdir()) == ["phantom", "phantom.json", "run"]
    assert list((tmp_path / "cwd").iterdir()) == []


def test_main_job_checks_its_settings_before_writing(tmp_path, capsys):
    out = tmp_path / "main"
    with pytest.raises(SystemExit) as refused:  # argparse refuses the value itself, in one line
        main(["main-job", "--no-notebooks", "--out", str(out), *TINY_MAIN_JOB, "--folds", "1"])
    assert refused.value.code == 2
    assert "argument --folds: 1 must be at least 2" in capsys.readouterr().err and not out.exists()
    # 10 images per class make one synthetic patient per class, and folds never split a patient
    assert main(["main-job", "--no-notebooks", "--out", str(out), *TINY_MAIN_JOB, "--n-per-class", "10"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ussf main-job: error: --n-per-class 10 makes 1 synthetic patient(s) per class, fewer than --folds 2 "
        "(folds never split a patient); use --n-per-class 11 or more") and not out.exists()


def test_main_job_executes_the_notebooks_with_its_settings(tmp_path, capsys):
    out = tmp_path / "main"
    assert main(["main-job", "--out", str(out), "--only", "04,05", *TINY_MAIN_JOB, "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    run = out / "04_train_cross_validation" / "run"
    for name in MAIN_JOB_FILES:
        assert (run / name).is_file() and str(run / name) in printed
    assert (out / "04_train_cross_validation.ipynb").is_file() and (out / "05_evaluate_confusion_matrices.ipynb").is_file()
    record = {r["notebook"]: r["parameters"] for r in json.loads((out / "notebooks.json").read_text())}
    assert record["04_train_cross_validation.ipynb"]["EPOCHS"] == 2  # scoped to 04 only
    assert record["05_evaluate_confusion_matrices.ipynb"]["RUN_DIR"] == str(run.resolve())  # 05 evaluates 04's run
    assert len(pd.read_csv(run / "folds" / "0" / "history.csv")) == 2
    assert main(["main-job", "--out", str(out), "--only", "04"]) == 2  # never mixes into an existing folder
    assert "not an empty folder" in capsys.readouterr().err


def test_scoped_notebook_parameters_are_checked(tmp_path, capsys):
    assert main(["notebooks", "--out", str(tmp_path / "nb"), "--only", "03", "--param", "04:EPOCHS=2"]) == 2
    assert "not among the notebooks run" in capsys.readouterr().err
    assert main(["notebooks", "--out", str(tmp_path / "nb"), "--only", "02", "--param", "02:EPOCHS=2"]) == 2
    assert "has no parameter 'EPOCHS'" in capsys.readouterr().err
    assert not (tmp_path / "nb").exists()


@pytest.mark.busi
def test_cv_end_to_end_on_busi(busi_root, tmp_path):
    before = _snapshot(busi_root)
    out = tmp_path / "busi"
    code = main(["cv", "--data", str(busi_root), "--model", "us_sfnet_tiny", "--folds", "2", "--epochs", "1",
                 "--image-size", "32", "--batch-size", "64", "--out", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["benign", "malignant", "normal"]
    assert 0 < summary["accuracy"]["mean"] <= 1
    pred = pd.concat(pd.read_csv(p) for p in out.glob("folds/*/predictions.csv"))
    assert len(pred) == 780 and pred["path"].str.contains(" ").all()
    assert _snapshot(busi_root) == before


def test_models_command_lists_the_registry(capsys):
    from ussf_lib.models import list_models

    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list_models() and names[:2] == ["us_sfnet", "us_sfnet_tiny"] and len(names) == 14 + 6  # + ablations


def test_compare_tables_only_needs_the_comparison_folder(tmp_path, capsys):
    assert main(["compare", "--tables-only"]) == 2
    assert capsys.readouterr().err.strip() == ("ussf compare: error: --tables-only needs --out DIR, "
                                               "the comparison folder to rebuild")
    (tmp_path / "empty").mkdir()
    assert main(["compare", "--tables-only", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no finished model run" in err and "\n" not in err and not list((tmp_path / "empty").iterdir())


def test_paths_that_cannot_be_written_are_one_line_errors(phantom_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, where the commands below need a folder")
    for argv in (["phantom", "--out", str(blocker / "ph"), "--n-per-class", "2", "--image-size", "16"],
                 ["cv", "--data", str(phantom_dir), "--model", "us_sfnet_tiny", "--image-size", "16", "--folds", "2",
                  "--epochs", "1", "--no-progress", "--out", str(blocker / "run")]):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and str(blocker) in err, err
        assert "Traceback" not in err and "check that the path is right" in err
    from ussf_lib import bench

    measured = []

    def measure(*args, **kwargs):  # stands in for minutes of measuring; then stops like Ctrl-C
        measured.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", measure)
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(blocker / "b.json")]) == 2
    assert str(blocker) in capsys.readouterr().err and measured == []  # refused before measuring
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "ok.json")]) == 130
    assert measured == [1] and not (tmp_path / "ok.json").exists()  # the check leaves no empty file behind


def test_running_out_of_memory_is_one_line_and_other_errors_are_not_hidden(monkeypatch, capsys):
    from ussf_lib import cli

    def huge(args):
        raise MemoryError("Unable to allocate 503. GiB for an array with shape (3392, 100000, 100000, 3)")

    monkeypatch.setattr(cli, "cmd_models", huge)
    assert main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ussf models: error: not enough memory (Unable to allocate 503. GiB") and "\n" not in err
    assert "--image-size" in err

    def bug(args):
        raise RuntimeError("a bug, which must show its traceback")

    monkeypatch.setattr(cli, "cmd_models", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["models"])


def test_a_plain_pickle_given_as_weights_or_checkpoint_is_one_line(phantom_dir, tmp_path, capsys):
    import pickle

    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"not": "tensors"}, protocol=4))
    image = str(sorted((phantom_dir / "benign").glob("*.png"))[0])
    assert main(["predict", "--checkpoint", str(plain), image]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ussf predict: error: {plain}: not a ussf checkpoint (UnpicklingError); pass RUN/folds/K/checkpoint.pt"
    assert main(["cv", "--data", str(phantom_dir), "--model", "us_sfnet_tiny", "--image-size", "16", "--folds", "2",
                 "--epochs", "1", "--weights", str(plain), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"weights file {plain} is not a loadable PyTorch file" in err


@pytest.mark.parametrize("command", ["cv", "compare"])
def test_ctrl_c_says_how_to_continue_once_the_run_folder_exists(command, phantom_dir, tmp_path, monkeypatch, capsys):
    import ussf_lib.training.compare as compare_mod
    import ussf_lib.training.experiment as experiment_mod

    out = tmp_path / "run"
    started = {"cv": "config.json", "compare": "splits.csv"}[command]

    def interrupted(*args, **kwargs):
        if out.exists():  # the second call: stopped after the run folder was made
            (out / started).write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_mod, "run_cv", interrupted)
    monkeypatch.setattr(compare_mod, "compare", interrupted)
    argv = [command, "--data", str(phantom_dir), "--out", str(out)] + (["--models", "us_sfnet_tiny"] if command == "compare" else [])
    assert main(argv) == 130  # stopped before anything was written: nothing to continue
    assert capsys.readouterr().err.strip() == f"ussf {command}: interrupted"
    out.mkdir()
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    if command == "cv":
        assert err == f"ussf cv: interrupted; continue with: ussf cv --resume {out}"
    else:
        assert err == (f"ussf compare: interrupted; continue by running the same command with --out {out} "
                       "(finished models are kept, the interrupted one resumes)")


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    # `ussf models | head -1`: head exits after one line; ussf must not print a BrokenPipeError traceback.
    # The first line reaches head, which exits; only then does the command write, into a closed pipe.
    script = ("import sys, time; from ussf_lib.cli import main; print('first', flush=True); time.sleep(2); "
              "code = main(['models']); print('exit', code, file=sys.stderr); sys.exit(code)")
    proc = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True, text=True,
                          timeout=120, executable="/bin/bash")
    assert proc.stdout == "first\n" and proc.stderr == "exit 141\n", proc.stderr


def test_a_warning_repeated_in_every_fold_is_printed_once(tmp_path, phantom_dir, capsys):
    """Weights whose head fits another class count: the warning comes once per fold (and once to check them)."""
    import torch

    from ussf_lib.models import build_model

    torch.save(build_model("us_sfnet_tiny", 3).state_dict(), tmp_path / "three_classes.pt")
    code = main(["cv", "--manifest", str(phantom_dir / "manifest.csv"), "--group-col", "patient", "--model",
                 "us_sfnet_tiny", "--weights", str(tmp_path / "three_classes.pt"), "--folds", "2", "--epochs", "1",
                 "--image-size", "16", "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "classifier head does not fit" in line]
    assert len(warned) == 1 and warned[0].startswith("ussf cv: warning: ")


def test_progress_bars_only_on_a_terminal_unless_turned_off(monkeypatch):
    import argparse

    from ussf_lib.cli import build_parser, show_progress

    parser = build_parser()
    default, off = parser.parse_args(["cv", "--data", "d"]), parser.parse_args(["cv", "--data", "d", "--no-progress"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert show_progress(default) is True and show_progress(off) is False
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # a log file: no bar fragments in it
    assert show_progress(default) is False and show_progress(argparse.Namespace(progress=None)) is False

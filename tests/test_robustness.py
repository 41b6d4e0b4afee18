"""Bad data, unusual images, interruptions and checkpoints, end to end through the ``ussf`` command line.

Every mistake in the input must end in one line on stderr naming the file or value and the fix, exit code 2,
no traceback, and nothing written: neither into the data folder nor a run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ussf_lib.cli import main
from ussf_lib.errors import UserError
from ussf_lib.training.experiment import CVConfig, run_cv
from ussf_lib.training.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "us_sfnet_tiny", "--folds", "2", "--epochs", "1", "--image-size", "16", "--batch-size", "8",
        "--no-progress"]


def _pattern(seed: int, size: int = 24) -> Image.Image:
    """A smooth random grayscale picture; distinct seeds are far apart in perceptual hash (no false duplicates)."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _tree(root: Path, counts: dict[str, int] | None = None, seed: int = 0) -> Path:
    counts = counts or {"a": 3, "b": 3}
    for c, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _pattern(seed + 100 * c + i, 12).save(root / cls / f"{i}.png")
    return root


def _manifest(t: Path, rows: dict, images: int = 4) -> list[str]:
    root = t / "m"
    root.mkdir()
    for i in range(images):
        _pattern(i, 12).save(root / f"{i}.png")
    _pattern(99, 12).save(t / "outside.png")
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    return ["--manifest", str(root / "m.csv")]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _with_file(name: str, content: bytes | str) -> callable:
    def make(t: Path, mp) -> list[str]:
        root = _tree(t / "d")
        target = root / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        return ["--data", str(root)]
    return make


def _truncated(t: Path, mp) -> list[str]:
    root = _tree(t / "d")
    buf = root / "a" / "0.png"
    (root / "b" / "truncated.png").write_bytes(_png_bytes(_pattern(5, 64))[:120])
    assert buf.is_file()
    return ["--data", str(root)]


def _png_bytes(image: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _bomb(side: int):
    def make(t: Path, mp) -> list[str]:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 12x12 images pass; side*side is over the limit
        root = _tree(t / "d")
        _pattern(7, side).save(root / "a" / "bomb.png")
        return ["--data", str(root)]
    return make


BAD_INPUTS = {
    "missing folder": (lambda t, mp: ["--data", str(t / "missing")], "no such folder"),
    "missing manifest": (lambda t, mp: ["--manifest", str(t / "nope.csv")], "no such manifest file"),
    "folder is a file": (lambda t, mp: (t / "f.png").write_text("x") and ["--data", str(t / "f.png")], "is a file"),
    "empty folder": (lambda t, mp: (t / "empty").mkdir() or ["--data", str(t / "empty")], "no images found"),
    "single class": (lambda t, mp: ["--data", str(_tree(t / "d", {"only": 4}))], "only one class"),
    "fewer images than folds": (lambda t, mp: ["--data", str(_tree(t / "d", {"a": 5, "b": 1}))],
                                "class 'b' has 1 images, fewer than --folds 2"),
    "truncated image": (_truncated, "truncated.png: cannot read image"),
    "text with image extension": (_with_file("a/fake.jpg", "this is text"), "fake.jpg: not an image"),
    "empty image file": (_with_file("b/zero.png", b""), "zero.png: not an image"),
    "decompression bomb": (_bomb(50), "bomb.png: more pixels than the decompression-bomb limit"),
    "decompression bomb (warning range)": (_bomb(40), "bomb.png: more pixels than the decompression-bomb limit"),
    "label outside --classes": (lambda t, mp: ["--data", str(_tree(t / "d", {"a": 2, "b": 2, "c": 2})),
                                               "--classes", "a,b"], "labels ['c'] are not in the class list"),
    "manifest: missing file": (lambda t, mp: _manifest(t, {"path": ["0.png", "gone.png"], "label": ["x", "y"]}),
                               "'gone.png' does not exist"),
    "manifest: no label column": (lambda t, mp: _manifest(t, {"path": ["0.png", "1.png"], "class": ["x", "y"]}),
                                  "missing column(s) ['label']"),
    "manifest: duplicate rows": (lambda t, mp: _manifest(t, {"path": ["0.png", "0.png", "1.png"],
                                                             "label": ["x", "x", "y"]}), "listed more than once"),
    "manifest: label outside --classes": (
        lambda t, mp: _manifest(t, {"path": ["0.png", "1.png", "2.png"], "label": ["x", "y", "z"]}) + ["--classes", "x,y"],
        "labels ['z'] are not in the class list"),
    "manifest: a folder listed as an image": (
        lambda t, mp: _manifest(t, {"path": [".", "1.png"], "label": ["x", "y"]}), "'.' is a folder"),
    "manifest: --out among images listed from elsewhere": (
        lambda t, mp: _manifest(t, {"path": ["../outside.png", "1.png"], "label": ["x", "y"]})
        + ["--out", str(t / "run")], "is inside the data folder"),
    "manifest: empty label": (lambda t, mp: _manifest(t, {"path": ["0.png", "1.png"], "label": ["x", " "]}),
                              "empty label"),
    "manifest: empty file": (lambda t, mp: (t / "e.csv").write_text("") and 0 or ["--manifest", str(t / "e.csv")],
                             "not a readable CSV"),
    "manifest: group column missing": (
        lambda t, mp: _manifest(t, {"path": ["0.png", "1.png"], "label": ["x", "y"]}) + ["--group-col", "patient"],
        "missing column(s) ['patient']"),
    "--out inside the data": (lambda t, mp: ["--data", str(_tree(t / "d")), "--out", str(t / "d" / "run")],
                              "is inside the data folder"),
    "--splits from other data": (
        lambda t, mp: ["--data", str(_tree(t / "d")), "--splits", str(_splits_file(t))], "not in the splits file"),
    "--resume of a non-run folder": (lambda t, mp: (t / "notrun").mkdir() or ["--resume", str(t / "notrun")],
                                     "no config.json"),
    # Settings that only fail when used: all checked before the run folder is created.
    "--weights missing": (lambda t, mp: ["--data", str(_tree(t / "d")), "--weights", str(t / "nope.pt")],
                          "nope.pt does not exist"),
    "--weights not a torch file": (
        lambda t, mp: (t / "w.pt").write_text("text") and ["--data", str(_tree(t / "d")), "--weights", str(t / "w.pt")],
        "is not a loadable PyTorch file"),
    "--device unknown": (lambda t, mp: ["--data", str(_tree(t / "d")), "--device", "gpu7"],
                         "--device gpu7: not a device name"),
    "--weight-decay negative": (lambda t, mp: ["--data", str(_tree(t / "d")), "--weight-decay", "-1"],
                                "--weight-decay: -1 must be 0 or more"),
    "--classes twice": (lambda t, mp: ["--data", str(_tree(t / "d")), "--classes", "a,a,b"], "a is listed twice"),
    "--cache-dir is a file": (
        lambda t, mp: (t / "c.bin").write_text("x") and ["--data", str(_tree(t / "d")), "--cache-dir", str(t / "c.bin")],
        "is a file, not a folder"),
    "--manifest is a folder": (lambda t, mp: ["--manifest", str(_tree(t / "d"))], "is a folder; pass --manifest the CSV"),
    "--weights is a folder": (lambda t, mp: ["--data", str(_tree(t / "d")), "--weights", str(t)],
                              "is a folder; pass the state-dict file"),
    "--lr inf": (lambda t, mp: ["--data", str(_tree(t / "d")), "--lr", "inf"], "--lr: inf must be a positive number"),
    "empty class folder beside one class": (lambda t, mp: (_tree(t / "d", {"a": 3}) / "b").mkdir() or
                                            ["--data", str(t / "d")], "only one class (a) holds images; the class folder(s) b"),
    "--out inside the manifest's folder": (
        lambda t, mp: _manifest(t, {"path": ["0.png", "1.png"], "label": ["x", "y"]}) + ["--out", str(t / "m" / "run")],
        "is inside the data folder"),
    "manifest: empty group id": (
        lambda t, mp: _manifest(t, {"path": ["0.png", "1.png"], "label": ["x", "y"], "patient": ["p1", " "]})
        + ["--group-col", "patient"], "1 row(s) have an empty patient"),
    "--splits leave a class untrained": (
        lambda t, mp: ["--data", str(_tree(t / "d")), "--splits", str(_splits_file(t, {"a": [0, 0, 0], "b": [0, 1, 1]}))],
        "fold 0 trains on no 'a' image"),
}


def _splits_file(t: Path, folds: dict[str, list[int]] | None = None) -> Path:
    """A splits.csv with ``folds[class][i]`` for image ``<class>/<i>.png`` (default: one image, a/0.png)."""
    folds = folds or {"a": [0]}
    rows = [(f"{c}/{i}.png", c, k) for c, ks in folds.items() for i, k in enumerate(ks)]
    path = t / "splits.csv"
    pd.DataFrame({"path": [r[0] for r in rows], "label": [r[1] for r in rows], "group": [r[0] for r in rows],
                  "fold": [r[2] for r in rows]}).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, case):
    make, match = BAD_INPUTS[case]
    args = make(tmp_path, monkeypatch)
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp_path / "run")]
    before = _snapshot(tmp_path)
    try:
        code = main(["cv", *args, *FAST])
    except SystemExit as exc:  # a value argparse refuses exits from inside parse_args, with the same one line
        code = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, (case, captured.out, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ussf cv: error: ") and match in err and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before  # neither the data nor a run folder was touched
    assert not (tmp_path / "run").exists() and not (tmp_path / "m" / "run").exists()


def test_every_unreadable_file_is_named_in_one_error_before_training(tmp_path, capsys):
    root = _tree(tmp_path / "d")
    (root / "a" / "broken.png").write_bytes(_png_bytes(_pattern(5, 64))[:100])
    (root / "b" / "fake.png").write_text("not a picture")
    before = _snapshot(tmp_path)
    assert main(["cv", "--data", str(root), "--out", str(tmp_path / "run"), *FAST]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "2 unreadable image(s)" in err
    assert "broken.png" in err and "fake.png" in err and "--skip-bad" in err
    assert "epoch" not in captured.out  # no training started
    assert _snapshot(tmp_path) == before


def _unusual_tree(root: Path) -> Path:
    """Every mode Pillow hands us, odd sizes, unicode and spaces in folder and file names, and an empty class."""
    first, second = root / "bénin ign", root / "mal ignant ü"
    first.mkdir(parents=True)
    second.mkdir()
    (root / "empty class").mkdir()
    _pattern(1).save(first / "gray L.png")
    Image.fromarray((np.asarray(_pattern(2), dtype=np.uint16) * 257)).save(first / "sixteen bit ü.png")
    _pattern(3).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(first / "palette.png", transparency=0)
    rgba = _pattern(4).convert("RGBA")
    rgba.putalpha(_pattern(5))
    rgba.save(first / "rgba alpha.png")
    la = _pattern(6).convert("LA")
    la.putalpha(_pattern(7))
    la.save(first / "la.png")
    _pattern(8).convert("CMYK").save(second / "cmyk.jpg")
    _pattern(9).convert("1").save(second / "one bit.bmp")
    Image.new("L", (1, 1), 200).save(second / "dot 1x1.png")
    Image.new("RGB", (37, 5), (10, 200, 30)).save(second / "wide thin.tif")
    _pattern(10).convert("RGB").save(second / "rgb.tiff")
    return root


def test_unusual_images_are_converted_not_rejected(tmp_path, capsys):
    root = _unusual_tree(tmp_path / "unusual data")
    before = _snapshot(root)
    out = tmp_path / "run"
    assert main(["cv", "--data", str(root), "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    # The empty class folder is ignored with one warning line, and nothing else reaches stderr.
    assert captured.err.strip().splitlines() == [
        f"ussf cv: warning: {root / 'empty class'}: class folder holds no images and is ignored"]
    pred = pd.concat(pd.read_csv(p) for p in sorted(out.glob("folds/*/predictions.csv")))
    assert len(pred) == 10 and set(pred["label"]) == {"bénin ign", "mal ignant ü"}
    assert "bénin ign/sixteen bit ü.png" in set(pred["path"])
    assert json.loads((out / "summary.json").read_text())["classes"] == ["bénin ign", "mal ignant ü"]
    assert _snapshot(root) == before


def _bad_tree(root: Path) -> Path:
    _tree(root)
    (root / "a" / "broken.png").write_bytes(_png_bytes(_pattern(5, 64))[:100])
    (root / "b" / "fake.png").write_text("not a picture")
    (root / "a" / "zcopy.png").write_bytes((root / "a" / "0.png").read_bytes())  # a duplicate of a/0.png
    return root


def test_skip_bad_leaves_unreadable_files_out_of_splits_and_predictions(tmp_path, capsys):
    root = _bad_tree(tmp_path / "d")
    before = _snapshot(root)
    out = tmp_path / "run"
    assert main(["cv", "--data", str(root), "--out", str(out), "--skip-bad", *FAST]) == 0
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().out
    skipped = pd.read_csv(out / "skipped.csv")
    assert list(skipped.columns) == ["path", "reason"]
    assert skipped["path"].tolist() == ["a/broken.png", "b/fake.png"]
    assert skipped["reason"].str.contains("cannot read image|not an image").all()
    splits = pd.read_csv(out / "splits.csv")
    pred = pd.concat(pd.read_csv(p) for p in out.glob("folds/*/predictions.csv"))
    assert sorted(splits["path"]) == sorted(pred["path"]) and len(splits) == 7
    assert not set(splits["path"]) & set(skipped["path"])
    # The duplicate pair is one group, in one fold (default --dedup-folds).
    dup = splits.set_index("path").loc[["a/0.png", "a/zcopy.png"]]
    assert dup["group"].tolist() == ["a/0.png", "a/0.png"] and dup["fold"].nunique() == 1
    assert json.loads((out / "config.json").read_text())["skip_bad"] is True
    assert _snapshot(root) == before


def test_no_dedup_folds_records_one_group_per_image(tmp_path, capsys):
    root = _bad_tree(tmp_path / "d")
    out = tmp_path / "run"
    assert main(["cv", "--data", str(root), "--out", str(out), "--skip-bad", "--no-dedup-folds", *FAST]) == 0
    splits = pd.read_csv(out / "splits.csv")
    assert (splits["group"] == splits["path"]).all()
    assert json.loads((out / "config.json").read_text())["dedup_folds"] is False


def test_skip_bad_still_refuses_a_class_left_too_small(tmp_path, capsys):
    root = _tree(tmp_path / "d", {"a": 3, "b": 1})
    (root / "b" / "x.png").write_text("x")
    (root / "b" / "y.png").write_text("y")
    before = _snapshot(tmp_path)
    assert main(["cv", "--data", str(root), "--out", str(tmp_path / "run"), "--skip-bad", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class 'b' has 1 images, fewer than --folds 2" in err
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- runs, checkpoints, interruptions

RUN_ARGS = ["--model", "us_sfnet_tiny", "--image-size", "32", "--folds", "2", "--epochs", "3", "--batch-size", "8",
            "--seed", "0", "--no-progress"]


@pytest.fixture(scope="module")
def ref_run(phantom_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-fold, 3-epoch run on the phantom: the reference for the interrupted one."""
    out = tmp_path_factory.mktemp("robust") / "ref"
    assert main(["cv", "--data", str(phantom_dir), *RUN_ARGS, "--out", str(out)]) == 0
    return out


def test_run_folder_records_config_environment_and_data(ref_run):
    env = json.loads((ref_run / "environment.json").read_text())
    assert {"python", "platform", "packages", "device", "git_commit", "data_fingerprint"} <= set(env)
    assert {"torch", "torchvision", "numpy", "pillow", "scikit-learn"} <= set(env["packages"])
    assert env["packages"]["torch"] and len(env["data_fingerprint"]) == 64
    assert env["git_commit"] is None or isinstance(env["git_commit"], str)
    config = json.loads((ref_run / "config.json").read_text())
    assert {"seed", "model", "epochs", "folds", "image_size", "skip_bad", "dedup_folds", "dup_threshold",
            "hash_size", "deterministic"} <= set(config)
    assert config["dedup_folds"] is True and config["seed"] == 0


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(phantom_dir, ref_run, tmp_path, capsys):
    out = tmp_path / "killed"
    # Same thread count as this process, so the killed run's epochs compute exactly what the reference computed.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "ussf_lib", "cv", "--data", str(phantom_dir), *RUN_ARGS,
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt = out / "folds" / "0" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 180
        while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        assert ckpt.is_file(), "no checkpoint after 180 s"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    fold0_unfinished = not (out / "folds" / "0" / "predictions.csv").exists()
    capsys.readouterr()
    assert main(["cv", "--resume", str(out), "--no-progress"]) == 0
    log = capsys.readouterr().out
    # Killed right after fold 0's first checkpoint, fold 0 is almost always mid-way; on a machine so loaded that
    # it finished first, the resume must say it skipped it. Either way the log says what happened to fold 0.
    if fold0_unfinished:
        assert "fold 0: resuming after epoch" in log and "fold 0: already finished" not in log
    else:
        assert "fold 0: already finished, skipped" in log
    assert (out / "summary.json").read_text() == (ref_run / "summary.json").read_text()
    assert (out / "splits.csv").read_text() == (ref_run / "splits.csv").read_text()


def _tampered(ckpt: Path, dest: Path, meta: dict | None = None, weights: dict | None = None) -> Path:
    state = torch.load(ckpt, weights_only=True)
    state["meta"] = {**state["meta"], **(meta or {})}
    state["model"] = {**state["model"], **(weights or {})}
    torch.save(state, dest)
    return dest


def test_predict_refuses_a_checkpoint_from_another_model_or_class_list(ref_run, phantom_dir, tmp_path, capsys):
    ckpt = ref_run / "folds" / "0" / "checkpoint.pt"
    classes = json.loads((ref_run / "classes.json").read_text())
    with pytest.raises(UserError, match=r"checkpoint was made for classes=.*not classes="):
        load_checkpoint(ckpt, expect_classes=classes[::-1])
    with pytest.raises(UserError, match=r"model_name='us_sfnet_tiny', not model_name='us_sfnet'"):
        load_checkpoint(ckpt, expect_model="us_sfnet")
    model, meta = load_checkpoint(ckpt, expect_model="us_sfnet_tiny", expect_classes=classes)
    assert meta["classes"] == classes
    image = str(sorted((phantom_dir / "benign").glob("*.png"))[0])
    other_classes = _tampered(ckpt, tmp_path / "three.pt", meta={"classes": classes[:3]})
    other_model = _tampered(ckpt, tmp_path / "model.pt", meta={"model_name": "us_sfnet"})
    for bad, match in ((other_classes, "weights do not fit model 'us_sfnet_tiny' with 3 classes"),
                       (other_model, "weights do not fit model 'us_sfnet' with 4 classes"),
                       (tmp_path / "nothing.pt", "no such checkpoint")):
        capsys.readouterr()
        assert main(["predict", "--checkpoint", str(bad), image]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err and str(bad) in err, err


def test_resume_refuses_a_checkpoint_from_another_model_or_class_list(ref_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    (run / "folds" / "1" / "predictions.csv").unlink()  # fold 1 unfinished: its checkpoint will be loaded
    ckpt = run / "folds" / "1" / "checkpoint.pt"
    classes = json.loads((run / "classes.json").read_text())
    original = ckpt.read_bytes()
    cases = [({"meta": {"classes": classes[::-1]}}, "checkpoint was made for classes="),
             ({"meta": {"model_name": "us_sfnet"}}, "checkpoint was made for model_name='us_sfnet'"),
             ({"weights": {"head.fc.bias": torch.zeros(3)}}, "weights do not fit model 'us_sfnet_tiny'")]
    for change, match in cases:
        ckpt.write_bytes(original)
        _tampered(ckpt, ckpt, **change)
        before = _snapshot(run)
        capsys.readouterr()
        assert main(["cv", "--resume", str(run), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err and str(ckpt) in err, err
        assert _snapshot(run) == before  # refused before anything was written
    ckpt.write_text("garbage")
    assert main(["cv", "--resume", str(run), "--no-progress"]) == 2
    assert "not a ussf checkpoint" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_works_from_another_folder(ref_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    config = json.loads((run / "config.json").read_text())
    assert all(Path(config[k]).is_absolute() for k in ("out", "data"))  # resolved: resumable from anywhere
    (run / "folds" / "1" / "predictions.csv").unlink()
    before = _snapshot(run)
    for flags, match in ((["--epochs", "9"], "--epochs 9 (the run has 3)"),
                         (["--epochs", "150"], "--epochs 150 (the run has 3)"),  # the flag's default, typed
                         (["--model=us_sfnet"], "--model us_sfnet (the run has us_sfnet_tiny)"),
                         (["--model", "resnet18"], "--model resnet18 (the run has us_sfnet_tiny)"),
                         (["--eval-every", "2"], "--eval-every 2 (the run has 1)"),
                         (["--data", str(tmp_path)], f"--data {tmp_path} (the run has {config['data']})")):
        capsys.readouterr()
        assert main(["cv", "--resume", str(run), "--no-progress", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err and "continues with the run's own settings" in err, err
        assert _snapshot(run) == before
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # from another folder, with a setting given again unchanged and two a resume may change
    assert main(["cv", "--resume", "../run", "--no-progress", "--epochs", "3", "--device", "cpu",
                 "--checkpoint-every", "2"]) == 0
    assert (run / "folds" / "1" / "predictions.csv").is_file() and list(elsewhere.iterdir()) == []
    resumed = json.loads((run / "config.json").read_text())
    assert resumed["out"] == str(run)  # absolute, though typed relative
    assert (resumed["device"], resumed["checkpoint_every"], resumed["eval_every"]) == ("cpu", 2, 1)


def test_resume_refuses_data_that_changed(tmp_path, capsys):
    root = _tree(tmp_path / "d")
    out = tmp_path / "run"
    cfg = CVConfig(out=str(out), data=str(root), model="us_sfnet_tiny", folds=2, epochs=1, image_size=16,
                   batch_size=8, progress=False)
    with pytest.warns(UserWarning, match=r"fold\(s\) \[1\] of 2 have no predictions.csv"):  # tables of fold 0
        run_cv(cfg, folds_to_run=[0], log=lambda _: None)
    _pattern(1234, 12).save(root / "a" / "0.png")
    before = _snapshot(out)
    assert main(["cv", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the data changed since this run started" in err
    assert _snapshot(out) == before
    root.rename(tmp_path / "moved")
    assert main(["cv", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ussf cv: error: {out}: the run's data --data {root} is gone; put it back at that path to resume "
                   "(a resumed run reads the data it started with), or start a new run")
    assert _snapshot(out) == before


def test_damaged_config_is_a_clear_error(ref_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    (run / "config.json").write_text('{"model": "us_sfnet_ti')  # cut short
    assert main(["cv", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json: not readable JSON" in err

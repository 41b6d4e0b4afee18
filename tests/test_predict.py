"""``ussf predict`` with a whole run: the k-fold ensemble, TTA, --skip-bad, the CSV columns and one-line refusals."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ussf_lib.cli import main
from ussf_lib.errors import UserError
from ussf_lib.predict import predict_images

PROBS = ["prob_benign", "prob_metastatic", "prob_normal", "prob_primary"]


def _ussf(*args: str) -> None:
    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-fold run of us_sfnet_tiny at 32 px on a 12-per-class phantom, as the command line makes it."""
    root = tmp_path_factory.mktemp("predict")
    _ussf("phantom", "--out", str(root / "ph"), "--n-per-class", "12", "--image-size", "32")
    _ussf("cv", "--manifest", str(root / "ph" / "manifest.csv"), "--group-col", "patient", "--model", "us_sfnet_tiny",
          "--epochs", "1", "--folds", "2", "--image-size", "32", "--batch-size", "16", "--out", str(root / "run"),
          "--no-progress")
    images = sorted((root / "ph").glob("*/*.png"))[::6]  # 8 images, two of each class
    return {"run": root / "run", "images": images, "root": root}


def _fold(run, k):
    return run / "folds" / str(k) / "checkpoint.pt"


def _predict_cli(capsys, *args):
    capsys.readouterr()
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_a_run_averages_the_probabilities_of_all_its_folds(tiny):
    run, images = tiny["run"], tiny["images"]
    ensemble = predict_images(run, images, device="cpu")
    folds = [predict_images(_fold(run, k), images, device="cpu") for k in (0, 1)]
    assert not np.allclose(folds[0][PROBS], folds[1][PROBS], atol=1e-4)  # two different models
    np.testing.assert_allclose(ensemble[PROBS].to_numpy(), (folds[0][PROBS].to_numpy() + folds[1][PROBS].to_numpy()) / 2,
                               atol=2e-6)
    assert ensemble["pred"].tolist() == [c.removeprefix("prob_") for c in ensemble[PROBS].idxmax(axis=1)]
    assert ensemble["n_models"].tolist() == [2] * len(images) and folds[0]["n_models"].tolist() == [1] * len(images)
    assert not ensemble["tta"].any()


def test_the_csv_has_n_models_and_tta_columns(tiny, capsys):
    code, out, err = _predict_cli(capsys, "--checkpoint", tiny["run"], "--tta", *tiny["images"][:3])
    assert code == 0 and err == ""
    frame = pd.read_csv(io.StringIO(out), dtype={"tta": str})
    assert list(frame.columns) == ["path", "pred", *PROBS, "n_models", "tta"]
    assert frame["n_models"].tolist() == [2, 2, 2] and frame["tta"].tolist() == ["true"] * 3
    np.testing.assert_allclose(frame[PROBS].sum(axis=1), 1, atol=1e-5)
    code, out, _ = _predict_cli(capsys, "--checkpoint", _fold(tiny["run"], 1), tiny["images"][0])
    assert out.splitlines()[1].endswith(",1,false")


def test_tta_averages_the_image_and_its_mirror_image(tiny, tmp_path):
    pixels = np.asarray(Image.open(tiny["images"][0]).convert("RGB"))
    Image.fromarray(pixels).save(tmp_path / "image.png")
    Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(tmp_path / "mirror.png")
    paths = [tmp_path / "image.png", tmp_path / "mirror.png"]
    plain = predict_images(tiny["run"], paths, device="cpu")[PROBS].to_numpy()
    tta = predict_images(tiny["run"], paths, device="cpu", tta=True)
    assert not np.allclose(plain[0], plain[1], atol=1e-4)  # the mirror image alone is classified otherwise
    np.testing.assert_allclose(tta[PROBS].to_numpy(), np.tile(plain.mean(axis=0), (2, 1)), atol=2e-6)
    assert tta["tta"].all()


def test_tta_changes_nothing_for_a_mirror_symmetric_image(tiny, tmp_path):
    pixels = np.asarray(Image.open(tiny["images"][1]).convert("RGB"))
    symmetric = np.concatenate([pixels[:, :16], pixels[:, :16][:, ::-1]], axis=1)
    assert symmetric.shape == (32, 32, 3) and (symmetric == symmetric[:, ::-1]).all()
    Image.fromarray(symmetric).save(tmp_path / "symmetric.png")
    plain = predict_images(tiny["run"], [tmp_path / "symmetric.png"], device="cpu")
    tta = predict_images(tiny["run"], [tmp_path / "symmetric.png"], device="cpu", tta=True)
    np.testing.assert_array_equal(tta[PROBS].to_numpy(), plain[PROBS].to_numpy())


def test_an_unreadable_image_stops_with_one_line_naming_it_and_the_flag(tiny, tmp_path, capsys):
    bad = tmp_path / "scan.png"
    bad.write_text("not an image")
    code, out, err = _predict_cli(capsys, "--checkpoint", tiny["run"], tiny["images"][0], bad)
    assert code == 2 and out == ""
    assert err == (f"ussf predict: error: {bad}: not an image Pillow can read (wrong extension, or not an image at "
                   "all); replace or remove the file, or pass --skip-bad to leave unreadable images out")


def test_skip_bad_leaves_unreadable_images_out_with_one_warning(tiny, tmp_path, capsys):
    text = tmp_path / "a_text.png"
    text.write_text("not an image")
    truncated = tmp_path / "b_truncated.png"
    truncated.write_bytes(tiny["images"][0].read_bytes()[:60])
    good = tiny["images"][:2]
    code, out, err = _predict_cli(capsys, "--checkpoint", tiny["run"], "--skip-bad", text, good[0], truncated, good[1])
    assert code == 0
    frame = pd.read_csv(io.StringIO(out))
    assert frame["path"].tolist() == [str(p) for p in good]
    expected = predict_images(tiny["run"], good, device="cpu")
    np.testing.assert_array_equal(frame[PROBS].to_numpy(), expected[PROBS].to_numpy())
    assert err == (f"ussf predict: warning: left out 2 unreadable image(s) (--skip-bad); the first: {text}: not an "
                   "image Pillow can read (wrong extension, or not an image at all)")
    code, out, err = _predict_cli(capsys, "--checkpoint", tiny["run"], "--skip-bad", text)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"ussf predict: error: none of the 1 image(s) could be read; the first: {text}: ")


def _copy_run(tiny, dest):
    shutil.copytree(tiny["run"], dest)
    return dest


def test_a_run_whose_folds_disagree_is_refused_in_one_line(tiny, tmp_path, capsys):
    run = _copy_run(tiny, tmp_path / "run")
    state = torch.load(_fold(run, 1), weights_only=True)
    state["meta"]["image_size"] = 48  # us_sfnet_tiny's weights fit any size: only the metadata tells
    torch.save(state, _fold(run, 1))
    code, out, err = _predict_cli(capsys, "--checkpoint", run, tiny["images"][0])
    assert code == 2 and out == ""
    assert err == (f"ussf predict: error: {_fold(run, 1)}: checkpoint was made for image_size=48, not image_size=32; "
                   f"{_fold(run, 0)} was made for the latter, and the folds of one run must agree; pass one "
                   "checkpoint file instead")


def test_a_comparison_folder_is_refused_naming_its_model_runs(tiny, tmp_path, capsys):
    comparison = tmp_path / "cmp"
    _copy_run(tiny, comparison / "us_sfnet_tiny")
    _copy_run(tiny, comparison / "densenet121")
    code, out, err = _predict_cli(capsys, "--checkpoint", comparison, tiny["images"][0])
    assert code == 2 and out == ""
    assert err == (f"ussf predict: error: {comparison}: is a comparison folder holding the model runs densenet121, "
                   f"us_sfnet_tiny; pass one of them, e.g. --checkpoint {comparison / 'densenet121'}")


def test_an_unfinished_or_empty_run_is_refused_and_a_missing_fold_is_said(tiny, tmp_path, capsys):
    run = _copy_run(tiny, tmp_path / "run")
    (run / "folds" / "1" / "predictions.csv").unlink()
    code, _, err = _predict_cli(capsys, "--checkpoint", run, tiny["images"][0])
    assert code == 2 and err == (f"ussf predict: error: {run}: fold(s) 1 are unfinished (a checkpoint but no "
                                 f"predictions.csv); finish the run with `ussf cv --resume {run}`, or pass one "
                                 "finished fold's checkpoint")
    shutil.rmtree(run / "folds" / "1")
    code, out, err = _predict_cli(capsys, "--checkpoint", run, tiny["images"][0])
    assert code == 0 and pd.read_csv(io.StringIO(out))["n_models"].tolist() == [1]
    assert err == f"ussf predict: warning: {run}: averaging 1 of the run's 2 folds; fold(s) 1 have no checkpoint"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no fold checkpoints"):
        predict_images(tmp_path / "empty", tiny["images"][:1], device="cpu")

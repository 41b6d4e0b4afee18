"""``ussf explain``: CAM overlays, target layers of every registered model, the Conv-FFT frequency view.

Nothing is trained: checkpoints hold freshly initialised weights in the format ``ussf cv`` writes (what
``ussf_lib.predict.read_checkpoint`` reads), at 32 px (DenseNet at 64 px, so its last map is 2x2, not 1x1).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from ussf_lib.errors import UserError
from ussf_lib.explain import METHOD_NAMES, add_explain_parser
from ussf_lib.explain.frequency import RESPONSE_COLUMNS, SHARE_COLUMNS, analyse_blocks, explain_frequency
from ussf_lib.explain.gradcam import (EXPLAIN_COLUMNS, METHODS, compute_cams, explain_images, nhwc_to_nchw,
                                      target_layer, vit_tokens_to_map)
from ussf_lib.models import TINY_DEPTHS, build_model, get_spec, list_models

CLASSES = ["benign", "metastatic", "normal", "primary"]


def _save_checkpoint(run, name: str, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, len(CLASSES), image_size=image_size)
    meta = {"model_name": name, "classes": CLASSES, "image_size": image_size, "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25], "model_kwargs": {}}
    path = run / "folds" / "0" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "meta": meta}, path)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Eight phantom images (two per class) in one folder, and two runs: us_sfnet_tiny and densenet121."""
    from ussf_lib.data.phantom import generate_phantom

    root = tmp_path_factory.mktemp("explain")
    generate_phantom(root / "phantom", n_per_class=2, image_size=32, seed=0)
    images = root / "images"
    images.mkdir()
    for p in sorted((root / "phantom").glob("*/*.png")):
        shutil.copy(p, images / p.name)
    _save_checkpoint(root / "tiny_run", "us_sfnet_tiny", 32)
    _save_checkpoint(root / "densenet_run", "densenet121", 64)
    return {"root": root, "images": images, "tiny": root / "tiny_run" / "folds" / "0" / "checkpoint.pt",
            "tiny_run": root / "tiny_run", "densenet": root / "densenet_run" / "folds" / "0" / "checkpoint.pt"}


@pytest.mark.parametrize("which", ["tiny", "densenet"])
def test_overlays_and_table_for_us_sfnet_and_a_baseline(material, tmp_path, which):
    frame = explain_images(material[which], [material["images"]], tmp_path / "out", method="gradcam", device="cpu")
    table = pd.read_csv(tmp_path / "out" / "explain.csv")
    assert list(table.columns) == list(EXPLAIN_COLUMNS) and len(table) == 8
    pd.testing.assert_frame_equal(table, frame, check_dtype=False)
    assert set(table["pred"]) <= set(CLASSES) and (table["target"] == table["pred"]).all()
    assert table["prob"].between(0.25 - 1e-9, 1).all()  # the top of 4 probabilities
    assert sorted(table["path"]) == sorted(str(p) for p in material["images"].glob("*.png"))
    for overlay in table["overlay"]:
        assert (tmp_path / "out" / overlay).stat().st_size > 1000


def test_a_run_folder_uses_fold_0_and_says_so_and_a_class_target_is_kept(material, tmp_path):
    with pytest.warns(UserWarning, match="fold 0 checkpoint"):
        frame = explain_images(material["tiny_run"], sorted(material["images"].glob("*.png"))[:3], tmp_path,
                               method="gradcam++", target="normal", device="cpu")
    assert len(frame) == 3 and (frame["target"] == "normal").all()


def test_scorecam_and_eigencam_give_maps_in_0_1(material):
    from ussf_lib.explain.gradcam import load_images, to_model_input
    from ussf_lib.predict import load_checkpoint

    model, meta = load_checkpoint(material["tiny"])
    x = to_model_input(load_images(sorted(material["images"].glob("*.png"))[:2], meta), meta, torch.device("cpu"))
    for method in ("scorecam", "eigencam"):  # scorecam: one pass over 64 masked copies per image
        cams, probs = compute_cams(model, meta["model_name"], x, method, targets=[1, 2], batch_size=64)
        assert cams.shape == (2, 32, 32) and cams.min() >= 0 and cams.max() <= 1 + 1e-6
        assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1)


def test_a_1x1_cam_layer_is_warned_about():
    model = build_model("us_sfnet_tiny", 4, image_size=16).eval()  # 16 px: the last stage is 1x1
    with pytest.warns(UserWarning, match="1x1 map"):
        compute_cams(model, "us_sfnet_tiny", torch.randn(1, 3, 16, 16))


def test_duplicate_stems_get_distinct_overlays(material, tmp_path):
    first = sorted(material["images"].glob("*.png"))[0]
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy(first, other / first.name)
    frame = explain_images(material["tiny"], [first, other / first.name], tmp_path / "out", device="cpu")
    assert frame["overlay"].tolist() == [f"overlays/{first.stem}.png", f"overlays/{first.stem}-2.png"]


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "gradcam3"}, "unknown CAM method 'gradcam3'; choose one of: gradcam, gradcam++"),
    ({"target": "cyst"}, "--target 'cyst' is not a class of this checkpoint; use pred or one of: benign,"),
    ({"batch_size": 0}, "batch_size=0 must be a positive whole number"),
])
def test_bad_options_are_one_line_user_errors(material, tmp_path, kwargs, message):
    with pytest.raises(UserError) as info:
        explain_images(material["tiny"], [material["images"]], tmp_path / "out", device="cpu", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_paths_are_one_line_user_errors(material, tmp_path):
    cases = [
        (tmp_path / "missing.pt", [material["images"]], tmp_path / "o1", "no such checkpoint"),
        (material["root"], [material["images"]], tmp_path / "o2", "is a folder, not a checkpoint"),
        (material["tiny"], [tmp_path / "nothing"], tmp_path / "o3", "no such file or folder"),
        (material["tiny"], [material["images"]], material["images"] / "out", "is inside the data folder"),
    ]
    for checkpoint, inputs, out, message in cases:
        with pytest.raises(UserError, match=message) as info:
            explain_images(checkpoint, inputs, out, device="cpu")
        assert "\n" not in str(info.value)


def test_method_choices_are_the_methods_known():
    assert METHOD_NAMES == tuple(METHODS)
    import pytorch_grad_cam

    assert all(hasattr(pytorch_grad_cam, cls) for cls in METHODS.values())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_has_a_target_layer_giving_a_feature_map(name):
    """Baselines are built on the meta device (no memory, no arithmetic): only the shapes are checked. US-SFNet's
    FFTs need real tensors: us_sfnet_tiny runs on the CPU; us_sfnet, the same layout wider, is only looked up."""
    spec = get_spec(name)
    size = 16 if name.startswith("us_sfnet") else max(32, spec.min_image_size)
    size += -size % spec.size_multiple
    device = "cpu" if name.startswith("us_sfnet") else "meta"
    with torch.device(device):
        model = build_model(name, 4, image_size=size).eval()
        spot = target_layer(model, name)
        assert model.get_submodule(spot.name) is spot.layer
        if name == "us_sfnet":
            assert spot.name == "stages.3" and spot.reshape_transform is None
            return
        seen = []
        handle = spot.layer.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            logits = model(torch.zeros(2, 3, size, size))
        handle.remove()
    fmap = seen[-1] if spot.reshape_transform is None else spot.reshape_transform(seen[-1])
    assert logits.shape == (2, 4) and fmap.dim() == 4 and fmap.shape[0] == 2 and min(fmap.shape[2:]) >= 1
    if name.startswith("us_sfnet"):
        assert spot.name == "stages.3" and fmap.shape[1] == model.widths[-1]
    if name.startswith(("vit", "swin")):
        assert spot.reshape_transform is not None


def test_transformer_reshapes():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2x2 patches, D = 3
    fmap = vit_tokens_to_map(tokens)
    assert fmap.shape == (2, 3, 2, 2) and torch.equal(fmap[:, :, 0, 1], tokens[:, 2, :])
    nhwc = torch.randn(2, 4, 5, 6)
    assert torch.equal(nhwc_to_nchw(nhwc), nhwc.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="square grid"):
        vit_tokens_to_map(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="B, H, W, C"):
        nhwc_to_nchw(torch.zeros(2, 3, 4))


def test_unknown_model_has_no_target_layer():
    with pytest.raises(UserError, match="no CAM target layer is known for model 'alexnet'"):
        target_layer(torch.nn.Linear(2, 2), "alexnet")


def test_frequency_view_tables_and_figure(material, tmp_path):
    shares, response = explain_frequency(material["tiny"], [material["images"]], tmp_path, device="cpu", n_bins=8)
    n_blocks = sum(TINY_DEPTHS)
    assert list(shares.columns) == list(SHARE_COLUMNS) and len(shares) == n_blocks
    parts = shares[["share_identity", "share_spatial", "share_frequency"]].to_numpy()
    assert np.allclose(parts.sum(1), 1.0) and (parts >= 0).all() and (shares["n_images"] == 8).all()
    assert shares["name"].tolist() == ["stages.0.0", "stages.1.0", "stages.1.1", "stages.2.0", "stages.3.0"]
    assert shares["stage"].tolist() == [1, 2, 2, 3, 4] and shares["block"].tolist() == [0, 0, 1, 0, 0]
    assert response.shape == (n_blocks * 8, len(RESPONSE_COLUMNS))
    assert response["radius"].between(0, 0.5).all()
    finite = response["gain"].dropna()
    assert len(finite) > 0 and (finite >= 0).all()
    # Every frequency of the full spectrum within radius 0.5 is counted once (half-spectrum columns twice).
    for _, block in shares.iterrows():
        fy, fx = np.meshgrid(np.fft.fftfreq(block["height"]), np.fft.fftfreq(block["width"]), indexing="ij")
        within = int((np.hypot(fy, fx) <= 0.5 + 1e-12).sum())
        assert response.loc[response["name"] == block["name"], "n_freq"].sum() == within
    assert pd.read_csv(tmp_path / "frequency_shares.csv").shape == shares.shape
    assert pd.read_csv(tmp_path / "frequency_response.csv").shape == response.shape
    assert (tmp_path / "frequency.png").stat().st_size > 5000


def test_branch_shares_match_a_direct_computation():
    torch.manual_seed(1)
    model = build_model("us_sfnet_tiny", 4, image_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    shares, _ = analyse_blocks(model, [x[:2], x[2:]], n_bins=4)
    with torch.no_grad():
        h = model.stem(x)
        block = model.stages[0][0]
        energies = torch.stack([t.square().flatten(1).sum(1) for t in (h, block.spatial(h), block.freq(h))], 1)
    expected = (energies / energies.sum(1, keepdim=True)).mean(0).numpy()
    got = shares.loc[0, ["share_identity", "share_spatial", "share_frequency"]].to_numpy(dtype=float)
    assert np.allclose(got, expected, rtol=1e-5)


def test_frequency_view_refuses_a_model_without_conv_fft_blocks(material, tmp_path):
    with pytest.raises(UserError, match="has no Conv-FFT blocks"):
        explain_frequency(material["densenet"], [material["images"]], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ussf")
    add_explain_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_explain_sub_command(material, tmp_path, capsys):
    args = _parser().parse_args(["explain", "--checkpoint", str(material["tiny"]), str(material["images"]),
                                 "--out", str(tmp_path / "out"), "--method", "layercam", "--target", "benign",
                                 "--frequency", "--bins", "4", "--device", "cpu"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "8 layercam overlay(s) written to" in out and "frequency view of 5 Conv-FFT blocks" in out
    assert (pd.read_csv(tmp_path / "out" / "explain.csv")["target"] == "benign").all()
    assert len(pd.read_csv(tmp_path / "out" / "frequency_response.csv")) == 5 * 4


def test_explain_sub_command_defaults_and_refusals(material, tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["explain", "--checkpoint", "c.pt", "a.png", "b", "--out", "o"])
    assert (args.method, args.target, args.frequency, args.device, args.inputs) == ("gradcam", "pred", False, "auto",
                                                                                     ["a.png", "b"])
    with pytest.raises(SystemExit):
        parser.parse_args(["explain", "--checkpoint", "c.pt", "a.png", "--out", "o", "--method", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    args = parser.parse_args(["explain", "--checkpoint", str(material["densenet"]), str(material["images"]),
                              "--out", str(tmp_path / "out"), "--frequency", "--device", "cpu"])
    with pytest.raises(UserError, match="has no Conv-FFT blocks"):
        args.func(args)
    assert not (tmp_path / "out").exists()  # refused before any overlay was drawn


def test_importing_the_package_for_the_parser_stays_light():
    code = "import sys, ussf_lib.explain; print(sorted(m for m in ('torch', 'pytorch_grad_cam') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


@pytest.fixture
def ussf_main(monkeypatch):
    """``ussf_lib.cli.main`` with the explain sub-command (added here until cli.build_parser adds it itself)."""
    from ussf_lib import cli

    build = cli.build_parser

    def with_explain():
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "explain" not in sub.choices:
            add_explain_parser(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", with_explain)
    return cli.main


def test_cli_main_gives_one_line_warnings_and_errors(material, tmp_path, capsys, ussf_main):
    image = str(sorted(material["images"].glob("*.png"))[0])
    assert ussf_main(["explain", "--checkpoint", str(material["tiny_run"]), image, "--out", str(tmp_path / "a"),
                      "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ussf explain: warning: ") and "fold 0 checkpoint" in err[0]
    assert ussf_main(["explain", "--checkpoint", str(material["tiny"]), image, "--out", str(tmp_path / "b"),
                      "--target", "cyst"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ussf explain: error: --target 'cyst' is not a class of this checkpoint; use pred or one of: "
                   "benign, metastatic, normal, primary"]
    assert ussf_main(["explain", "--checkpoint", str(material["tiny"]), "", "--out", str(tmp_path / "c")]) == 2
    assert "IMAGE_OR_DIR is empty" in capsys.readouterr().err

"""``ussf export``: an ONNX model whose probabilities match PyTorch's under onnxruntime, and one-line refusals.

The exports need the ``export`` extra (``pip install -e '.[export]'``); without it those tests skip.
"""

from __future__ import annotations

import re

import contextlib
import io
import json
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from ussf_lib.cli import main
from ussf_lib.errors import UserError
from ussf_lib.export import METADATA_KEYS, require_export_packages
from ussf_lib.models import build_model, classifier_head
from ussf_lib.predict import predict_images
from ussf_lib.training.checkpoints import load_checkpoint

CLASSES = ["benign", "metastatic", "normal", "primary"]
SIZE = 32
NORMALIZATION = ([0.24, 0.25, 0.23], [0.21, 0.22, 0.2])


def _export_extra():
    """onnxruntime, after onnx and onnxscript: the export extra; the test skips without it."""
    reason = "ONNX export needs the export extra: pip install -e '.[export]'"
    pytest.importorskip("onnx", reason=reason)
    pytest.importorskip("onnxscript", reason=reason)
    return pytest.importorskip("onnxruntime", reason=reason)


def make_checkpoint(path, name, seed=0):
    """A checkpoint as ``ussf cv`` writes it (weights and meta), of a model whose probabilities are far from
    uniform: random BatchNorm statistics, and a head scaled so the logits spread over a few units."""
    torch.manual_seed(seed)
    model = build_model(name, len(CLASSES), image_size=SIZE).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    head = classifier_head(model, name)
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, std=0.1)  # torchvision's ViT starts its head at zero
        logits = model(torch.randn(8, 3, SIZE, SIZE))
        head.weight.mul_(2.0 / float(logits.std()))
        head.bias.mul_(2.0 / float(logits.std()))
    meta = {"model_name": name, "classes": CLASSES, "image_size": SIZE, "mean": NORMALIZATION[0],
            "std": NORMALIZATION[1], "model_kwargs": {}}
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return path


def _session(path):
    return _export_extra().InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_against_pytorch(onnx_path, checkpoint):
    """onnxruntime against PyTorch on random normalized batches of 1 and 5 images (the export traced 2)."""
    session = _session(onnx_path)
    model, _ = load_checkpoint(checkpoint)
    gen = np.random.default_rng(1)
    worst, spread = 0.0, 0.0
    for batch in (1, 5):
        x = gen.standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
        (ours,) = session.run(["probabilities"], {"input": x})
        with torch.inference_mode():
            theirs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
        assert ours.shape == (batch, len(CLASSES))
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        worst, spread = max(worst, float(np.abs(ours - theirs).max())), max(spread, float(theirs.max() - theirs.min()))
    assert spread > 0.2  # probabilities far from uniform, so agreeing to 1e-4 means something
    return worst


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    _export_extra()
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "checkpoint.pt", "us_sfnet_tiny")
    out = root / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)])
    return ckpt, out, code, printed.getvalue().strip()


@pytest.mark.slow
def test_us_sfnet_tiny_exports_with_its_ffts_and_matches_pytorch(tiny_export):
    import onnx

    ckpt, out, code, printed = tiny_export
    assert code == 0
    assert printed.startswith(f"wrote {out}: us_sfnet_tiny (4 classes, 32 px), ONNX opset ")
    assert printed.endswith("; onnxruntime matches PyTorch to " + printed.rsplit(" ", 1)[-1])
    assert float(printed.rsplit(" ", 1)[-1]) <= 1e-4
    graph = onnx.load(str(out)).graph
    # 5 Conv-FFT blocks (depths 1, 2, 1, 1), each an rfft2 and an irfft2 over two axes
    assert sum(node.op_type == "DFT" for node in graph.node) == 20
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["probabilities"]
    assert _check_against_pytorch(out, ckpt) <= 1e-4


@pytest.mark.slow
def test_the_metadata_is_enough_to_reproduce_ussf_predict(tiny_export, phantom_dir):
    import onnx

    ckpt, out, code, _ = tiny_export
    assert code == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert set(METADATA_KEYS) <= set(props)
    assert props["model_name"] == "us_sfnet_tiny" and json.loads(props["classes"]) == CLASSES
    assert int(props["image_size"]) == SIZE
    assert json.loads(props["mean"]) == NORMALIZATION[0] and json.loads(props["std"]) == NORMALIZATION[1]
    # The documented preprocessing, done by hand from the metadata alone, gives ussf predict's probabilities.
    images = sorted(phantom_dir.glob("*/*.png"))[::10]
    size, mean, std = int(props["image_size"]), np.array(json.loads(props["mean"])), np.array(json.loads(props["std"]))
    rgb = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for p in images]
    x = ((np.stack(rgb) / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
    (probs,) = _session(out).run(["probabilities"], {"input": x})
    expected = predict_images(ckpt, images, device="cpu")
    np.testing.assert_allclose(probs, expected[[f"prob_{c}" for c in CLASSES]].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_a_baseline_exports_and_matches_pytorch(tmp_path):
    from ussf_lib.export import export_model

    _export_extra()
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", "resnet101")
    result = export_model(ckpt, tmp_path / "resnet101.onnx")
    assert result.path.is_file() and result.model_name == "resnet101" and result.max_abs_diff <= 1e-4
    assert _check_against_pytorch(result.path, ckpt) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "resnet101.onnx"]  # no temporary file left


def test_a_model_the_exporter_cannot_convert_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _export_extra()
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", "us_sfnet_tiny")

    def refuse(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\nTraceback and details")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ussf export: error: model 'us_sfnet_tiny' cannot be exported to ONNX (RuntimeError: Failed to "
                   "export the model with torch.export.); use its checkpoint with `ussf predict` instead")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_an_export_onnxruntime_disagrees_with_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import ussf_lib.export as export

    _export_extra()
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", "us_sfnet_tiny")
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    monkeypatch.setattr(export, "load_checkpoint", lambda path, device: (small.eval(), torch.load(path)["meta"]))
    monkeypatch.setattr(export, "max_difference", lambda *args: 0.03)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ussf export: error: model 'us_sfnet_tiny' was converted, but onnxruntime's probabilities differ "
                   "from PyTorch's by 0.03 (more than 0.0001); nothing written, use its checkpoint with `ussf predict` "
                   "instead")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_bad_export_arguments_are_one_line(tmp_path, capsys):
    _export_extra()
    ckpt = make_checkpoint(tmp_path / "checkpoint.pt", "us_sfnet_tiny")
    cases = [
        (["--checkpoint", str(ckpt), "--out", str(tmp_path)],
         f"ussf export: error: {tmp_path}: is a folder; give a file name for --out, e.g. {tmp_path / 'model.onnx'}"),
        (["--checkpoint", str(ckpt), "--out", str(tmp_path / "no" / "m.onnx")],
         f"ussf export: error: {tmp_path / 'no'}: no such folder; create it or choose another --out"),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")],
         f"ussf export: error: {tmp_path / 'missing.pt'}: no such checkpoint; pass RUN/folds/K/checkpoint.pt of a "
         "`ussf cv` run"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2
        assert capsys.readouterr().err.strip() == message
    with pytest.raises(SystemExit) as info:
        main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ussf export: error: argument --format: invalid choice: 'tflite'") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_without_the_export_extra_the_error_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(UserError) as info:
        require_export_packages()
    assert str(info.value) == "exporting to ONNX needs onnxruntime; install the export extra: pip install -e '.[export]'"


def test_make_test_installs_the_export_extra():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["export"]} == {"onnx", "onnxscript", "onnxruntime"}
    installed = re.search(r"-e '\.\[([^\]]+)\]'", (REPO / "Makefile").read_text()).group(1).split(",")
    assert {"dev", "export"} <= set(installed)

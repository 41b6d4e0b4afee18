"""Load a fold checkpoint and classify images with it (``ussf predict``).

Checkpoints are read with ``weights_only=True``: they hold tensors and plain metadata only, so loading one
never executes code. No notebook loads a model (05 evaluates from ``predictions.csv`` alone); this is the
command line's way to use a trained fold, and ``run_cv``'s way to check a checkpoint before resuming it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ussf_lib.data.index import read_image
from ussf_lib.errors import UserError
from ussf_lib.paper import IMAGE_EXTENSIONS
from ussf_lib.models import build_model
from ussf_lib.training.loop import DeviceImages, evaluate, select_device


#: What a fold checkpoint's ``meta`` must hold (written by :func:`ussf_lib.training.experiment.run_cv`).
META_KEYS: tuple[str, ...] = ("model_name", "classes", "image_size", "mean", "std", "model_kwargs")


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a fold's ``checkpoint.pt`` (tensors and plain metadata only: ``weights_only=True``).

    A missing file, a file that is not a checkpoint, or one without ``model`` weights and complete ``meta`` is a
    :class:`UserError`.
    """
    path = Path(path)
    if path.is_dir():
        folds = sorted(path.glob("folds/*/checkpoint.pt")) or sorted(path.glob("*/folds/*/checkpoint.pt"))  # a run, a comparison
        hint = f"pass one fold's checkpoint, e.g. {folds[0]}" if folds else "pass RUN/folds/K/checkpoint.pt of a `ussf cv` run"
        raise UserError(f"{path}: is a folder, not a checkpoint; {hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; pass RUN/folds/K/checkpoint.pt of a `ussf cv` run")
    try:
        with warnings.catch_warnings():  # torch warns about what it then refuses; the error below says it once
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        raise UserError(f"{path}: not a ussf checkpoint ({type(exc).__name__}); pass RUN/folds/K/checkpoint.pt") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: checkpoint lacks model metadata; pass RUN/folds/K/checkpoint.pt of a `ussf cv` run")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint metadata lacks {missing}; pass RUN/folds/K/checkpoint.pt of a `ussf cv` run")
    return state


def check_meta(path: str | Path, meta: dict[str, Any], expected: dict[str, Any], fix: str) -> None:
    """Raise :class:`UserError` when ``meta`` (a checkpoint's) differs from ``expected`` in any key ``expected`` has.

    The message names the checkpoint, what it was made for, what is expected, and ``fix``.
    """
    differ = [k for k in expected if meta.get(k) != expected[k]]
    if differ:
        have = ", ".join(f"{k}={meta.get(k)!r}" for k in differ)
        want = ", ".join(f"{k}={expected[k]!r}" for k in differ)
        raise UserError(f"{path}: checkpoint was made for {have}, not {want}; {fix}")


def check_weights_fit(path: str | Path, model: nn.Module, weights: dict[str, Any], meta: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``weights`` has exactly the parameter names and shapes of ``model``."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()}
    if own != theirs:
        odd = sorted(set(own) ^ set(theirs)) or sorted(k for k in own if own[k] != theirs[k])
        raise UserError(f"{path}: weights do not fit model {meta['model_name']!r} with {len(meta['classes'])} classes "
                        f"(first mismatch: {odd[0]!r}); the checkpoint comes from another model or class list")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", expect_model: str | None = None,
                    expect_classes: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a fold's ``checkpoint.pt``; returns it (eval mode) and its metadata.

    A checkpoint whose weights do not fit the model its metadata names is refused; so is one made for another
    model or class list than ``expect_model`` / ``expect_classes`` when those are given.
    """
    state = read_checkpoint(path, device)
    meta = state["meta"]
    expected: dict[str, Any] = {}
    if expect_model is not None:
        expected["model_name"] = expect_model
    if expect_classes is not None:
        expected["classes"] = list(expect_classes)
    check_meta(path, meta, expected, "pass a checkpoint of a run with that model and class list")
    model = build_model(meta["model_name"], len(meta["classes"]), image_size=meta["image_size"], **meta["model_kwargs"])
    check_weights_fit(path, model, state["model"], meta)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Image files given directly, plus every image inside given folders (recursively, hidden entries skipped;
    other files in them are left out with a warning that counts them, as ``ussf cv`` counts them)."""
    paths: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            files = [p for p in item.rglob("*") if p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(item).parts)]
            images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
            if len(images) < len(files):
                other = next(p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS)
                warnings.warn(f"{item}: ignored {len(files) - len(images)} non-image file(s), e.g. {other.name} "
                              f"(images are {', '.join(sorted(IMAGE_EXTENSIONS))})", stacklevel=2)
            paths += images
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"{item}: no such file or folder; pass image files or folders of images")
    if not paths:
        raise UserError(f"no images among {', '.join(map(str, items))}; pass image files or folders of images")
    return paths


def predict_images(checkpoint: str | Path, inputs: Sequence[str | Path], device: str = "auto",
                   batch_size: int = 64) -> pd.DataFrame:
    """Class probabilities per image: columns path, pred, prob_<class>..."""
    dev = select_device(device)
    model, meta = load_checkpoint(checkpoint, dev)
    paths = expand_inputs(inputs)
    images = np.stack([read_image(p, meta["image_size"]) for p in paths])
    _, probs = evaluate(model, DeviceImages(images, dev), np.zeros(len(paths), dtype=np.int64),
                        np.arange(len(paths)), batch_size, meta["mean"], meta["std"])
    classes = meta["classes"]
    frame = pd.DataFrame({"path": [str(p) for p in paths], "pred": [classes[i] for i in probs.argmax(1)]})
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i].round(6)
    return frame

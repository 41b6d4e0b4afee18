"""Classify images with a trained run or one fold checkpoint (``ussf predict``).

Given a run folder, every fold's checkpoint classifies each image and their softmax probabilities are averaged
(a k-fold ensemble); given one ``checkpoint.pt``, that fold alone does. ``tta`` also averages each model's
probabilities for the image and its horizontal mirror image. The folds of one run must agree on model, class
list and image size; each normalizes with its own checkpoint's mean and std.

Checkpoints are read with ``weights_only=True``: they hold tensors and plain metadata only, so loading one
never executes code. No notebook loads a model (05 evaluates from ``predictions.csv`` alone); this is the
command line's way to use a trained run (checkpoints are read and checked by :mod:`ussf_lib.training.checkpoints`).
See docs/predict-and-export.md.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import pandas as pd
import torch

from ussf_lib.data.index import entry_kind, printable, read_image
from ussf_lib.errors import UserError
from ussf_lib.paper import IMAGE_EXTENSIONS
from ussf_lib.training.checkpoints import check_meta, load_checkpoint
from ussf_lib.training.loop import evaluate
from ussf_lib.training.runtime import DeviceImages, select_device

#: Checkpoint metadata the fold checkpoints of one ensemble must share.
ENSEMBLE_KEYS: tuple[str, ...] = ("model_name", "classes", "image_size", "model_kwargs")

#: Columns after ``path``, ``pred`` and ``prob_<class>...`` in the output of :func:`predict_images`.
EXTRA_COLUMNS: tuple[str, ...] = ("n_models", "tta")

_SKIP_HINT = "or pass --skip-bad to leave unreadable images out"


def expand_inputs(items: Sequence[str | Path]) -> list[Path]:
    """Image files given directly, plus every image inside given folders (recursively, hidden entries skipped;
    other files in them are left out with a warning that counts them, as ``ussf cv`` counts them)."""
    paths: list[Path] = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            entries = [p for p in item.rglob("*") if not p.is_dir()
                       and not any(part.startswith(".") for part in p.relative_to(item).parts)]
            # FIFOs, sockets and devices are never opened; a broken link is kept, for read_image to name it
            images = sorted(p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS and entry_kind(p) != "special")
            if len(images) < len(entries):
                other = next(p for p in entries if p not in set(images))
                warnings.warn(f"{item}: ignored {len(entries) - len(images)} non-image file(s), e.g. "
                              f"{printable(other.name)} (images are {', '.join(sorted(IMAGE_EXTENSIONS))})",
                              stacklevel=2)
            paths += images
        elif item.is_file() or item.is_symlink():
            paths.append(item)
        elif item.exists():
            raise UserError(f"{printable(str(item))}: not a regular file (a FIFO, socket or device); pass image files")
        else:
            raise UserError(f"{printable(str(item))}: no such file or folder; pass image files or folders of images")
    if not paths:
        raise UserError(f"no images among {', '.join(map(str, items))}; pass image files or folders of images")
    return paths


def _fold_number(ckpt: Path) -> tuple[int, str]:
    name = ckpt.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


def checkpoints_of(checkpoint: str | Path) -> list[Path]:
    """The checkpoints ``checkpoint`` stands for: itself if it is a file (or missing: loading it says why), or a
    run folder's finished fold checkpoints (``RUN/folds/K/checkpoint.pt``), in fold order.

    A comparison folder (model runs inside it), a folder without fold checkpoints, and a run with an unfinished
    fold (a checkpoint but no ``predictions.csv``) are refused with a :class:`UserError`; folds of the run's
    ``config.json`` that have no checkpoint at all are left out with a warning.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return [path]
    folds = sorted(path.glob("folds/*/checkpoint.pt"), key=_fold_number)
    if not folds:
        runs = sorted({p.parents[2].name for p in path.glob("*/folds/*/checkpoint.pt")})
        if runs:
            raise UserError(f"{path}: is a comparison folder holding the model runs {', '.join(runs)}; pass one of "
                            f"them, e.g. --checkpoint {path / runs[0]}")
        raise UserError(f"{path}: holds no fold checkpoints (folds/K/checkpoint.pt); pass a `ussf cv` run folder "
                        "or one checkpoint file")
    unfinished = [p.parent.name for p in folds if not (p.parent / "predictions.csv").is_file()]
    if unfinished:
        raise UserError(f"{path}: fold(s) {', '.join(unfinished)} are unfinished (a checkpoint but no "
                        f"predictions.csv); finish the run with `ussf cv --resume {path}`, or pass one finished "
                        "fold's checkpoint")
    config = path / "config.json"
    try:
        n_folds = int(json.loads(config.read_text()).get("folds", 0)) if config.is_file() else 0
    except (ValueError, TypeError, AttributeError):  # a damaged config.json: the folds found are all there is
        n_folds = 0
    absent = sorted(set(range(n_folds)) - {_fold_number(p)[0] for p in folds})
    if absent:
        warnings.warn(f"{path}: averaging {len(folds)} of the run's {n_folds} folds; fold(s) "
                      f"{', '.join(map(str, absent))} have no checkpoint", stacklevel=2)
    return folds


def read_images(paths: Sequence[Path], image_size: int, skip_bad: bool = False) -> tuple[list[Path], np.ndarray]:
    """The readable ``paths`` and their uint8 ``(N, S, S, 3)`` pixels, resized as in training.

    Without ``skip_bad`` the first unreadable file (corrupt, truncated, not an image) is a :class:`UserError`
    naming it; with it, unreadable files are left out with one warning that counts them and names the first.
    """
    kept: list[Path] = []
    images: list[np.ndarray] = []
    bad: list[str] = []
    for p in paths:
        try:
            images.append(read_image(p, image_size))
        except UserError as exc:
            if not skip_bad:
                raise UserError(f"{exc}, {_SKIP_HINT}") from None
            bad.append(str(exc).rsplit("; ", 1)[0])  # path and problem, without read_image's fix
            continue
        kept.append(p)
    if bad:
        if not kept:
            raise UserError(f"none of the {len(bad)} image(s) could be read; the first: {bad[0]}; pass readable images")
        warnings.warn(f"left out {len(bad)} unreadable image(s) (--skip-bad); the first: {bad[0]}", stacklevel=2)
    return kept, np.stack(images)


def _probabilities(model: torch.nn.Module, meta: dict[str, Any], images: np.ndarray, dev: torch.device,
                   batch_size: int, tta: bool) -> np.ndarray:
    """One model's softmax probabilities (float64), averaged with the mirror images' when ``tta``."""
    views = [images, np.ascontiguousarray(images[:, :, ::-1])] if tta else [images]
    idx = np.arange(len(images))
    probs = [evaluate(model, DeviceImages(view, dev), np.zeros(len(images), dtype=np.int64), idx, batch_size,
                      meta["mean"], meta["std"])[1] for view in views]
    return np.mean(probs, axis=0)


def predict_images(checkpoint: str | Path, inputs: Sequence[str | Path], device: str = "auto",
                   batch_size: int = 64, tta: bool = False, skip_bad: bool = False) -> pd.DataFrame:
    """Class probabilities per image: columns ``path``, ``pred``, ``prob_<class>``..., ``n_models``, ``tta``.

    ``checkpoint`` is a run folder (its fold checkpoints' softmax probabilities are averaged: a k-fold
    ensemble; see :func:`checkpoints_of`) or one ``checkpoint.pt``. ``tta`` averages each model's probabilities
    for the image and its horizontal mirror image. ``skip_bad`` leaves unreadable images out (see
    :func:`read_images`). ``n_models`` is the number of checkpoints averaged; probabilities are rounded to 6
    decimals.
    """
    dev = select_device(device)
    ckpts = checkpoints_of(checkpoint)
    models = []
    for ckpt in ckpts:  # every checkpoint is loaded and checked before any image is read
        model, meta = load_checkpoint(ckpt, dev)
        if models:
            first, first_meta = ckpts[0], models[0][1]
            check_meta(ckpt, meta, {k: first_meta[k] for k in ENSEMBLE_KEYS},
                       f"{first} was made for the latter, and the folds of one run must agree; pass one "
                       "checkpoint file instead")
        models.append((model, meta))
    meta = models[0][1]
    paths, images = read_images(expand_inputs(inputs), meta["image_size"], skip_bad)
    probs = np.mean([_probabilities(model, m, images, dev, batch_size, tta) for model, m in models], axis=0)
    classes = meta["classes"]
    frame = pd.DataFrame({"path": [printable(str(p)) for p in paths], "pred": [classes[i] for i in probs.argmax(1)]})
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i].round(6)
    frame["n_models"] = len(models)
    frame["tta"] = bool(tta)
    return frame


def write_predictions(frame: pd.DataFrame, out: str | Path | TextIO) -> None:
    """The CSV ``ussf predict`` prints: ``frame`` with ``tta`` written as ``true`` / ``false``."""
    frame.assign(tta=frame["tta"].map({True: "true", False: "false"})).to_csv(out, index=False)

"""Explain a cross-validation run folder with the model that never saw each image (``notebooks/07``).

A run folder holds one checkpoint per fold (``folds/K/checkpoint.pt``) and each fold's out-of-fold predictions
(``folds/K/predictions.csv``). An image's held-out explanation comes from the fold that *tested* it, so the maps
and the frequency view here describe generalisation, not memorisation (``ussf explain --checkpoint RUN`` uses
fold 0 for every image instead, including those fold 0 trained on). Nothing is trained or written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ussf_lib.errors import UserError


def fold_checkpoint(run_dir: str | Path, fold: int) -> Path:
    """``RUN/folds/<fold>/checkpoint.pt``, or a :class:`UserError` naming the folds that have one."""
    path = Path(run_dir) / "folds" / str(int(fold)) / "checkpoint.pt"
    if not path.is_file():
        have = sorted(p.parent.name for p in Path(run_dir).glob("folds/*/checkpoint.pt"))
        raise UserError(f"{run_dir}: fold {fold} has no checkpoint.pt (folds with one: {', '.join(have) or 'none'}); "
                        "train the run to the end first, or pass a run folder written by `ussf cv`")
    return path


def run_image_paths(run_dir: str | Path) -> dict[str, Path]:
    """The run's image names (the ``path`` column of its predictions and ``splits.csv``) -> the files on disk,
    read from the data its ``config.json`` names (a class-folder tree or a manifest).

    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    from ussf_lib.data.index import load_index
    from ussf_lib.training.experiment import load_config

    cfg = load_config(run_dir)
    try:
        index = load_index(data=cfg.data, manifest=cfg.manifest, group_col=cfg.group_col)
    except UserError as exc:
        raise UserError(f"{run_dir}: the run's data cannot be read any more ({exc}); explain it where its data "
                        "are, or train a new run") from None
    return {str(rel): Path(p) for rel, p in zip(index.frame["relpath"], index.frame["path"])}


def pick_examples(pred: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """The ``n`` most confident correct and the ``n`` most confident wrong out-of-fold predictions.

    ``pred`` is :func:`ussf_lib.evaluation.report.load_predictions`'s table. Returns its rows with two more
    columns, ``confidence`` (the top-class probability) and ``correct``; correct ones first, each group by
    falling confidence (ties by path, so the choice is reproducible). Fewer rows come back when a group is short
    (an untrained model may get nothing right).

    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    if n < 1:
        raise UserError(f"n={n} must be at least 1")
    probs = pred[[c for c in pred.columns if c.startswith("prob_")]].to_numpy(dtype=float)
    table = pred.assign(confidence=probs.max(axis=1), correct=pred["pred"].astype(str) == pred["label"].astype(str))
    table = table.sort_values(["correct", "confidence", "path"], ascending=[False, False, True], kind="stable")
    return pd.concat([table[table["correct"]].head(n), table[~table["correct"]].head(n)]).reset_index(drop=True)


def heldout_cams(run_dir: str | Path, rows: pd.DataFrame, method: str = "gradcam", target: str = "pred",
                 device: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """CAMs of ``rows`` (a predictions table: ``path``, ``label``, ``fold``), each from the checkpoint of the fold
    that tested the image. ``target``: ``"pred"`` explains each image's predicted class, ``"true"`` its label.

    Returns ``(images, cams, probs, titles)``: uint8 ``(N, S, S, 3)`` as the model saw them, maps ``(N, S, S)``
    in [0, 1], softmax probabilities ``(N, K)`` (the same as ``predictions.csv`` up to float rounding) and a
    short title per image (true class, predicted class and probability, the class the map explains).

    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    from ussf_lib.explain.gradcam import check_method, compute_cams, load_images, to_model_input
    from ussf_lib.training.checkpoints import load_checkpoint
    from ussf_lib.training.runtime import select_device

    check_method(method)
    if target not in ("pred", "true"):
        raise UserError(f"target={target!r}: use 'pred' (the predicted class) or 'true' (the image's label)")
    if rows.empty:
        raise UserError("no predictions to explain; pick_examples found none")
    dev = select_device(device)
    files = run_image_paths(run_dir)
    missing = [p for p in rows["path"].astype(str) if p not in files]
    if missing:
        raise UserError(f"{run_dir}: image {missing[0]!r} is not in the run's data any more")
    images, cams, probs = [None] * len(rows), [None] * len(rows), [None] * len(rows)
    for fold, part in rows.reset_index(drop=True).groupby("fold", sort=True):
        model, meta = load_checkpoint(fold_checkpoint(run_dir, int(fold)), dev)
        batch = load_images([files[str(p)] for p in part["path"]], meta)
        targets = None if target == "pred" else [list(meta["classes"]).index(str(c)) for c in part["label"]]
        c, p = compute_cams(model, meta["model_name"], to_model_input(batch, meta, dev), method, targets)
        for i, position in enumerate(part.index):
            images[position], cams[position], probs[position] = batch[i], c[i], p[i]
    classes = [c.removeprefix("prob_") for c in rows.columns if c.startswith("prob_")]
    titles = []
    for (_, row), p in zip(rows.iterrows(), probs):
        shown = classes[int(np.argmax(p))] if target == "pred" else str(row["label"])
        titles.append(f"true {row['label']}, predicted {classes[int(np.argmax(p))]} (p={p.max():.2f})\n"
                      f"map for {shown} · fold {row['fold']}")
    return np.stack(images), np.stack(cams), np.stack(probs), titles


def fold_frequency(run_dir: str | Path, fold: int = 0, n_bins: int = 16, device: str = "auto",
                   batch_size: int = 32) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str]:
    """The frequency view (:func:`ussf_lib.explain.frequency.analyse_blocks`) of one fold's US-SFNet over the
    images that fold tested: branch shares, radial gains, and a one-line description for the figure's title.
    A run of a model without Conv-FFT blocks (a baseline) gives ``(None, None, why)``.

    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    from ussf_lib.evaluation.report import load_predictions
    from ussf_lib.explain.frequency import analyse_blocks, conv_fft_blocks
    from ussf_lib.explain.gradcam import load_images, to_model_input
    from ussf_lib.training.checkpoints import load_checkpoint
    from ussf_lib.training.runtime import select_device

    dev = select_device(device)
    checkpoint = fold_checkpoint(run_dir, fold)
    model, meta = load_checkpoint(checkpoint, dev)
    if not conv_fft_blocks(model):
        return None, None, (f"{meta['model_name']} has no Conv-FFT blocks: the frequency view needs a US-SFNet run "
                            "(us_sfnet or us_sfnet_tiny)")
    pred = load_predictions(run_dir)
    files = run_image_paths(run_dir)
    images = load_images([files[str(p)] for p in pred.loc[pred["fold"] == fold, "path"]], meta)
    batches = (to_model_input(images[i:i + batch_size], meta, dev) for i in range(0, len(images), batch_size))
    shares, response = analyse_blocks(model, batches, n_bins)
    return shares, response, (f"{meta['model_name']}, fold {fold}: Conv-FFT branches over the {len(images)} images "
                              f"it tested, at {meta['image_size']} px")


def image_and_patient_level(summary: dict, metrics: Sequence[str] = ("accuracy", "f1", "auc", "ece", "brier")
                            ) -> pd.DataFrame:
    """Image-level against patient-level scores of a run's ``summary.json`` (mean and std over folds, as
    fractions), one row per metric; the patient columns are absent when the run knows no patients.

    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    rows = {}
    patients = summary.get("patient_level") or {}
    for m in metrics:
        row = {"image mean": summary[m]["mean"], "image std": summary[m]["std"]}
        if m in patients:
            row.update({"patient mean": patients[m]["mean"], "patient std": patients[m]["std"]})
        rows[m] = row
    return pd.DataFrame.from_dict(rows, orient="index").round(3)

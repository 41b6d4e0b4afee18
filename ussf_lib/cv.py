"""Cross-validation folds: stratified, and grouped when images share a patient.

``cv`` knows folds, not pixels: it takes labels and groups and returns a fold number per image, using
scikit-learn's ``StratifiedKFold`` / ``StratifiedGroupKFold``. Splits are saved as ``splits.csv``
(``path,label,group,fold``) and can be reused so that several models see identical folds.
Introduced in ``notebooks/04_train_cross_validation.ipynb``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ussf_lib.data import ImageIndex
from ussf_lib.errors import UserError


def check_fold_feasible(labels: Sequence[str], groups: Sequence[str] | None, n_folds: int) -> None:
    """Raise :class:`UserError` unless every class has at least ``n_folds`` images (and groups, when given)."""
    if n_folds < 2:
        raise UserError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    frame = pd.DataFrame({"label": list(labels), "group": list(groups) if groups is not None else range(len(labels))})
    per_class = frame.groupby("label")["group"].nunique()
    unit = "patients" if groups is not None else "images"
    short = per_class[per_class < n_folds]
    if len(short):
        name, count = short.index[0], int(short.iloc[0])
        raise UserError(
            f"class {name!r} has {count} {unit}, fewer than --folds {n_folds}; "
            f"use --folds {max(2, int(per_class.min()))} or fewer, or add {unit} to that class"
        )


def make_folds(labels: Sequence[int] | np.ndarray, groups: Sequence[str] | None, n_folds: int, seed: int) -> np.ndarray:
    """Fold number (0..n_folds-1) for every sample: stratified by label, grouped when ``groups`` is given.

    With groups, no group (patient) ever appears in two folds; class balance across folds is then as good as
    the group sizes allow. Deterministic by ``seed``.
    """
    labels = np.asarray(labels)
    check_fold_feasible(labels, groups, n_folds)
    folds = np.full(len(labels), -1, dtype=np.int64)
    dummy_x = np.zeros((len(labels), 1))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        split_iter = splitter.split(dummy_x, labels, groups=np.asarray(groups))
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        split_iter = splitter.split(dummy_x, labels)
    for fold, (_, test_idx) in enumerate(split_iter):
        folds[test_idx] = fold
    return folds


def folds_for_index(index: ImageIndex, n_folds: int, seed: int) -> np.ndarray:
    """Folds for an :class:`~ussf_lib.data.ImageIndex`, grouped by its group column when it has one."""
    groups = index.frame["group"].to_numpy() if index.has_groups else None
    check_fold_feasible(index.frame["label"], groups, n_folds)  # here, so errors name classes, not indices
    return make_folds(index.targets, groups, n_folds, seed)


def splits_frame(index: ImageIndex, folds: np.ndarray) -> pd.DataFrame:
    """The ``splits.csv`` table: ``path`` (relative to the data root), ``label``, ``group``, ``fold``."""
    return pd.DataFrame({
        "path": index.frame["relpath"].to_numpy(),
        "label": index.frame["label"].to_numpy(),
        "group": index.frame["group"].to_numpy(),
        "fold": np.asarray(folds, dtype=np.int64),
    })


def save_splits(index: ImageIndex, folds: np.ndarray, path: str | Path) -> Path:
    """Write ``splits.csv`` for reuse by another run (``ussf cv --splits FILE``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    splits_frame(index, folds).to_csv(path, index=False)
    return path


def load_splits(path: str | Path, index: ImageIndex) -> np.ndarray:
    """Fold numbers from a saved ``splits.csv``, aligned to ``index``; every image must be listed with its label."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such splits file; pass the splits.csv of an earlier run")
    table = pd.read_csv(path, dtype={"path": str, "label": str, "group": str})
    missing_cols = {"path", "label", "fold"} - set(table.columns)
    if missing_cols:
        raise UserError(f"{path}: missing column(s) {sorted(missing_cols)}; a splits file has path,label,group,fold")
    by_path = table.set_index("path")
    missing = [p for p in index.frame["relpath"] if p not in by_path.index]
    if missing:
        raise UserError(f"{path}: {len(missing)} image(s) of the data are not in the splits file, e.g. {missing[0]!r}; "
                        "use splits made on the same data")
    rows = by_path.loc[index.frame["relpath"]]
    if (rows["label"].to_numpy() != index.frame["label"].to_numpy()).any():
        raise UserError(f"{path}: labels differ from the data's labels; use splits made on the same data")
    return rows["fold"].to_numpy(dtype=np.int64)

"""Cross-validation folds: stratified, and grouped when images share a patient or are duplicates of each other.

``cv`` knows folds, not pixels: it takes labels and groups and returns a fold number per image, using
scikit-learn's ``StratifiedKFold`` / ``StratifiedGroupKFold``. The groups that folds keep whole are the
connected components of two relations: *same patient* (the manifest's group column) and *same duplicate
cluster* (exact or near-duplicate images, found by :mod:`ussf_lib.data.audit`), so neither a patient nor a copy of
an image is ever on both sides of a split. Splits are saved as ``splits.csv`` (``path,label,group,fold``, where
``group`` is the group actually kept whole) and can be reused so that several models see identical folds.
Introduced in ``notebooks/04_train_cross_validation.ipynb``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ussf_lib.data.index import ImageIndex
from ussf_lib.errors import UserError
from ussf_lib.paper import LABEL_SAFE_CSV


def check_fold_feasible(labels: Sequence[str], groups: Sequence[str] | None, n_folds: int,
                        unit: str | None = None, classes: Sequence[str] | None = None, hint: str = "") -> None:
    """Raise :class:`UserError` unless every class has at least ``n_folds`` images (and groups, when given).

    ``unit`` names what is counted in the message (default ``patients`` with groups, else ``images``);
    ``classes`` adds classes that have no image at all; ``hint`` is appended to the fix.
    """
    if n_folds < 2:
        raise UserError(f"--folds {n_folds}: cross-validation needs at least 2 folds")
    frame = pd.DataFrame({"label": list(labels), "group": list(groups) if groups is not None else range(len(labels))})
    per_class = frame.groupby("label")["group"].nunique()
    if classes is not None:
        per_class = per_class.reindex(list(classes), fill_value=0)
    unit = unit or ("patients" if groups is not None else "images")
    short = per_class[per_class < n_folds]
    if len(short):
        name, count = short.index[0], int(short.iloc[0])
        if count == 0:
            raise UserError(f"class {name!r} has no images (none were found, or all were unreadable or skipped); "
                            "add readable images to it, or leave it out of --classes")
        fewest = int(per_class.min())
        fix = f"use --folds {fewest} or fewer, or add {unit} to that class" if fewest >= 2 else \
            f"add {unit} to that class (cross-validation needs at least 2 per class)"
        raise UserError(f"class {name!r} has {count} {unit}, fewer than --folds {n_folds}; {fix}{hint}")


def merge_groups(groups: Sequence[str], clusters: Sequence[int] | np.ndarray) -> np.ndarray:
    """Connected components of (same group) ∪ (same cluster): the units that folds must keep whole.

    Each component is named by the smallest group name among its images, so an image with no duplicate keeps
    its own group name. ``groups`` are patient ids (or one name per image); ``clusters`` duplicate-cluster ids.
    """
    groups = np.asarray(groups).astype(str)
    clusters = np.asarray(clusters)
    n = len(groups)
    if len(clusters) != n:
        raise ValueError(f"{n} groups but {len(clusters)} cluster ids")
    edges_i, edges_j = [], []
    for keys in (groups, clusters):
        _, inverse = np.unique(keys, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        same = inverse[order][1:] == inverse[order][:-1]  # neighbours in sorted order with the same key
        edges_i.append(order[:-1][same])
        edges_j.append(order[1:][same])
    i, j = np.concatenate(edges_i), np.concatenate(edges_j)
    _, component = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    names = pd.Series(groups).groupby(component).transform("min")
    return names.to_numpy(dtype=object)


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


def index_groups(index: ImageIndex, clusters: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
    """The group of every image that folds keep whole, or ``None`` when every image stands alone.

    Patient groups (a manifest's group column) merged with duplicate ``clusters`` (one id per image, e.g. from
    :func:`ussf_lib.data.audit.cluster_ids`); a folder tree without duplicates gives ``None`` (plain stratified folds).
    """
    base = index.frame["group"].to_numpy().astype(str)
    if clusters is None:
        return base.astype(object) if index.has_groups else None
    merged = merge_groups(base, clusters)
    if not index.has_groups and len(set(merged)) == len(merged):
        return None
    return merged


def folds_for_index(index: ImageIndex, n_folds: int, seed: int,
                    clusters: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Folds for an :class:`~ussf_lib.data.index.ImageIndex`, grouped by its group column when it has one.

    With ``clusters`` (a duplicate-cluster id per image) every cluster also stays inside one fold, joined with
    the patient groups (see :func:`index_groups`).
    """
    groups = index_groups(index, clusters)
    if clusters is not None and groups is not None:
        merged = len(set(groups)) < (index.frame["group"].nunique() if index.has_groups else len(index))
        unit = ("patients (patients that share duplicate images count as one)" if index.has_groups else
                "images (near-duplicate images count as one)") if merged else None
        hint = "; --no-dedup-folds lets duplicates be split" if merged else ""
    else:
        unit, hint = None, ""
    # here, so errors name classes, not indices
    check_fold_feasible(index.frame["label"], groups, n_folds, unit=unit, classes=index.classes, hint=hint)
    return make_folds(index.targets, groups, n_folds, seed)


def splits_frame(index: ImageIndex, folds: np.ndarray, groups: Sequence[str] | np.ndarray | None = None) -> pd.DataFrame:
    """The ``splits.csv`` table: ``path`` (relative to the data root), ``label``, ``group``, ``fold``.

    ``group`` is the group the folds kept whole (``groups``, e.g. from :func:`index_groups`); by default the
    index's own group (patient id, or the path itself).
    """
    return pd.DataFrame({
        "path": index.frame["relpath"].to_numpy(),
        "label": index.frame["label"].to_numpy(),
        "group": np.asarray(groups) if groups is not None else index.frame["group"].to_numpy(),
        "fold": np.asarray(folds, dtype=np.int64),
    })


def save_splits(index: ImageIndex, folds: np.ndarray, path: str | Path,
                groups: Sequence[str] | np.ndarray | None = None, then: str = "run the command again") -> Path:
    """Write ``splits.csv`` for reuse by another run (``ussf cv --splits FILE``), whole or not at all; a refused
    write is a :class:`UserError` ending with ``then``."""
    from ussf_lib.files import write_csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(splits_frame(index, folds, groups), path, then)
    return path


def leaking_groups(groups: Sequence[str] | np.ndarray, folds: Sequence[int] | np.ndarray) -> list[str]:
    """Groups (patients or duplicate clusters) whose images sit in more than one fold: they leak across splits."""
    per_group = pd.DataFrame({"g": np.asarray(groups).astype(str), "f": np.asarray(folds)}).groupby("g")["f"].nunique()
    return sorted(per_group.index[per_group > 1])


def read_splits(path: str | Path, index: ImageIndex) -> pd.DataFrame:
    """The rows of a saved ``splits.csv`` for the images of ``index``, in index order (see :func:`load_splits`)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a splits file" if path.is_dir() else "no such splits file"
        raise UserError(f"{path}: {what}; pass the splits.csv of an earlier run")
    try:
        table = pd.read_csv(path, dtype={"path": str, "label": str, "group": str}, **LABEL_SAFE_CSV)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: not a readable splits CSV ({str(exc).splitlines()[0]}); "
                        "pass the splits.csv of an earlier run") from None
    missing_cols = {"path", "label", "fold"} - set(table.columns)
    if missing_cols:
        raise UserError(f"{path}: missing column(s) {sorted(missing_cols)}; a splits file has path,label,group,fold")
    by_path = table.set_index("path")
    missing = [p for p in index.frame["relpath"] if p not in by_path.index]
    if missing:
        raise UserError(f"{path}: {len(missing)} image(s) of the data are not in the splits file, e.g. {missing[0]!r}; "
                        "use splits made on the same data")
    if by_path.index.duplicated().any():
        raise UserError(f"{path}: lists {by_path.index[by_path.index.duplicated()][0]!r} more than once; "
                        "use the splits.csv of an earlier run")
    extra = sorted(set(by_path.index) - set(index.frame["relpath"]))
    if extra:  # splits of a larger data set: usable, but the user should know the data are not the same
        warnings.warn(f"{path}: lists {len(extra)} image(s) that are not in the data (e.g. {extra[0]!r}); "
                      "they are ignored", stacklevel=2)
    rows = by_path.loc[index.frame["relpath"]]
    if (rows["label"].to_numpy() != index.frame["label"].to_numpy()).any():
        raise UserError(f"{path}: labels differ from the data's labels; use splits made on the same data")
    folds = pd.to_numeric(rows["fold"], errors="coerce")
    if folds.isna().any() or (folds < 0).any() or (folds != folds.round()).any():
        raise UserError(f"{path}: the fold column must hold whole numbers 0..K-1; use the splits.csv of an earlier run")
    return rows.assign(fold=folds.astype(np.int64)).reset_index()


#: What to do about folds that cannot be trained, for a splits file (the default) and for folds ussf made.
SPLITS_FILE_REMEDY = "use splits made on this data, or let ussf make the folds (drop --splits)"
MADE_FOLDS_REMEDY = "use fewer --folds, another --seed, or more patients of that class"


def check_split_composition(labels: Sequence[str], folds: Sequence[int], n_folds: int, source: str,
                            remedy: str = SPLITS_FILE_REMEDY) -> list[str]:
    """Refuse folds that cannot be trained or tested; return warnings for folds that test fewer classes.

    Every fold must test some image, and every fold's training part must hold every class (a model cannot learn
    a class it never sees). A fold whose test part lacks a class is allowed, but that class's AUC and
    sensitivity are undefined in that fold, so a warning is returned. ``source`` names the splits file (or
    says how the folds were made) and ``remedy`` is the fix the refusal suggests.
    """
    frame = pd.DataFrame({"label": list(labels), "fold": np.asarray(folds)})
    classes = sorted(frame["label"].unique())
    warnings_: list[str] = []
    for k in range(n_folds):
        test = frame["fold"] == k
        if not test.any():
            raise UserError(f"{source}: fold {k} tests no image of this data; use splits made on the same data")
        unseen = sorted(set(classes) - set(frame.loc[~test, "label"]))
        if unseen:
            raise UserError(f"{source}: fold {k} trains on no {unseen[0]!r} image (all of them are in its test part); "
                            f"{remedy}")
        untested = sorted(set(classes) - set(frame.loc[test, "label"]))
        if untested:
            warnings_.append(f"warning: fold {k} of {source} tests no {', '.join(map(repr, untested))} image; "
                             "that class's sensitivity and AUC are undefined in that fold")
    return warnings_


def load_splits(path: str | Path, index: ImageIndex) -> np.ndarray:
    """Fold numbers from a saved ``splits.csv``, aligned to ``index``; every image must be listed with its label."""
    return read_splits(path, index)["fold"].to_numpy(dtype=np.int64)


def folds_from_file(splits_file: str | Path, index: ImageIndex, n_folds: int, clusters: np.ndarray | None,
                    group_col: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The folds of a saved ``splits.csv`` (``--splits``, or a resumed run's own) for ``index``: each image's fold,
    the groups those folds keep whole (``splits.csv``'s ``group``), and notes to log.

    The groups are the file's where its folds kept them whole (a resumed run's patients joined with duplicate
    clusters), joined with this data's patients. Folds that split one of this data's patients are refused;
    duplicate clusters split across folds are a warning.
    """
    table = read_splits(splits_file, index)
    folds = table["fold"].to_numpy(dtype=np.int64)
    if int(folds.max()) + 1 != n_folds:
        raise UserError(f"{splits_file}: has {int(folds.max()) + 1} folds but --folds is {n_folds}; make them agree")
    check_fold_feasible(index.frame["label"], None, n_folds, classes=index.classes)
    notes = check_split_composition(index.frame["label"], folds, n_folds, str(splits_file))
    file_groups = table["group"].astype(str).to_numpy(dtype=object) if "group" in table else None
    file_whole = file_groups is not None and not leaking_groups(file_groups, folds)
    own = index.frame["group"].to_numpy()
    if index.has_groups:
        split_patients = leaking_groups(own, folds)
        if split_patients:
            raise UserError(f"{splits_file}: {len(split_patients)} {group_col!r} group(s) have images in more than "
                            f"one fold (e.g. {split_patients[0]!r}), so a patient would be tested on images it "
                            "trained on; drop --splits to make grouped folds, or pass splits made with this group "
                            "column")
        groups = merge_groups(own, file_groups) if file_whole else own
    else:
        groups = file_groups if file_whole else own
    if clusters is not None and leaking_groups(clusters, folds):
        notes.append(f"warning: {len(leaking_groups(clusters, folds))} duplicate cluster(s) are split across the "
                     f"folds of {splits_file}; results may be optimistic (make new splits to keep duplicates "
                     "together)")
    return folds, np.asarray(groups), notes


def calibration_split(train_idx: np.ndarray, labels: Sequence[int] | np.ndarray, groups: Sequence[str] | np.ndarray,
                      seed: int, parts: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``train_idx`` split into (fit, calibration): one of ``parts`` stratified, grouped parts is held out, so
    a temperature is fitted on about 10 % of the training fold, never on a patient it trained on."""
    labels, groups = np.asarray(labels)[train_idx], np.asarray(groups)[train_idx]
    with warnings.catch_warnings():  # a class with fewer groups than parts still gets its share where it can
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=min(parts, len(np.unique(groups))), shuffle=True,
                                        random_state=seed)
        fit, cal = next(splitter.split(train_idx, labels, groups))
    return np.asarray(train_idx)[fit], np.asarray(train_idx)[cal]

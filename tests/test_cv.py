"""ussf_lib.data.folds: stratified and grouped folds, saved and reused splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ussf_lib.data import folds as cv
from ussf_lib.data.index import index_folder, index_manifest
from ussf_lib.errors import UserError


def test_stratified_folds_balance_classes_and_are_seeded():
    labels = np.array([0] * 50 + [1] * 25 + [2] * 10)
    folds = cv.make_folds(labels, None, 5, seed=3)
    assert set(folds) == set(range(5))
    for k in range(5):
        counts = np.bincount(labels[folds == k], minlength=3)
        assert counts.tolist() == [10, 5, 2]
    np.testing.assert_array_equal(folds, cv.make_folds(labels, None, 5, seed=3))
    assert not np.array_equal(folds, cv.make_folds(labels, None, 5, seed=4))


def test_grouped_folds_never_split_a_group():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"p{i}" for i in range(40)], 8)
    labels = np.repeat(rng.integers(0, 3, 40), 8)
    folds = cv.make_folds(labels, groups, 5, seed=0)
    per_group = pd.DataFrame({"g": groups, "f": folds}).groupby("g")["f"].nunique()
    assert (per_group == 1).all()
    assert set(folds) == set(range(5))


def test_too_few_images_or_patients_per_class():
    with pytest.raises(UserError, match=r"class 'b' has 2 images, fewer than --folds 3; use --folds 2"):
        cv.check_fold_feasible(["a"] * 5 + ["b"] * 2, None, 3)
    with pytest.raises(UserError, match=r"has 1 patients, fewer than --folds 2; add patients to that class \(cross"):
        cv.check_fold_feasible(["a"] * 4 + ["b"] * 4, ["p1", "p2", "p3", "p4", "q", "q", "q", "q"], 2)
    with pytest.raises(UserError, match="at least 2 folds"):
        cv.check_fold_feasible(["a", "b"], None, 1)


def test_splits_roundtrip(phantom_dir, tmp_path):
    index = index_manifest(phantom_dir / "manifest.csv", group_col="patient")
    folds = cv.folds_for_index(index, 2, seed=0)
    path = cv.save_splits(index, folds, tmp_path / "splits.csv")
    table = pd.read_csv(path)
    assert list(table.columns) == ["path", "label", "group", "fold"]
    assert (table.groupby("group")["fold"].nunique() == 1).all()
    np.testing.assert_array_equal(cv.load_splits(path, index), folds)


def test_splits_from_other_data_are_refused(phantom_dir, tmp_path):
    index = index_manifest(phantom_dir / "manifest.csv", group_col="patient")
    table = cv.splits_frame(index, cv.folds_for_index(index, 2, seed=0)).iloc[1:]
    table.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(UserError, match="not in the splits file"):
        cv.load_splits(tmp_path / "s.csv", index)


def _dup_first(t: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([t, t.iloc[:1]])


def _relabel_first(t: pd.DataFrame) -> pd.DataFrame:
    t = t.copy()
    t.loc[t.index[0], "label"] = "normal" if t["label"].iloc[0] != "normal" else "benign"
    return t


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.drop(columns="fold"), r"missing column\(s\) \['fold'\]"),
    (_dup_first, "more than once"),
    (_relabel_first, "labels differ from the data's labels"),
    (lambda t: t.assign(fold=t["fold"].astype(float) + 0.5), "whole numbers 0..K-1"),
    (lambda t: t.assign(fold=-1), "whole numbers 0..K-1"),
    (lambda t: t.assign(fold="x"), "whole numbers 0..K-1"),
])
def test_damaged_splits_files_are_refused_by_name(phantom_dir, tmp_path, edit, match):
    index = index_manifest(phantom_dir / "manifest.csv", group_col="patient")
    table = edit(cv.splits_frame(index, cv.folds_for_index(index, 2, seed=0)))
    table.to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(UserError, match=match) as err:
        cv.load_splits(tmp_path / "s.csv", index)
    assert str(tmp_path / "s.csv") in str(err.value)


def test_split_composition_refuses_empty_folds_and_warns_about_untested_classes():
    labels = ["a", "a", "a", "b", "b", "b"]
    with pytest.raises(UserError, match="fold 2 tests no image"):
        cv.check_split_composition(labels, [0, 1, 0, 1, 0, 1], 3, "s.csv")
    # fold 1 tests no 'b', which is allowed but makes b's AUC and sensitivity undefined there
    notes = cv.check_split_composition(labels, [0, 1, 2, 0, 2, 0], 3, "s.csv")
    assert len(notes) == 1 and notes[0].startswith("warning: fold 1 of s.csv tests no 'b' image")


@pytest.mark.busi
def test_busi_folds_cover_every_image_once(busi_root):
    index = index_folder(busi_root)
    folds = cv.folds_for_index(index, 5, seed=0)
    assert len(folds) == 780 and set(folds) == set(range(5))
    assert np.bincount(folds).min() >= 155


def test_splits_listing_images_beyond_the_data_warn_and_still_apply(phantom_dir, tmp_path):
    index = index_manifest(phantom_dir / "manifest.csv", group_col="patient")
    folds = cv.folds_for_index(index, 2, seed=0)
    table = cv.splits_frame(index, folds)
    extra = pd.DataFrame([{"path": "benign/gone.png", "label": "benign", "group": "x", "fold": 0}])
    pd.concat([table, extra]).to_csv(tmp_path / "s.csv", index=False)
    with pytest.warns(UserWarning, match=r"s.csv: lists 1 image\(s\) that are not in the data \(e.g. "
                                         r"'benign/gone.png'\); they are ignored"):
        np.testing.assert_array_equal(cv.load_splits(tmp_path / "s.csv", index), folds)

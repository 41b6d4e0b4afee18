"""ussf_lib.data.audit and ``ussf audit``: exact and near-duplicate clusters, label conflicts, duplicate-aware folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ussf_lib.data import audit
from ussf_lib.data import folds as cv
from ussf_lib.cli import main
from ussf_lib.data.index import decode_index, index_folder, index_manifest
from ussf_lib.errors import UserError
from ussf_lib.training.experiment import CVConfig, compute_splits, prepare_data


def _pattern(seed: int, size: int = 48) -> Image.Image:
    """A smooth random grayscale picture: distinct seeds give phashes at least ~16 bits apart."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _near(image: Image.Image, seed: int = 9) -> Image.Image:
    """The same picture with a little noise: different bytes and pixels, phash within a few bits."""
    arr = np.asarray(image).astype(int) + np.random.default_rng(seed).integers(-6, 7, (image.height, image.width))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def dup_tree(tmp_path) -> Path:
    """a/ and b/ with: an identical file under both labels, the same pixels as PNG and BMP, a near-duplicate pair,
    and distinct singletons."""
    root = tmp_path / "dups"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    _pattern(1).save(root / "a" / "same.png")
    (root / "b" / "same copy.png").write_bytes((root / "a" / "same.png").read_bytes())  # identical, other label
    _pattern(2).save(root / "a" / "pix.png")
    _pattern(2).save(root / "a" / "pix.bmp")  # identical pixels, different bytes
    _pattern(3).save(root / "b" / "near1.png")
    _near(_pattern(3)).save(root / "b" / "near2.png")  # near duplicate, same label
    for i in range(4, 8):
        _pattern(i).save(root / ("a" if i % 2 else "b") / f"single{i}.png")
    return root


def test_audit_finds_exact_pixel_and_near_duplicates_and_conflicts(dup_tree):
    index = index_folder(dup_tree)
    result = audit.audit_index(index)
    by_path = dict(zip(index.frame["relpath"], result.ids))
    assert by_path["a/same.png"] == by_path["b/same copy.png"]
    assert by_path["a/pix.png"] == by_path["a/pix.bmp"]
    assert by_path["b/near1.png"] == by_path["b/near2.png"]
    singles = [by_path[p] for p in by_path if "single" in p]
    assert len(set(singles)) == 4 and not set(singles) & {by_path["a/same.png"], by_path["a/pix.png"]}
    s = result.summary
    assert (s["images"], s["clusters"], s["images_in_clusters"], s["largest_cluster"]) == (10, 3, 6, 2)
    assert (s["exact_clusters"], s["exact_images"]) == (2, 4)
    assert (s["conflict_clusters"], s["conflict_images"], s["exact_conflict_clusters"]) == (1, 2, 1)
    assert list(result.clusters.columns) == list(audit.CLUSTER_COLUMNS)
    kinds = result.clusters.groupby("cluster")["kind"].first().to_dict()
    assert kinds[by_path["a/same.png"]] == "exact" and kinds[by_path["a/pix.png"]] == "exact"
    assert kinds[by_path["b/near1.png"]] == "near"
    assert sorted(result.conflicts["path"]) == ["a/same.png", "b/same copy.png"]
    assert "1 cluster(s) carry different labels" in result.describe()


def test_cluster_ids_one_per_image_and_threshold_zero(dup_tree):
    index = index_folder(dup_tree)
    ids = audit.cluster_ids(index)
    assert ids.shape == (len(index),) and ids.dtype.kind == "i"
    assert ids[0] == 0 and set(ids) == set(range(ids.max() + 1))  # numbered in order of first image
    strict = audit.cluster_ids(index, threshold=0)
    assert len(set(strict)) == len(set(ids)) + 1  # the noisy copy is no longer a duplicate
    with pytest.raises(UserError, match="--dup-threshold 64"):
        audit.cluster_ids(index, threshold=64)
    with pytest.raises(UserError, match="--hash-size 1"):
        audit.cluster_ids(index, hash_size=1)


def test_near_pairs_matches_brute_force():
    bits = np.random.default_rng(0).integers(0, 2, (70, 16)).astype(np.uint8)
    i, j = audit.near_pairs(bits, 5, block=16)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    want = {(a, b) for a in range(70) for b in range(a + 1, 70) if dist[a, b] <= 5}
    assert set(zip(i.tolist(), j.tolist())) == want


def test_merge_groups_is_the_union_of_patients_and_clusters():
    groups = ["p1", "p1", "p2", "p3", "p4", "p5"]
    clusters = [0, 1, 2, 2, 3, 4]  # p2 and p3 share a duplicate image
    merged = cv.merge_groups(groups, clusters)
    assert merged.tolist() == ["p1", "p1", "p2", "p2", "p4", "p5"]
    chain = cv.merge_groups(["x", "y", "y", "z"], [7, 7, 8, 8])  # x~y by cluster, y~y by patient, y~z by cluster
    assert len(set(chain)) == 1


def test_grouped_folds_keep_clusters_and_patients_together(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    rows = []
    for i in range(24):
        _pattern(100 + i).save(root / f"{i}.png")
        rows.append((f"{i}.png", "xy"[i % 2], f"p{i // 2}"))
    _pattern(100).save(root / "dup.png")  # a copy of p0's image filed under patient p7
    rows.append(("dup.png", "x", "p7"))
    pd.DataFrame(rows, columns=["path", "label", "patient"]).to_csv(root / "m.csv", index=False)
    index = index_manifest(root / "m.csv", group_col="patient")
    ids = audit.cluster_ids(index)
    groups = cv.index_groups(index, ids)
    folds = cv.folds_for_index(index, 3, seed=0, clusters=ids)
    frame = index.frame.assign(fold=folds, cluster=ids, used=groups)
    assert (frame.groupby("group")["fold"].nunique() == 1).all()  # patients
    assert (frame.groupby("cluster")["fold"].nunique() == 1).all()  # duplicates
    assert frame.loc[frame["group"] == "p0", "fold"].iloc[0] == frame.loc[frame["group"] == "p7", "fold"].iloc[0]
    assert set(frame.loc[frame["group"].isin(["p0", "p7"]), "used"]) == {"p0"}


def test_dedup_makes_too_few_groups_a_clear_error(tmp_path):
    root = tmp_path / "t"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    for i in range(3):
        _pattern(i).save(root / "a" / f"{i}.png")
        _pattern(7).save(root / "b" / f"{i}.png")  # class b: three copies of one picture
    cfg = CVConfig(out=str(tmp_path / "out"), data=str(root), model="us_sfnet_tiny", folds=2, image_size=16,
                   progress=False)
    with pytest.raises(UserError, match=r"class 'b' has 1 images \(near-duplicate images count as one\).*--no-dedup-folds"):
        prepare_data(cfg, log=lambda _: None)
    prepared = prepare_data(CVConfig(**{**cfg.to_dict(), "dedup_folds": False}), log=lambda _: None)
    assert prepared.clusters is None and sorted(set(prepared.folds)) == [0, 1]
    assert not (tmp_path / "out").exists()


def test_compute_splits_is_what_a_run_would_use(dup_tree, tmp_path):
    cfg = CVConfig(out=str(tmp_path / "out"), data=str(dup_tree), model="us_sfnet_tiny", folds=2, image_size=16,
                   progress=False)
    table = compute_splits(cfg, log=lambda _: None)
    pd.testing.assert_frame_equal(table, prepare_data(cfg, log=lambda _: None).splits())
    assert list(table.columns) == ["path", "label", "group", "fold"]
    same = table.set_index("path").loc[["a/same.png", "b/same copy.png"]]
    assert same["group"].nunique() == 1 and same["fold"].nunique() == 1


def test_hashes_are_cached_with_the_images(dup_tree, tmp_path):
    index = index_folder(dup_tree)
    first = decode_index(index, 16, cache_dir=tmp_path / "cache", progress=False, hash_size=8)
    assert len(list((tmp_path / "cache").glob("hashes_*.csv"))) == 1
    again = decode_index(index, 16, cache_dir=tmp_path / "cache", progress=False, hash_size=8)
    pd.testing.assert_frame_equal(first.hashes, again.hashes)
    hashes_only = decode_index(index, None, progress=False, hash_size=8)
    assert hashes_only.images is None
    pd.testing.assert_frame_equal(first.hashes, hashes_only.hashes)


def test_audit_command_prints_and_writes_only_to_out(dup_tree, tmp_path, capsys):
    before = _snapshot(tmp_path)
    assert main(["audit", str(dup_tree), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 images: 2 exact-duplicate group(s)" in out and "a/same.png [a], b/same copy.png [b]" in out
    assert _snapshot(tmp_path) == before  # print only: nothing written anywhere
    assert main(["audit", "--data", str(dup_tree), "--out", str(tmp_path / "report"), "--dup-threshold", "0",
                 "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "report" / "audit_clusters.csv")
    assert list(table.columns) == ["cluster", "path", "label", "sha256", "phash", "kind"]
    assert len(table) == 4 and table["sha256"].str.len().eq(64).all()
    summary = json.loads((tmp_path / "report" / "audit_summary.json").read_text())
    assert summary["threshold"] == 0 and summary["conflict_clusters"] == 1 and summary["root"] == str(dup_tree)
    assert _snapshot(dup_tree) == {k: v for k, v in before.items() if k.startswith(f"{dup_tree}/")}


def test_audit_command_refuses_or_skips_unreadable_files(dup_tree, tmp_path, capsys):
    (dup_tree / "a" / "broken.png").write_bytes(b"not a png")
    before = _snapshot(dup_tree)
    assert main(["audit", str(dup_tree), "--out", str(tmp_path / "report"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 unreadable image(s)" in err and "broken.png" in err and "--skip-bad" in err and "\n" not in err
    assert not (tmp_path / "report").exists()
    assert main(["audit", str(dup_tree), "--out", str(tmp_path / "report"), "--skip-bad", "--no-progress"]) == 0
    capsys.readouterr()
    skipped = pd.read_csv(tmp_path / "report" / "skipped.csv")
    assert skipped["path"].tolist() == ["a/broken.png"] and skipped["reason"].str.len().gt(0).all()
    table = pd.read_csv(tmp_path / "report" / "audit_clusters.csv")
    assert "a/broken.png" not in set(table["path"])
    summary = json.loads((tmp_path / "report" / "audit_summary.json").read_text())
    assert [s["path"] for s in summary["skipped"]] == ["a/broken.png"]
    assert _snapshot(dup_tree) == before


def test_audit_command_with_manifest(dup_tree, tmp_path, capsys):
    paths = sorted(p.relative_to(dup_tree).as_posix() for p in dup_tree.rglob("*.*"))
    pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths]}).to_csv(dup_tree / "m.csv", index=False)
    assert main(["audit", "--manifest", str(dup_tree / "m.csv"), "--no-progress"]) == 0
    assert "3 duplicate cluster(s)" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (lambda d, t: [str(d), "--out", str(d / "report")], "inside the data folder"),
    (lambda d, t: [str(d), "--threshold", "-1"], "--dup-threshold -1"),
    (lambda d, t: ["--data", str(d), "--dup-threshold", "-1"], "--dup-threshold -1"),
    (lambda d, t: [], "needs --data DIR"),
    (lambda d, t: [str(d), "--data", str(t)], "two data folders"),
    (lambda d, t: [str(t / "nowhere")], "no such folder"),
    (lambda d, t: ["--data", str(t / "nowhere")], "no such folder"),
])
def test_audit_command_errors(dup_tree, tmp_path, capsys, args, match):
    before = _snapshot(tmp_path)
    assert main(["audit", *args(dup_tree, tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and err.startswith("ussf audit: error:")
    assert _snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def busi_audit(busi_root):
    index = index_folder(busi_root)
    return audit.audit_index(index)


@pytest.mark.busi
def test_busi_has_exact_and_cross_label_duplicates(busi_audit):
    result = busi_audit
    s = result.summary
    assert s["images"] == 780
    assert s["exact_clusters"] >= 1 and s["exact_conflict_clusters"] >= 1  # identical files under two labels
    assert s["conflict_clusters"] >= 1 and result.conflicts.groupby("cluster")["label"].nunique().min() >= 2
    assert s["clusters"] > s["exact_clusters"]  # near duplicates beyond the identical files


@pytest.mark.busi
def test_busi_five_folds_never_split_a_duplicate_cluster(busi_root, busi_audit, tmp_path):
    result = busi_audit
    cfg = CVConfig(out=str(tmp_path / "out"), data=str(busi_root), model="us_sfnet_tiny", folds=5, image_size=32,
                   progress=False)
    prepared = prepare_data(cfg, log=lambda _: None)
    assert len(prepared.index) == 780 and sorted(set(prepared.folds)) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(prepared.clusters, result.ids)  # the folds use the audit's clusters
    splits = prepared.splits().assign(cluster=result.ids)
    for key in ("cluster", "group"):
        per = splits.groupby(key)["fold"].nunique()
        assert (per == 1).all(), f"{int((per > 1).sum())} {key}s are split across folds"
    # Zero train/test overlap, fold by fold, for clusters and groups alike.
    for k in range(5):
        test, train = splits[splits["fold"] == k], splits[splits["fold"] != k]
        assert not set(test["cluster"]) & set(train["cluster"])
        assert not set(test["group"]) & set(train["group"])
    assert np.bincount(prepared.folds).min() >= 140  # still balanced
    assert not (tmp_path / "out").exists()

"""ussf_lib.data.index: indexing folders and manifests, decoding, caching, normalization."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ussf_lib.data import index as data
from ussf_lib.errors import UserError
from ussf_lib.paper import PAPER_MEAN, PAPER_STD


def _save(path: Path, mode: str = "RGB", size=(20, 12), value=128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        arr = np.linspace(0, 65535, size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0])
        Image.fromarray(arr).save(path)
    else:
        Image.new(mode, size, value if mode not in ("RGB", "RGBA", "CMYK") else (value,) * len(mode)).save(path)
    return path


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    for cls, n in (("b_cls", 3), ("a_cls", 4)):
        for i in range(n):
            _save(root / cls / f"img {i} (x).png", value=40 * i)
    _save(root / "a_cls" / ".ipynb_checkpoints" / "copy.png")
    (root / "a_cls" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("top-level file")
    return root


def test_index_folder_sorted_classes_and_ignored_counts(tree):
    index = data.index_folder(tree)
    assert index.classes == ["a_cls", "b_cls"]
    assert index.class_counts().tolist() == [4, 3]
    assert index.ignored == {"hidden": 1, "non-image": 2}
    assert index.targets.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert all(Path(p).is_absolute() for p in index.frame["path"])
    assert index.frame["relpath"].iloc[0] == "a_cls/img 0 (x).png"
    assert "ignored 1 hidden, 2 non-image" in index.describe()


def test_explicit_class_order_is_kept(tree):
    index = data.index_folder(tree, classes=["b_cls", "a_cls"])
    assert index.classes == ["b_cls", "a_cls"]
    assert index.targets.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert set(index.frame.loc[index.frame.target == 0, "label"]) == {"b_cls"}


def test_empty_class_folder_is_ignored_with_warning(tree):
    (tree / "c_empty").mkdir()
    with pytest.warns(UserWarning, match="c_empty"):
        index = data.index_folder(tree)
    assert index.classes == ["a_cls", "b_cls"]


@pytest.mark.parametrize("make,match", [
    (lambda root: root / "missing", "no such folder"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "no images found"),
    (lambda root: _save(root / "one" / "c" / "x.png").parents[1], "only one class"),
])
def test_folder_errors_are_user_errors(tmp_path, make, match):
    with pytest.raises(UserError, match=match):
        data.index_folder(make(tmp_path))


def test_manifest_relative_paths_and_groups(tmp_path):
    root = tmp_path / "m"
    for i in range(4):
        _save(root / "imgs" / f"{i}.png")
    pd.DataFrame({"path": [f"imgs/{i}.png" for i in range(4)], "label": ["x", "y", "x", "y"],
                  "patient": ["p1", "p1", "p2", "p2"]}).to_csv(root / "m.csv", index=False)
    index = data.index_manifest(root / "m.csv", group_col="patient")
    assert index.classes == ["x", "y"]
    assert index.has_groups and sorted(index.frame["group"].unique()) == ["p1", "p2"]
    assert (root / "imgs" / "0.png").resolve() == Path(index.frame["path"].iloc[0])


@pytest.mark.parametrize("rows,extra,match", [
    ({"path": ["a.png"], "labl": ["x"]}, {}, "missing column"),
    ({"path": ["a.png", "a.png"], "label": ["x", "y"]}, {}, "more than once"),
    # the same file spelled two ways is still one image listed twice (here under two labels)
    ({"path": ["a.png", "./a.png", "b.png"], "label": ["x", "y", "y"]}, {},
     r"1 image\(s\) listed more than once, e.g. 'a.png' and './a.png'; keep one row per image"),
    ({"path": ["a.png", "", "b.png"], "label": ["x", "y", "y"]}, {}, "a row has an empty path"),
    ({"path": ["nope.png", "a.png"], "label": ["x", "y"]}, {}, "does not exist"),
    ({"path": [".", "a.png"], "label": ["x", "y"]}, {}, r"'\.' is a folder; list image files, relative to"),
    ({"path": ["a.png", "b.png"], "label": ["x", "z"]}, {"classes": ["x", "y"]}, "not in the class list"),
    ({"path": ["a.png", "b.png"], "label": ["x", "y"]}, {"group_col": "patient"}, "missing column"),
])
def test_manifest_errors(tmp_path, rows, extra, match):
    root = tmp_path / "m"
    _save(root / "a.png"), _save(root / "b.png"), _save(tmp_path / "outside.png")
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    with pytest.raises(UserError, match=match):
        data.index_manifest(root / "m.csv", **extra)


@pytest.mark.parametrize("mode", ["L", "I;16", "P", "RGBA", "LA", "CMYK", "1", "RGB"])
def test_read_image_converts_modes_to_rgb(tmp_path, mode):
    path = _save(tmp_path / f"ü nicode {mode.replace(';', '')}.png" if mode != "CMYK" else tmp_path / "c.tiff", mode)
    arr = data.read_image(path, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    if mode == "I;16":  # rescaled by its own range, not clipped to white
        assert arr.min() == 0 and arr.max() >= 250


# Pixel values after conversion: alpha composited over black, CMYK by Pillow's (255-c)(255-k)/255 rule.
@pytest.mark.parametrize("mode, fill, grey", [
    ("L", 128, 128), ("RGB", (128, 128, 128), 128), ("1", 1, 255),
    ("RGBA", (128, 128, 128, 128), 64), ("RGBA", (200, 200, 200, 255), 200),
    ("LA", (128, 255), 128), ("LA", (128, 0), 0), ("CMYK", (128, 128, 128, 128), 63),
])
def test_read_image_conversion_values(tmp_path, mode, fill, grey):
    path = tmp_path / ("c.tiff" if mode == "CMYK" else "x.png")
    Image.new(mode, (20, 12), fill).save(path)
    arr = data.read_image(path, 16)
    assert (arr == grey).all(), np.unique(arr)


def test_read_image_palette_uses_the_palette(tmp_path):
    img = Image.new("P", (20, 12), 3)
    img.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    img.save(tmp_path / "p.png")
    assert (data.read_image(tmp_path / "p.png", 8) == np.array([10, 20, 30], dtype=np.uint8)).all()


def test_read_image_one_pixel(tmp_path):
    arr = data.read_image(_save(tmp_path / "dot.png", "L", size=(1, 1), value=200), 8)
    assert arr.shape == (8, 8, 3) and (arr == 200).all()


def test_read_image_corrupt_and_fake(tmp_path):
    good = _save(tmp_path / "good.png", size=(64, 64))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is text")
    for bad in (truncated, fake):
        with pytest.raises(UserError, match=bad.name):
            data.read_image(bad, 16)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    with pytest.raises(UserError, match="decompression-bomb"):
        data.read_image(path, 16)


def test_decode_lists_every_bad_file_at_once(tree):
    (tree / "a_cls" / "broken1.png").write_text("x")
    (tree / "b_cls" / "broken2.png").write_text("y")
    index = data.index_folder(tree)
    with pytest.raises(UserError, match=r"2 unreadable image\(s\).*broken1\.png.*broken2\.png"):
        data.decode_images(index, 8, progress=False)


def test_decode_cache_roundtrip_and_nothing_written_in_data(tree, tmp_path):
    before = _snapshot(tree)
    index = data.index_folder(tree)
    first = data.decode_images(index, 12, cache_dir=tmp_path / "cache", progress=False)
    assert first.shape == (7, 12, 12, 3) and first.dtype == np.uint8
    files = list((tmp_path / "cache").glob("images_*.npy"))
    assert len(files) == 1
    second = data.decode_images(index, 12, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(second, np.memmap)
    np.testing.assert_array_equal(first, second)
    assert _snapshot(tree) == before
    with pytest.raises(UserError, match="inside the data folder"):
        data.decode_images(index, 12, cache_dir=tree / "cache", progress=False)


def _check_outputs(index: data.ImageIndex, allowed: tuple = (), refused: tuple = ()) -> None:
    """Each ``allowed`` folder passes ``index.check_outside``; each ``(out, hit)`` of ``refused`` is refused as inside
    the data folder ``hit``."""
    for out in allowed:
        assert index.check_outside(out, "--out") == out
    for out, hit in refused:
        with pytest.raises(UserError, match=re.escape(f"--out {out}: is inside the data folder {hit};")):
            index.check_outside(out, "--out")


def test_a_manifests_data_are_its_folder_and_its_image_folders_so_runs_may_sit_beside_them(tmp_path):
    project = tmp_path / "project"
    for rel in ("images/benign/b1.png", "images/benign/deeper/b2.png", "images/malignant/m1.png"):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(project / rel)
    (project / "data.csv").write_text("path,label\nimages/benign/b1.png,benign\nimages/benign/deeper/b2.png,benign\n"
                                     "images/malignant/m1.png,malignant\n")
    index = data.index_manifest(project / "data.csv")
    _check_outputs(index, allowed=(project / "runs" / "cv1", project / "other"),
                   refused=((project, project), (project / "images", project / "images"),
                            (project / "images" / "run", project / "images"),
                            (project / "images" / "malignant" / "run", project / "images" / "malignant")))
    (project / "flat.csv").write_text("path,label\nimages/benign/b1.png,benign\nloose.png,malignant\n")
    Image.new("L", (8, 8)).save(project / "loose.png")
    with pytest.raises(UserError, match=f"--out {project / 'runs'}: is inside the data folder {project};"):
        data.index_manifest(project / "flat.csv").check_outside(project / "runs", "--out")  # images beside it
    with pytest.raises(UserError, match="inside the data folder"):
        data.index_folder(project / "images").check_outside(project / "images" / "run", "--out")


def test_a_manifest_may_list_images_elsewhere_which_are_then_data_too(tmp_path):
    """A manifest kept in a project can pick a subset of a shared, read-only data set (../ or absolute paths)."""
    shared = tmp_path / "shared" / "busi"
    for rel in ("benign/b1.png", "malignant/m1.png", "malignant/m2.png"):
        _save(shared / rel)
    project = tmp_path / "project"
    project.mkdir()
    rows = f"path,label\n../shared/busi/benign/b1.png,benign\n{shared / 'malignant' / 'm2.png'},malignant\n"
    (project / "subset.csv").write_text(rows)
    index = data.index_manifest(project / "subset.csv")
    # named by absolute path: the same images get the same names wherever the manifest is kept
    assert index.frame["relpath"].tolist() == [str(shared / "benign/b1.png"), str(shared / "malignant/m2.png")]
    (project / "deeper").mkdir()
    (project / "deeper" / "subset.csv").write_text(rows.replace("../shared", "../../shared"))
    moved = data.index_manifest(project / "deeper" / "subset.csv")
    assert moved.frame["relpath"].tolist() == index.frame["relpath"].tolist()
    assert data.fingerprint(moved) == data.fingerprint(index)
    _check_outputs(index, allowed=(project / "runs",),  # busi is data too
                   refused=((shared / "runs", shared), (shared / "benign" / "x", shared / "benign")))


def test_a_manifest_kept_inside_a_data_set_may_write_only_in_its_own_branch(tmp_path):
    dataset = tmp_path / "dataset"
    for rel in ("benign/b1.png", "malignant/m1.png"):
        _save(dataset / rel)
    (dataset / "sub").mkdir()
    (dataset / "sub" / "data.csv").write_text("path,label\n../benign/b1.png,benign\n../malignant/m1.png,malignant\n")
    index = data.index_manifest(dataset / "sub" / "data.csv")
    _check_outputs(index, allowed=(dataset / "sub" / "run",),
                   refused=((dataset, dataset), (dataset / "runs", dataset), (dataset / "benign" / "x", dataset / "benign"),
                            (dataset / "sub", dataset / "sub")))  # the last: the manifest's own folder


def test_a_manifest_inside_an_image_folder_cannot_write_there(tmp_path):
    dataset = tmp_path / "ds"
    _save(dataset / "benign" / "b1.png"), _save(dataset / "malignant" / "m1.png")
    (dataset / "benign" / "meta").mkdir()
    (dataset / "benign" / "meta" / "data.csv").write_text("path,label\n../b1.png,benign\n../../malignant/m1.png,malignant\n")
    index = data.index_manifest(dataset / "benign" / "meta" / "data.csv")
    _check_outputs(index, refused=((dataset / "benign" / "meta" / "runs", dataset / "benign"),))  # among images


def test_images_from_unrelated_places_protect_their_own_folders_not_everything_above_them(tmp_path):
    _save(tmp_path / "a" / "b" / "c" / "x.png"), _save(tmp_path / "d" / "y.png")
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.csv").write_text("path,label\n../a/b/c/x.png,p\n../d/y.png,q\n")
    index = data.index_manifest(project / "data.csv")
    _check_outputs(index, allowed=(tmp_path / "runs", project / "runs"),  # tmp_path is no data set's root
                   refused=((tmp_path / "d" / "run", tmp_path / "d"),
                            (tmp_path / "a" / "b" / "c" / "run", tmp_path / "a/b/c")))


def test_symlinked_images_make_both_their_listed_folder_and_their_target_data(tmp_path):
    target = tmp_path / "store"
    for name in ("b1.png", "m1.png"):
        _save(target / name)
    project = tmp_path / "project"
    for cls, name in (("benign", "b1.png"), ("malignant", "m1.png")):
        (project / "images" / cls).mkdir(parents=True)
        (project / "images" / cls / name).symlink_to(target / name)
    (project / "data.csv").write_text("path,label\nimages/benign/b1.png,benign\nimages/malignant/m1.png,malignant\n")
    index = data.index_manifest(project / "data.csv")
    assert index.frame["relpath"].tolist() == ["images/benign/b1.png", "images/malignant/m1.png"]  # as listed
    assert index.frame["path"].tolist() == [str(target / "b1.png"), str(target / "m1.png")]  # the files read
    _check_outputs(index, allowed=(project / "runs",),
                   refused=((project / "images" / "benign" / "run", project / "images" / "benign"),
                            (target / "run", target)))


def test_decode_cache_is_not_reused_after_an_image_changes(tree, tmp_path):
    index = data.index_folder(tree)
    first = np.array(data.decode_images(index, 12, cache_dir=tmp_path / "cache", progress=False))
    changed = index.frame["path"].iloc[0]
    _save(Path(changed), value=250, size=(30, 30))  # new pixels, new size and mtime
    again = data.decode_images(data.index_folder(tree), 12, cache_dir=tmp_path / "cache", progress=False)
    assert (again[0] == 250).all() and not (first[0] == 250).all()
    np.testing.assert_array_equal(again[1:], first[1:])
    assert len(list((tmp_path / "cache").glob("images_*.npy"))) == 2


def test_fingerprint_changes_with_content(tree):
    fp1 = data.fingerprint(data.index_folder(tree))
    assert fp1 == data.fingerprint(data.index_folder(tree))
    _save(tree / "a_cls" / "img 0 (x).png", value=7)
    assert data.fingerprint(data.index_folder(tree)) != fp1


def test_normalize_batch_values_and_layout():
    batch = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x = data.normalize_batch(batch, PAPER_MEAN, PAPER_STD)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    expected = [(1 - m) / s for m, s in zip(PAPER_MEAN, PAPER_STD)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected))
    assert data.normalize_batch(batch, PAPER_MEAN, PAPER_STD, channels_last=True).is_contiguous(
        memory_format=torch.channels_last)


def test_resolve_normalization():
    assert data.resolve_normalization("paper") == (PAPER_MEAN, PAPER_STD)
    with pytest.raises(UserError, match="unknown normalization"):
        data.resolve_normalization("bogus")


@pytest.mark.busi
def test_busi_index_reads_names_with_spaces(busi_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = data.index_folder(busi_root)
    assert index.classes == ["benign", "malignant", "normal"]
    assert index.class_counts().to_dict() == {"benign": 437, "malignant": 210, "normal": 133}
    sample = index.frame.groupby("label").head(2)
    sub = data.ImageIndex(sample.reset_index(drop=True), index.classes, index.root, "folder")
    arr = data.decode_images(sub, 32, progress=False)
    assert arr.shape == (6, 32, 32, 3) and arr.std() > 5


def test_a_class_folder_that_cannot_be_listed_is_an_error_not_a_missing_class(tree, monkeypatch):
    real_scandir = os.scandir
    locked = tree / "b_cls"

    def scandir(path="."):  # as for a folder without read permission (root ignores chmod, so it is simulated)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=f"{locked}: cannot be read \\(Permission denied\\); fix its permissions"):
        data.index_folder(tree)


def test_a_damaged_decode_cache_is_rebuilt_with_a_warning(tree, tmp_path):
    index = data.index_folder(tree)
    first = np.array(data.decode_images(index, 12, cache_dir=tmp_path / "cache", progress=False))
    (cached,) = (tmp_path / "cache").glob("images_*.npy")
    cached.write_bytes(cached.read_bytes()[:200])  # cut short
    with pytest.warns(UserWarning, match="damaged cache"):
        again = data.decode_images(index, 12, cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(cached), first)  # replaced by a whole one

"""ussf_lib.analysis.explore on a hand-made folder tree (known sizes and modes) and on the phantom."""

from __future__ import annotations

import re
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from PIL import Image

from ussf_lib.analysis import explore
from ussf_lib.data.index import decode_images, load_index


@pytest.fixture()
def tree(tmp_path):
    """a/: 3 images (one RGB 8x8, two gray 12x10), b/: 2 gray 12x10 images."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    gray = np.full((10, 12), 100, dtype=np.uint8)
    Image.fromarray(gray).save(root / "a" / "x0.png")
    Image.fromarray(gray).save(root / "a" / "x1.png")
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(root / "a" / "x2.png")
    Image.fromarray(gray).save(root / "b" / "y0.png")
    Image.fromarray(np.full((10, 12), 30, dtype=np.uint8)).save(root / "b" / "y1.png")
    return load_index(data=root)


def test_class_table_counts_and_imbalance(tree):
    table = explore.class_table(tree).set_index("class")
    assert table["images"].to_dict() == {"a": 3, "b": 2}
    assert table.at["a", "fraction"] == pytest.approx(0.6)
    assert table["imbalance"].to_dict() == {"a": 1.0, "b": 1.5}
    assert "patients" not in table.columns  # a folder tree knows no patients


def test_sizes_and_modes_from_headers(tree):
    props = explore.image_properties(tree)
    assert len(props) == 5 and set(props["format"]) == {"PNG"}
    sizes = explore.size_mode_table(props, ["b", "a"])
    assert list(sizes.columns) == ["width", "height", "mode", "b", "a", "total"]
    first = sizes.iloc[0]
    assert (first["width"], first["height"], first["mode"]) == (12, 10, "L")
    assert (first["a"], first["b"], first["total"]) == (2, 2, 4)
    assert sizes["total"].sum() == 5


def test_intensity_histograms_and_summary(tree):
    images = decode_images(tree, 8, progress=False)
    hist = explore.intensity_histograms(images, tree.targets, tree.classes, bins=16)
    for _, rows in hist.groupby("class"):
        width = rows["bin_right"] - rows["bin_left"]
        assert (rows["density"] * width).sum() == pytest.approx(1.0)
    b = hist[hist["class"] == "b"]
    assert set(b.loc[b["density"] > 0, "bin_left"]) == {16.0, 96.0}  # values 30 and 100
    summary = explore.intensity_summary(images, tree.targets, tree.classes).set_index("class")
    assert summary.at["b", "mean"] == pytest.approx(65.0)
    assert summary.at["a", "median"] == pytest.approx(100.0)


def test_patients_and_fold_check_on_the_phantom(phantom_dir):
    index = load_index(manifest=phantom_dir / "manifest.csv", group_col="patient")
    per_patient = explore.images_per_patient(index)
    assert per_patient["images"].sum() == len(index)
    assert not per_patient["mixed_labels"].any()
    summary = explore.patient_summary(per_patient, index.classes).set_index("class")
    assert (summary["images"] == 20).all() and (summary["patients"] >= 2).all()
    assert "patients" in explore.class_table(index).columns
    assert "is possible" in explore.fold_check(index, 2)
    assert "NOT possible" in explore.fold_check(index, 50)
    folder_index = load_index(data=phantom_dir)  # no groups: each image is its own group
    assert (explore.images_per_patient(folder_index)["images"] == 1).all()
    assert "images" in explore.fold_check(folder_index, 5)
    # classes in the index's order (here the paper's: normal, benign, ...), as every per-class figure draws them
    from ussf_lib.paper import PAPER_CLASSES

    index = load_index(manifest=phantom_dir / "manifest.csv", group_col="patient", classes=list(PAPER_CLASSES))
    per_patient = explore.images_per_patient(index)
    assert list(dict.fromkeys(per_patient["label"])) == index.classes != sorted(index.classes)
    import matplotlib.pyplot as plt

    fig = explore.plot_images_per_patient(per_patient, grouped=True)
    ax = fig.axes[0]
    assert ax.get_title() == "Images per patient (group)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == index.classes[::-1]  # top of the stack first
    plt.close(fig)
    fig = explore.plot_images_per_patient(explore.images_per_patient(folder_index), grouped=False)
    assert fig.axes[0].get_title() == "No patient ids: each image is its own group"
    plt.close(fig)


def test_figures_are_saved(tree, tmp_path):
    import matplotlib.pyplot as plt

    images = decode_images(tree, 8, progress=False)
    figs = [
        explore.plot_class_counts(explore.class_table(tree), out=tmp_path / "counts.png"),
        explore.plot_sample_grid(images, tree.targets, tree.classes, per_class=3, out=tmp_path / "grid.png"),
        explore.plot_intensity_histograms(explore.intensity_histograms(images, tree.targets, tree.classes),
                                          out=tmp_path / "hist.png"),
        explore.plot_images_per_patient(explore.images_per_patient(tree), out=tmp_path / "patients.png"),
    ]
    steps = figs[2].axes[0].patches  # every bin drawn, up to grey level 256
    assert steps and max(patch.get_path().vertices[:, 0].max() for patch in steps) == pytest.approx(256.0)
    count_labels = [t.get_text() for t in figs[0].axes[0].texts]
    assert all(re.fullmatch(r"\d+ \(x[0-9.]+\)", t) for t in count_labels) and count_labels
    patients_ax = figs[3].axes[0]  # counts of images and patients: whole-number ticks only
    assert all(float(t).is_integer() for t in [*patients_ax.get_xticks(), *patients_ax.get_yticks()])
    for fig in figs:
        plt.close(fig)
    assert len(list(tmp_path.glob("*.png"))) == 4
    for png in tmp_path.glob("*.png"):  # real pictures with something drawn, not empty canvases
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("L"))
        assert im.format == "PNG" and min(im.size) >= 150 and pixels.std() > 5, png.name
    picks = explore.sample_indices(tree.targets, 2, per_class=5, seed=0)
    assert [len(p) for p in picks] == [3, 2]  # never more than a class has
    assert picks == explore.sample_indices(tree.targets, 2, per_class=5, seed=0)

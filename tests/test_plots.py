"""ussf_lib.evaluation.plots: figures are written as PNGs and show the numbers they were given."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from ussf_lib.evaluation import plots  # noqa: F401  (selects Agg before pyplot is imported below)
from ussf_lib.errors import UserError
from ussf_lib.evaluation.plots import (
    plot_confusion,
    plot_confusion_pair,
    plot_feature_maps,
    plot_fold_confusions,
    plot_learning_curves,
    plot_per_class_bars,
    plot_roc,
)

import matplotlib.pyplot as plt  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["normal", "benign", "primary"]
CM = np.array([[12, 2, 1],
               [3, 9, 0],
               [0, 4, 7]])


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.size[0] > 0 and img.size[1] > 0


def annotation_grid(ax, n):
    """The heatmap's cell annotations as an (n, n) array of strings (row-major, as seaborn writes them)."""
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == n * n
    return np.array(texts).reshape(n, n)


def test_confusion_counts_annotations_and_png(tmp_path):
    out = tmp_path / "nested" / "dir" / "cm.png"
    fig = plot_confusion(CM, CLASSES, out=out)
    assert_png(out)
    ax = fig.axes[0]
    assert annotation_grid(ax, 3).astype(int).tolist() == CM.tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    plt.close(fig)


def test_confusion_normalised_rows_sum_to_one():
    fig = plot_confusion(CM, CLASSES, normalize=True)
    grid = annotation_grid(fig.axes[0], 3).astype(float)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0, atol=0.015)  # two-decimal rounding
    np.testing.assert_allclose(grid, CM / CM.sum(axis=1, keepdims=True), atol=0.005)
    plt.close(fig)


def test_confusion_on_given_axes_and_bad_shape():
    fig, ax = plt.subplots()
    assert plot_confusion(CM, CLASSES, ax=ax, title="t") is fig
    assert ax.get_title() == "t"
    with pytest.raises(UserError, match="shape"):
        plot_confusion(CM, CLASSES[:2])
    plt.close(fig)


def test_confusion_pair(tmp_path):
    out = tmp_path / "pair.png"
    fig = plot_confusion_pair(CM, CLASSES, title="pooled", out=out)
    assert_png(out)
    heatmaps = [ax for ax in fig.axes if len(ax.texts) == 9]
    assert len(heatmaps) == 2
    assert annotation_grid(heatmaps[0], 3).astype(int).tolist() == CM.tolist()
    np.testing.assert_allclose(annotation_grid(heatmaps[1], 3).astype(float).sum(axis=1), 1.0, atol=0.015)
    plt.close(fig)


def _history(epochs, with_val=True, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "epoch": np.arange(1, epochs + 1),
        "train_loss": np.linspace(1.0, 0.2, epochs) + rng.uniform(0, 0.05, epochs),
        "train_acc": np.linspace(0.4, 0.95, epochs),
    })
    if with_val:
        frame["val_loss"] = frame["train_loss"] + 0.1
        frame["val_acc"] = frame["train_acc"] - 0.05
    return frame


def test_learning_curves_lines_per_fold(tmp_path):
    out = tmp_path / "curves.png"
    histories = {k: _history(5, seed=k) for k in range(3)}
    fig = plot_learning_curves(histories, out=out)
    assert_png(out)
    loss_ax, acc_ax = fig.axes
    assert len(loss_ax.lines) == len(acc_ax.lines) == 3 * 2  # folds x (train, val)
    # one legend beside the panels, none over the curves
    assert loss_ax.get_legend() is None and acc_ax.get_legend() is None
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["fold 0", "fold 1", "fold 2", "train",
                                                                   "test (val_* columns)"]
    plt.close(fig)

    fig = plot_learning_curves({"0": _history(2, with_val=False), "1": _history(2, with_val=False)})
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]  # folds x (train)
    fig.canvas.draw()  # two epochs: ticks only at whole epochs, not 1.0, 1.2, ...
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())
    plt.close(fig)

    with pytest.raises(UserError, match="train_acc"):
        plot_learning_curves({0: _history(3).drop(columns="train_acc")})


def test_learning_curves_skip_epochs_without_validation():
    hist = _history(30)
    hist.loc[hist["epoch"] % 3 != 0, ["val_loss", "val_acc"]] = np.nan  # as written by --eval-every 3
    fig = plot_learning_curves({0: hist})
    for ax, metric in zip(fig.axes, ("loss", "acc")):
        train_line, val_line = ax.lines
        assert list(train_line.get_xdata()) == list(range(1, 31))
        assert list(val_line.get_xdata()) == list(range(3, 31, 3))
        np.testing.assert_allclose(val_line.get_ydata(), hist[f"val_{metric}"].dropna())
        assert val_line.get_marker() == "s" and train_line.get_marker() in ("None", None, "")
    plt.close(fig)
    fig = plot_learning_curves({0: _history(1)})  # one epoch: single points, visible only as markers
    assert all(line.get_marker() not in ("None", None, "") for ax in fig.axes for line in ax.lines)
    plt.close(fig)


def test_roc_legend_auc_matches_sklearn(tmp_path):
    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = pd.DataFrame({"path": [f"i{i}" for i in range(60)], "label": np.array(CLASSES)[y], "fold": 0})
    for k, c in reversed(list(enumerate(CLASSES))):  # columns in a different order than classes
        pred[f"prob_{c}"] = probs[:, k]
    out = tmp_path / "roc.png"
    fig = plot_roc(pred, CLASSES, out=out)
    assert_png(out)
    assert fig.axes[0].get_title() == "One-vs-rest ROC, all predictions pooled"  # not the tables' fold mean
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for k, cls in enumerate(CLASSES):
        entry = next(t for t in legend if t.startswith(cls))
        shown = float(re.search(r"AUC = ([0-9.]+)", entry).group(1))
        assert shown == pytest.approx(roc_auc_score(y == k, probs[:, k]), abs=5e-4)
    plt.close(fig)


def test_per_class_bars(tmp_path):
    rows = []
    for model, base in (("us_sfnet", 0.9), ("resnet18", 0.8), ("us_sfnet (paper)", 0.85)):
        for i, cls in enumerate(CLASSES):
            row = {"model": model, "class": cls}
            for m in ("precision", "sensitivity", "specificity", "f1"):
                row[f"{m}_mean"] = base + 0.02 * i
                row[f"{m}_std"] = 0.01
            rows.append(row)
    table = pd.DataFrame(rows)
    table.loc[table["model"] == "us_sfnet (paper)", ["f1_mean", "f1_std"]] = np.nan  # the paper has no per-class F1
    out = tmp_path / "bars.png"
    fig = plot_per_class_bars(table, out=out)
    assert_png(out)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["precision", "sensitivity", "specificity", "f1"]
    assert len(panels[0].patches) == 3 * 3  # models x classes
    assert len(panels[3].patches) == 2 * 3  # the paper's missing F1 bars are left out
    heights = sorted(round(p.get_height(), 6) for p in panels[0].patches)
    assert heights == sorted(round(v, 6) for v in table["precision_mean"])
    assert all(ax.get_ylim() == (0.0, 1.02) for ax in panels)  # one bounded scale: fractions here
    assert panels[0].get_ylabel() == "mean ± std over folds (fraction)"  # what the bars and error bars are
    assert fig.legends and [t.get_text() for t in fig.legends[0].get_texts()] == ["us_sfnet", "resnet18",
                                                                               "us_sfnet (paper)"]
    assert [t.get_text() for t in panels[3].texts] == ["n/a"] * 3  # the paper's missing F1, not a zero
    hatched = [bar for bar in panels[0].patches if bar.get_hatch()]  # the reported figures, not a third model
    assert len(hatched) == 3 and {bar.get_hatch() for bar in hatched} == {"///"}
    plt.close(fig)

    wide = table.assign(precision_mean=0.95, precision_std=0.2)  # a std past the bound: the bar stops at 1
    fig = plot_per_class_bars(wide, metric_cols=("precision",))
    tops = [seg[:, 1].max() for coll in fig.axes[0].collections for seg in map(np.asarray, coll.get_segments())]
    assert tops and max(tops) <= 1.0 + 1e-9
    plt.close(fig)

    fig = plot_per_class_bars(table.drop(columns=[c for c in table if c.endswith("_std")]),
                              metric_cols=("precision",))
    assert len(fig.axes[0].patches) == 9 and fig.axes[0].get_ylabel() == "mean over folds (fraction)"
    plt.close(fig)
    percent = table.assign(**{c: table[c] * 100 for c in table if c.endswith(("_mean", "_std"))})
    fig = plot_per_class_bars(percent, metric_cols=("precision",))
    assert fig.axes[0].get_ylim() == (0.0, 102.0) and fig.axes[0].get_ylabel() == "mean ± std over folds (%)"
    plt.close(fig)

    with pytest.raises(UserError, match="model"):
        plot_per_class_bars(table.drop(columns="model"))


def test_fold_confusions_share_one_count_scale(tmp_path):
    small, large = np.array([[2, 1], [0, 3]]), np.array([[7, 0], [1, 8]])
    fig = plot_fold_confusions({0: small, 1: large}, ["a", "b"], title="m: each fold", out=tmp_path / "folds.png")
    assert_png(tmp_path / "folds.png")
    heatmaps = [ax for ax in fig.axes if ax.get_title()]  # not the colour bars
    count_maps, fraction_maps = heatmaps[0::2], heatmaps[1::2]
    assert [ax.get_title() for ax in count_maps] == ["fold 0: counts", "fold 1: counts"]
    assert all(ax.collections[0].get_clim() == (0.0, 8.0) for ax in count_maps)  # equal shade, equal count
    assert all(ax.collections[0].get_clim() == (0.0, 1.0) for ax in fraction_maps)
    assert fig._suptitle.get_text() == "m: each fold"
    plt.close(fig)


def test_feature_maps_each_on_a_scale_symmetric_about_zero(tmp_path):
    import torch

    maps = {"x": torch.randn(1, 2, 8, 8), "tiny": 1e-3 * torch.randn(1, 2, 8, 8), "plain": np.arange(16.0).reshape(4, 4) - 3}
    fig = plot_feature_maps(maps, channel=1, out=tmp_path / "maps.png")
    assert_png(tmp_path / "maps.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["x, channel 1", "tiny, channel 1", "plain, channel 1"]
    for ax, value in zip(panels, (maps["x"][0, 1].numpy(), maps["tiny"][0, 1].numpy(), maps["plain"])):
        low, high = ax.images[0].get_clim()
        assert low == -high == pytest.approx(-np.abs(value).max())  # its own scale, white at 0
        assert ax.images[0].get_cmap().name == "RdBu_r"
    assert len(fig.axes) == 2 * len(maps)  # a colour bar per panel
    plt.close(fig)
    with pytest.raises(UserError, match="has shape"):
        plot_feature_maps({"bad": np.zeros(5)})

"""Figures for the notebooks and the run folders: confusion matrices, learning curves, ROC curves, bar charts.

Introduced in ``notebooks/04_train_cross_validation.ipynb`` (learning curves),
``notebooks/05_evaluate_confusion_matrices.ipynb`` (confusion matrices and ROC curves; the reliability diagram
came later, with the calibration metrics) and
``notebooks/06_compare_baselines.ipynb`` (per-class bar chart comparing models with the paper's Table 2).

Every function returns the matplotlib :class:`~matplotlib.figure.Figure` and, when ``out`` is given, also
saves it there (PNG or whatever the suffix says), creating parent folders. Nothing here calls ``plt.show``;
callers close figures with ``plt.close(fig)``. Importing this module selects the non-interactive Agg
backend only when no backend has been chosen (no ``MPLBACKEND``, nothing set in rcParams), so scripts on
headless machines work and notebooks keep their inline backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd


def _backend_is_set() -> bool:
    if os.environ.get("MPLBACKEND"):
        return True
    getter = getattr(matplotlib.rcParams, "_get_backend_or_none", None)
    if getter is not None:
        return getter() is not None
    from matplotlib import rcsetup

    return dict.__getitem__(matplotlib.rcParams, "backend") is not getattr(rcsetup, "_auto_backend_sentinel", None)


if not _backend_is_set():
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from ussf_lib.errors import UserError  # noqa: E402
from ussf_lib.files import writing  # noqa: E402
from ussf_lib.evaluation.metrics import (ECE_BINS, _frame_to_arrays, confidence_bins,  # noqa: E402
                                         expected_calibration_error, top_label_confidence)

PathLike = str | os.PathLike


def save_figure(fig: Figure, out: PathLike | None) -> None:
    """Save ``fig`` to ``out`` (any suffix matplotlib knows), creating parent folders; ``None`` saves nothing."""
    if out is None:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole (temporary file, then renamed); a refused write is one line naming the figure.
    with writing(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".").lower() or None)


def _check_cm(cm: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    arr = np.asarray(cm)
    n = len(classes)
    if arr.ndim != 2 or arr.shape != (n, n):
        raise UserError(f"confusion matrix has shape {arr.shape} but there are {n} classes; "
                        f"pass an ({n}, {n}) matrix with rows = true classes")
    return arr


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    """Rows divided by their sums; a row with no samples stays all zeros."""
    cm = np.asarray(cm, dtype=float)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def plot_confusion(
    cm: np.ndarray,
    classes: Sequence[str],
    normalize: bool = False,
    title: str | None = None,
    ax: Axes | None = None,
    out: PathLike | None = None,
    vmax: float | None = None,
) -> Figure:
    """Heatmap of a confusion matrix (rows = true, columns = predicted), each cell annotated.

    Counts are annotated as integers; with ``normalize=True`` each row is divided by its sum (the per-class
    sensitivity sits on the diagonal) and annotated with two decimals; a class with no samples shows zeros.
    ``vmax`` fixes the top of the count scale (panels meant to be compared share it; fractions always end at 1).
    Draws on ``ax`` when given, else on a new figure. Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    classes = [str(c) for c in classes]
    arr = _check_cm(cm, classes)
    if ax is None:
        size = max(4.0, 0.9 * len(classes) + 2.0)
        fig, ax = plt.subplots(figsize=(size + 1.0, size))
    else:
        fig = ax.figure
    if normalize:
        data, fmt, vmax = _row_normalise(arr), ".2f", 1.0
    else:
        data, fmt = np.asarray(arr).astype(np.int64), "d"
    sns.heatmap(
        data, annot=True, fmt=fmt, cmap="Blues", vmin=0.0, vmax=vmax, square=True, cbar=True,
        cbar_kws={"label": "fraction of the true class" if normalize else "images"},
        xticklabels=classes, yticklabels=classes, ax=ax,
    )
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title if title is not None else ("Confusion matrix (row-normalized)" if normalize
                                                  else "Confusion matrix (counts)"))
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    save_figure(fig, out)
    return fig


def plot_confusion_pair(
    cm: np.ndarray, classes: Sequence[str], title: str | None = None, out: PathLike | None = None
) -> Figure:
    """Counts and row-normalized confusion matrices side by side; ``title`` goes above both.

    Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    classes = [str(c) for c in classes]
    _check_cm(cm, classes)
    size = max(4.0, 0.9 * len(classes) + 2.0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(2 * size + 2.0, size))
    plot_confusion(cm, classes, normalize=False, title="Counts", ax=left)
    plot_confusion(cm, classes, normalize=True, title="Row-normalized", ax=right)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_fold_confusions(per_fold: Mapping[int | str, np.ndarray], classes: Sequence[str], title: str | None = None,
                         out: PathLike | None = None) -> Figure:
    """One row per fold: counts (one colour scale for every fold, so equal shades are equal counts) beside the
    row-normalized matrix. Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``."""
    if not per_fold:
        raise UserError("no folds to plot; pass {fold: confusion matrix}")
    top = max(float(np.max(cm)) for cm in per_fold.values()) or 1.0
    size = max(4.0, 0.9 * len(classes) + 2.0)
    fig, axes = plt.subplots(len(per_fold), 2, figsize=(2 * size + 2.0, size * len(per_fold) + 0.4), squeeze=False)
    for row, (fold, cm) in zip(axes, per_fold.items()):
        plot_confusion(cm, classes, title=f"fold {fold}: counts", ax=row[0], vmax=top)
        plot_confusion(cm, classes, normalize=True, title=f"fold {fold}: row-normalized", ax=row[1])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


_HISTORY_REQUIRED = ("epoch", "train_loss", "train_acc")


def plot_learning_curves(histories: Mapping[int | str, pd.DataFrame], out: PathLike | None = None) -> Figure:
    """Loss and accuracy per epoch, one colour per fold: solid = train, dashed = the fold's test images.

    Each history has columns ``epoch``, ``train_loss``, ``train_acc`` and optionally ``val_loss``,
    ``val_acc``; each panel gets one line per fold and series present. Epochs without a validation figure
    (``--eval-every N``) are left out of the validation line, which then marks its points.
    Introduced in ``notebooks/04_train_cross_validation.ipynb``.
    """
    if not histories:
        raise UserError("no training histories to plot; pass {fold: history DataFrame}")
    for fold, hist in histories.items():
        missing = [c for c in _HISTORY_REQUIRED if c not in getattr(hist, "columns", [])]
        if missing:
            raise UserError(f"history of fold {fold} lacks column(s) {missing}; a history has "
                            "epoch, train_loss, train_acc and optionally val_loss, val_acc")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    palette = sns.color_palette(n_colors=max(len(histories), 1))
    # With few epochs a line is a few points (one epoch: a single point, invisible without a marker).
    few = max((len(h) for h in histories.values()), default=0) <= 20
    for color, (fold, hist) in zip(palette, histories.items()):
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(hist["epoch"], hist[f"train_{metric}"], color=color, linestyle="-",
                    marker="o" if few else None, markersize=4, label=f"fold {fold} train")
            if f"val_{metric}" in hist.columns:
                # A run made with --eval-every N has validation figures on some epochs only.
                val = hist[["epoch", f"val_{metric}"]].dropna()
                ax.plot(val["epoch"], val[f"val_{metric}"], color=color, linestyle="--",
                        marker="s" if few or len(val) < len(hist) else None, markersize=4,
                        markerfacecolor="none", label=f"fold {fold} val")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy")
    epochs = sorted({int(e) for hist in histories.values() for e in hist["epoch"]})
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        whole_number_ticks(ax.xaxis, epochs)
    # One legend beside both panels (colour = fold, line style = part), so no curve is hidden under it.
    handles = [Line2D([], [], color=c, label=f"fold {fold}") for c, fold in zip(palette, histories)]
    handles += [Line2D([], [], color="0.3", linestyle="-", marker="o" if few else None, label="train"),
                Line2D([], [], color="0.3", linestyle="--", marker="s" if few else None, markerfacecolor="none",
                       label="test (val_* columns)")]
    fig.tight_layout(rect=(0.0, 0.0, 0.84, 1.0))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.845, 0.5), fontsize="small", frameon=False)
    save_figure(fig, out)
    return fig


def plot_feature_maps(maps: Mapping[str, Any], channel: int = 0, out: PathLike | None = None) -> Figure:
    """One panel per named feature map, each on its own colour scale symmetric about 0, with its colour bar.

    A map is a tensor or array ``(B, C, H, W)`` (the first image's ``channel`` is drawn) or ``(H, W)``. Feature
    maps are signed, hence a diverging colour map with white at 0; their amplitudes differ by orders of magnitude
    between branches, so a shared scale would hide the small ones, and each bar gives its panel's values.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    if not maps:
        raise UserError("no feature maps to plot; pass {name: tensor (B, C, H, W) or array (H, W)}")
    fig, axes = plt.subplots(1, len(maps), figsize=(3.3 * len(maps), 3.2), squeeze=False, layout="constrained")
    for ax, (name, value) in zip(axes[0], maps.items()):
        arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=np.float64)
        if arr.ndim == 4:
            arr = arr[0, channel]
        if arr.ndim != 2:
            raise UserError(f"feature map {name!r} has shape {arr.shape}; pass (B, C, H, W) or (H, W)")
        spread = float(np.abs(arr).max()) or 1.0
        shown = ax.imshow(arr, cmap="RdBu_r", vmin=-spread, vmax=spread)
        ax.set_title(f"{name}, channel {channel}", fontsize="small")
        ax.axis("off")
        fig.colorbar(shown, ax=ax, shrink=0.8)
    save_figure(fig, out)
    return fig


def whole_number_ticks(axis, values: Sequence[int] = ()) -> None:
    """Ticks at whole numbers only (epochs, counts): at each of a few ``values``, else where matplotlib's
    integer locator puts them (which alone falls back to fractions when the view holds fewer than two)."""
    if 0 < len(values) <= 12:
        axis.set_ticks(list(values))
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def plot_roc(pred: pd.DataFrame, classes: Sequence[str], out: PathLike | None = None) -> Figure:
    """One-vs-rest ROC curve per class from a predictions table (``label``, ``prob_<class>``).

    All rows are pooled (e.g. the out-of-fold predictions of every fold), and the title says so: the legend's AUC
    per class (three decimals) is that of the pooled rows, which differs from the mean of the per-fold AUCs the
    run's tables give. A class with no positives or no negatives has no curve and is listed as ``AUC n/a``.
    Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    classes = [str(c) for c in classes]
    y_true, probs = _frame_to_arrays(pred, classes)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    palette = sns.color_palette(n_colors=len(classes))
    for k, (cls, color) in enumerate(zip(classes, palette)):
        positives = y_true == k
        if 0 < positives.sum() < positives.size:
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            auc = roc_auc_score(positives, probs[:, k])
            ax.plot(fpr, tpr, color=color, label=f"{cls} (AUC = {auc:.3f})")
        else:
            ax.plot([], [], color=color, label=f"{cls} (AUC n/a)")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    # A little beyond [0, 1], so curves running along an edge are not hidden under the frame.
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="False positive rate (1 - specificity)",
           ylabel="True positive rate (sensitivity)", title="One-vs-rest ROC, all predictions pooled")
    # Beside the axes: a weak model's curves run through the lower right, where a legend would sit on them.
    ax.legend(title="pooled AUC (tables: mean over folds)", title_fontsize="small", fontsize="small",
              loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_calibration(pred: pd.DataFrame, classes: Sequence[str], n_bins: int = ECE_BINS,
                     out: PathLike | None = None) -> Figure:
    """Reliability diagram of the top-class probability, with the histogram of those confidences beneath.

    All rows of the predictions table (``label``, ``prob_<class>``) are pooled, e.g. every fold's out-of-fold
    predictions. Top: accuracy against mean confidence in each non-empty bin of ``n_bins`` equal-width bins
    (:func:`sklearn.calibration.calibration_curve` on top-class confidence vs correctness; points under the
    diagonal are over-confident), the pooled ECE in the title (the tables give the mean of the per-fold ECEs).
    Bottom: how many predictions fall in each bin, on the same bins.
    """
    classes = [str(c) for c in classes]
    y_true, probs = _frame_to_arrays(pred, classes)
    confidence, correct = top_label_confidence(y_true, probs)
    accuracy, mean_conf = calibration_curve(correct.astype(int), confidence, n_bins=n_bins, strategy="uniform",
                                            pos_label=1)
    ece = expected_calibration_error(y_true, probs, n_bins)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.0, 7.0), sharex=True,
                                      gridspec_kw={"height_ratios": (3, 1.2)})
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    top.plot(mean_conf, accuracy, color="C0", marker="o", markersize=5,
             label=f"model ({len(confidence)} predictions, {n_bins} bins)")
    top.vlines(mean_conf, np.minimum(mean_conf, accuracy), np.maximum(mean_conf, accuracy), color="C3",
               alpha=0.6, linewidth=2, label="gap (accuracy - confidence)")
    top.set(xlim=(0.0, 1.0), ylim=(-0.01, 1.01), ylabel="accuracy in the bin",
            title=f"Reliability of the top-class probability, all predictions pooled\n(pooled ECE = {ece:.3f}; "
                  "tables: mean over folds)")
    top.legend(loc="upper left", fontsize="small", frameon=False)
    top.grid(alpha=0.3)
    counts = np.bincount(confidence_bins(confidence, n_bins), minlength=n_bins)
    bottom.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="C0", alpha=0.7, edgecolor="white")
    bottom.axvline(float(confidence.mean()), color="C1", linestyle="--", linewidth=1.2,
                   label=f"mean confidence {confidence.mean():.3f}")
    bottom.axvline(float(correct.mean()), color="C2", linestyle="-", linewidth=1.2,
                   label=f"accuracy {correct.mean():.3f}")
    bottom.set(xlabel="top-class probability (confidence)", ylabel="predictions")
    whole_number_ticks(bottom.yaxis)
    bottom.legend(loc="upper left", fontsize="small", frameon=False)
    bottom.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_per_class_bars(
    table: pd.DataFrame,
    metric_cols: Sequence[str] = ("precision", "sensitivity", "specificity", "f1"),
    hue: str = "model",
    out: PathLike | None = None,
) -> Figure:
    """Grouped bar chart, one panel per metric: classes on the x axis, one bar per ``hue`` value.

    ``table`` is long-format with columns ``hue`` (default ``model``), ``class`` and ``<metric>_mean`` for each
    metric in ``metric_cols``; ``<metric>_std`` (optional) becomes error bars. Values are plotted as given
    (fractions or percent; do not mix). Class and hue order follow first appearance in the table. A metric
    missing for some rows (NaN, e.g. F1 absent from the paper's table) leaves those bars out, marked "n/a" (a zero
    is marked "0").
    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise UserError("per-class table is empty; pass rows of model, class, <metric>_mean")
    metric_cols = list(metric_cols)
    if not metric_cols:
        raise UserError("metric_cols is empty; name at least one metric, e.g. ('precision',)")
    needed = [hue, "class", *[f"{m}_mean" for m in metric_cols]]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise UserError(f"per-class table lacks column(s) {missing}; it needs {needed} "
                        f"(add a {hue!r} column to tell the bar groups apart)")
    classes = list(dict.fromkeys(table["class"].astype(str)))
    levels = list(dict.fromkeys(table[hue].astype(str)))
    keyed = table.assign(_cls=table["class"].astype(str), _hue=table[hue].astype(str))
    keyed = keyed.drop_duplicates(["_hue", "_cls"], keep="last").set_index(["_hue", "_cls"])

    n = len(metric_cols)
    ncols = min(n, 2)
    nrows = int(np.ceil(n / ncols))
    # Metrics are bounded (1, or 100 in percent): error bars stop at the bounds, panels share one scale.
    means = keyed[[f"{m}_mean" for m in metric_cols]].to_numpy(dtype=float)
    top = 100.0 if np.nanmax(np.abs(means), initial=0.0) > 1.0 else 1.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.0 * nrows), squeeze=False, sharey=True)
    palette = sns.color_palette(n_colors=len(levels))
    width = 0.8 / len(levels)
    x = np.arange(len(classes))
    for i, metric in enumerate(metric_cols):
        ax = axes.flat[i]
        for j, (level, color) in enumerate(zip(levels, palette)):
            idx = [(level, c) for c in classes]
            sub = keyed.reindex(idx)
            heights = sub[f"{metric}_mean"].to_numpy(dtype=float)
            err = sub[f"{metric}_std"].to_numpy(dtype=float) if f"{metric}_std" in sub.columns else None
            keep = np.isfinite(heights)
            if err is not None:
                err = np.where(np.isfinite(err), err, 0.0)[keep]
                err = np.vstack([np.minimum(err, heights[keep]), np.minimum(err, top - heights[keep])])
            offset = (j - (len(levels) - 1) / 2) * width
            # Reported figures (e.g. "densenet121 (paper)", from other data) are hatched, not another model's colour.
            reported = level.endswith("(paper)")
            ax.bar(x[keep] + offset, heights[keep], width=width, yerr=err, capsize=2, label=level,
                   color="white" if reported else color, edgecolor=color, hatch="///" if reported else None)
            # A missing value and a zero both leave no bar: say which.
            for xi, h in zip(x + offset, heights):
                if not np.isfinite(h) or h == 0:
                    ax.text(xi, 0.01 * top, "n/a" if not np.isfinite(h) else "0", rotation=90, ha="center",
                            va="bottom", fontsize="x-small", color=color)
        ax.set_xticks(x, classes)
        ax.set_title(metric)
        spread = " ± std" if f"{metric}_std" in keyed.columns else ""
        ax.set_ylabel(f"mean{spread} over folds" + (" (%)" if top == 100.0 else " (fraction)"))
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0.0, top * 1.02)
        ax.yaxis.set_tick_params(labelleft=True)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.94))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title=hue, fontsize="small", loc="upper center", ncol=min(len(levels), 6),
               frameon=False)  # above the panels, covering no bar
    save_figure(fig, out)
    return fig

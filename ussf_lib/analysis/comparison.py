"""Show results honestly beside the paper's: its figures left out of toy runs or labelled; bars in the tables' units.

Introduced in ``notebooks/04_train_cross_validation.ipynb`` (:func:`paper_view`); the bar chart in
``notebooks/06_compare_baselines.ipynb``. The comparison's own ``per_class_bars.png``
(:func:`ussf_lib.evaluation.plots.plot_per_class_bars`) draws fractions and stops error bars at 0 and 1; here
the bars are in percent, as the markdown tables print them, an error bar of ``mean ± std`` is drawn whole (a
whisker past 100 % says the folds disagree, not that a metric exceeded 100 %), and the paper's figures, which
come from 3,392 real images at 224 px after 150 epochs, are either left out or labelled as such on the figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ussf_lib.paper import PAPER_DATASET, TABLE2_METRICS

#: The protocol behind every figure the paper reports (section 2.4).
PAPER_SCALE = {"image_size": 224, "epochs": 150}
#: Where the paper's figures come from, in a few words.
PAPER_SOURCE = (f"{PAPER_DATASET['images']:,} real patient images, {PAPER_SCALE['image_size']} px, "
                f"{PAPER_SCALE['epochs']} epochs")
#: How the paper's figures are labelled wherever they appear beside a run's.
PAPER_LABEL = f"paper: {PAPER_SOURCE}"


def at_paper_scale(image_size: int, epochs: int) -> bool:
    """True when a run uses the paper's image size and epochs, the least for its figures to sit beside it.
    Introduced in ``notebooks/06_compare_baselines.ipynb`` (:func:`paper_view` uses it from notebook 04 on)."""
    return image_size >= PAPER_SCALE["image_size"] and epochs >= PAPER_SCALE["epochs"]


def paper_view(table: pd.DataFrame, image_size: int, epochs: int, log=print) -> pd.DataFrame:
    """``table`` (a run's results or Table 2 beside the paper) as a notebook shows it: a run at the paper's scale
    (:func:`at_paper_scale`) keeps the paper's columns, renamed to say where they come from
    (:data:`PAPER_LABEL`); a smaller run loses them, and ``log`` says why in one line. Introduced in
    ``notebooks/04_train_cross_validation.ipynb``."""
    paper = [c for c in table.columns if str(c).startswith("paper")]
    if not paper:
        return table
    if at_paper_scale(image_size, epochs):
        return table.rename(columns={c: f"{c} [{PAPER_LABEL}]" for c in paper})
    log(f"The paper's columns are left out: this run is {image_size} px and {epochs} epoch(s); the paper's "
        f"figures come from {PAPER_SOURCE} (notebook 06 prints them, labelled).")
    return table.drop(columns=paper)


def without_paper(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (Table 1 or 2 layout) with its ``paper_*`` columns emptied, so the markdown tables leave them out.
    Introduced in ``notebooks/06_compare_baselines.ipynb``."""
    return table.assign(**{c: math.nan for c in table.columns if c.startswith("paper_")})


def per_class_percent(t2: pd.DataFrame, include_paper: bool = False,
                      metrics: Sequence[str] = TABLE2_METRICS) -> pd.DataFrame:
    """Table 2 in the long layout of the bar chart, in percent: ``model, class, <metric>_mean, <metric>_std``; with
    ``include_paper`` the paper's rows too, as ``"<model> (<PAPER_LABEL>)"``. Introduced in
    ``notebooks/06_compare_baselines.ipynb``."""
    cols = [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    frames = [t2[["model", "class"]].assign(**{c: 100.0 * t2[c] for c in cols})]
    if include_paper and "paper_precision_mean" in t2:
        paper = t2.dropna(subset=["paper_precision_mean"])
        frames.append(paper[["model", "class"]].assign(
            model=paper["model"] + f" ({PAPER_LABEL})",
            **{c: 100.0 * paper.get(f"paper_{c}", pd.Series(math.nan, index=paper.index)) for c in cols}))
    return pd.concat(frames, ignore_index=True)


def plot_per_class_percent(long: pd.DataFrame, metrics: Sequence[str] = TABLE2_METRICS, title: str = "", out=None):
    """Grouped bars per class, one panel per metric, in percent; error bars ``± std`` over folds drawn whole (the
    axis grows to show them; the dashed line is 100 %); the paper's rows (labelled by :func:`per_class_percent`)
    hatched. Returns the figure. Introduced in ``notebooks/06_compare_baselines.ipynb``."""
    import matplotlib.pyplot as plt

    from ussf_lib.evaluation.plots import save_figure

    classes = list(dict.fromkeys(long["class"]))
    models = list(dict.fromkeys(long["model"]))
    ncols = min(len(metrics), 2)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 3.8 * nrows), squeeze=False, sharey=True,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width, x = 0.8 / len(models), np.arange(len(classes))
    keyed = long.set_index(["model", "class"])
    low, high = 0.0, 100.0
    for ax, metric in zip(axes.flat, metrics):
        for j, model in enumerate(models):
            rows = keyed.reindex([(model, c) for c in classes])
            mean, std = rows[f"{metric}_mean"].to_numpy(float), rows[f"{metric}_std"].to_numpy(float)
            paper, color = PAPER_LABEL in model, colors[j % len(colors)]
            ax.bar(x + (j - (len(models) - 1) / 2) * width, mean, width, yerr=np.nan_to_num(std), capsize=2,
                   label=model, color="white" if paper else color, edgecolor=color, hatch="///" if paper else None)
            ends = np.concatenate([mean - np.nan_to_num(std), mean + np.nan_to_num(std)])
            if np.isfinite(ends).any():
                low, high = min(low, float(np.nanmin(ends))), max(high, float(np.nanmax(ends)))
        ax.axhline(100, color="0.4", linestyle="--", linewidth=0.8)
        ax.set_xticks(x, classes)
        ax.set_title(metric)
        ax.set_ylabel("% (mean ± std over folds)")
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    axes.flat[0].set_ylim(low - 2, high + 2)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(models), 3), fontsize="small")
    fig.suptitle(title or "Per-class metrics; whiskers past 100 % or below 0 % show the folds' spread")
    save_figure(fig, out)
    return fig

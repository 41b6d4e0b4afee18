"""Figures of ``ussf explain``: a CAM overlay per image, and the Conv-FFT frequency view.

As in :mod:`ussf_lib.evaluation.plots` (whose backend choice and :func:`save_figure` this reuses), every function
returns the :class:`~matplotlib.figure.Figure` and saves it when ``out`` is given; callers close it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ussf_lib.errors import UserError
from ussf_lib.evaluation.plots import PathLike, plt, save_figure  # importing plots picks Agg when nothing is set
from matplotlib.figure import Figure


def plot_cam_overlay(image: np.ndarray, cam: np.ndarray, title: str = "", out: PathLike | None = None,
                     alpha: float = 0.45) -> Figure:
    """The image (uint8 ``(H, W, 3)`` or float in [0, 1]) and, beside it, the same image under the CAM
    ``(H, W)`` in [0, 1] (jet colour map, ``alpha`` opaque) with its colour bar."""
    img = np.asarray(image)
    img = img.astype(np.float64) / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)
    heat = np.asarray(cam, dtype=np.float64)
    if img.ndim != 3 or heat.shape != img.shape[:2]:
        raise UserError(f"CAM of shape {heat.shape} does not fit an image of shape {img.shape}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.6), layout="constrained")
    left.imshow(np.clip(img, 0, 1), interpolation="nearest")
    left.set_title("input", fontsize="small")
    right.imshow(np.clip(img, 0, 1), interpolation="nearest")
    shown = right.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
    right.set_title("CAM (1 = this image's maximum)", fontsize="small")
    for ax in (left, right):
        ax.axis("off")
    fig.colorbar(shown, ax=right, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize="small")
    save_figure(fig, out)
    return fig


def _block_label(row: pd.Series) -> str:
    return f"s{row['stage']}.b{row['block']}" if row["stage"] else str(row["name"])


def plot_frequency_view(shares: pd.DataFrame, response: pd.DataFrame, title: str = "",
                        out: PathLike | None = None) -> Figure:
    """Left: stacked bars of each Conv-FFT block's identity / spatial / frequency energy shares. Right: the
    frequency branch's radial gain per block (one curve each, coloured by stage; log scale, 1 = unchanged).

    ``shares`` and ``response`` are the two tables of :func:`ussf_lib.explain.frequency.analyse_blocks`.
    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    if shares.empty or response.empty:
        raise UserError("no Conv-FFT blocks to draw; pass the tables of analyse_blocks for a US-SFNet")
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12.0, 4.4), layout="constrained",
                                       gridspec_kw={"width_ratios": [max(4, len(shares)) / 4, 2.2]})
    labels = [_block_label(r) for _, r in shares.iterrows()]
    pos = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for branch, colour in zip(("identity", "spatial", "frequency"), ("0.65", "tab:blue", "tab:orange")):
        values = shares[f"share_{branch}"].to_numpy(dtype=float)
        bars.bar(pos, values, bottom=bottom, color=colour, label=branch, width=0.8)
        bottom += values
    bars.set_xticks(pos, labels, rotation=90 if len(pos) > 8 else 0, fontsize="small")
    bars.set_ylim(0, 1)
    bars.set_ylabel("share of summed branch energy")
    bars.set_title("branch energy per block", fontsize="small")
    bars.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)

    stages = sorted(response["stage"].unique())
    cmap = plt.get_cmap("viridis")
    colour = {s: cmap(i / max(1, len(stages) - 1)) for i, s in enumerate(stages)}
    positive = []
    for (name, stage, block), rows in response.groupby(["name", "stage", "block"], sort=False):
        rows = rows[np.isfinite(rows["gain"].to_numpy(dtype=float)) & (rows["gain"] > 0)]
        if rows.empty:
            continue
        positive.append(rows["gain"].to_numpy(dtype=float))
        curves.plot(rows["radius"], rows["gain"], marker="o", markersize=3, color=colour[stage], alpha=0.85,
                    label=f"s{stage}.b{block}" if stage else name)
    curves.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    if positive:
        curves.set_yscale("log")
    curves.set_xlim(0, 0.5)
    curves.set_xlabel("spatial frequency radius (cycles/pixel of the block's map)")
    curves.set_ylabel("gain: sqrt(output / input power)")
    curves.set_title("frequency branch: radial gain (> 1 amplifies, < 1 suppresses)", fontsize="small")
    curves.legend(fontsize="x-small", ncol=2 if len(shares) > 8 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  frameon=False)
    if title:
        fig.suptitle(title, fontsize="medium")
    save_figure(fig, out)
    return fig


def plot_cam_grid(images: np.ndarray, cams: np.ndarray, titles: list[str] | None = None, columns: int = 3,
                  out: PathLike | None = None, alpha: float = 0.45) -> Figure:
    """Several images under their CAMs, ``columns`` to a row (jet colour map, each map scaled to its own
    maximum, as in :func:`plot_cam_overlay`), with a title per panel.

    Introduced in ``notebooks/07_explain_predictions.ipynb``.
    """
    images, cams = np.asarray(images), np.asarray(cams, dtype=np.float64)
    if len(images) == 0 or images.shape[:3] != cams.shape:
        raise UserError(f"{len(cams)} CAM(s) of shape {cams.shape[1:]} do not fit {len(images)} image(s) of shape "
                        f"{images.shape[1:]}")
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.3 * rows), layout="constrained", squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= len(images):
            continue
        img = images[k].astype(np.float64) / 255.0 if images[k].dtype == np.uint8 else images[k]
        ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
        ax.imshow(cams[k], cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
        if titles:
            ax.set_title(titles[k], fontsize="x-small")
    save_figure(fig, out)
    return fig

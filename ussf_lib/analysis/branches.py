"""Measure what the two branches of a Conv-FFT block can see, instead of asserting it.

Introduced in ``notebooks/03_build_conv_fft_block.ipynb``:

* :func:`receptive_field`: the gradient of one output pixel with respect to every input pixel. A pixel whose
  gradient is zero cannot change that output, so the non-zero pixels *are* the receptive field: 3x3 = 9 pixels
  for the spatial branch (point-wise, 3x3, point-wise convolutions), every pixel of the image for the frequency
  branch (each Fourier coefficient depends on all pixels, and each output pixel on all coefficients).
* :func:`shift_errors`: circular shift equivariance, ``f(roll(x)) == roll(f(x))``. Convolutions in pixel space
  commute with shifts (up to the zero padding at the border, left out by ``margin``); the frequency branch does
  not, because a shift multiplies the spectrum by a phase ramp that its 3x3 convolutions over neighbouring
  frequencies (and over real and imaginary parts) do not commute with.
* :func:`block_maps`: a block's input and its branch outputs inside a (trained) network, from a forward hook.
* :func:`run_ablation`: the model and its ``_nofreq`` / ``_nofft`` ablations on identical folds, and what the
  trained ones do (:func:`load_trained`, :func:`frequency_shares`).

Modules are measured in eval mode: in training mode BatchNorm normalizes with the batch's own statistics, which
mixes every pixel into every output and would hide the receptive field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ussf_lib.errors import UserError

Branch = Callable[[Tensor], Tensor]


def receptive_field(branch: Branch, x: Tensor, pixel: tuple[int, int] | None = None, channel: int = 0) -> np.ndarray:
    """``|d branch(x)[0, channel, i, j] / d x|`` summed over input channels: an ``(H, W)`` array, zero exactly where
    an input pixel cannot change output pixel ``pixel = (i, j)`` (default: the centre). Introduced in
    ``notebooks/03_build_conv_fft_block.ipynb``."""
    x = x.detach()[:1].clone().requires_grad_(True)
    height, width = x.shape[-2:]
    i, j = pixel if pixel is not None else (height // 2, width // 2)
    if not (0 <= i < height and 0 <= j < width):
        raise UserError(f"pixel {(i, j)} lies outside the {height}x{width} map")
    branch(x)[0, channel, i, j].backward()
    return x.grad[0].abs().sum(0).double().cpu().numpy()


def receptive_field_table(fields: Mapping[str, np.ndarray], pixel: tuple[int, int], window: int = 3) -> pd.DataFrame:
    """One row per branch: input pixels with a non-zero gradient, of how many, and the share of the gradient's
    total magnitude that comes from outside the ``window x window`` square around ``pixel``. Introduced in
    ``notebooks/03_build_conv_fft_block.ipynb``."""
    rows = []
    for name, field in fields.items():
        inside = np.zeros(field.shape, bool)
        r = window // 2
        inside[max(0, pixel[0] - r):pixel[0] + r + 1, max(0, pixel[1] - r):pixel[1] + r + 1] = True
        total = float(field.sum())
        rows.append({"branch": name, "input pixels that reach it": int((field > 0).sum()), "of": field.size,
                     f"gradient share outside the {window}x{window} window": float(field[~inside].sum() / total)
                     if total > 0 else float("nan")})
    return pd.DataFrame(rows)


def plot_receptive_fields(fields: Mapping[str, np.ndarray], pixel: tuple[int, int], out=None):
    """One panel per branch: ``log10 |gradient|`` over the input, the output pixel marked, zeros white.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    import matplotlib.pyplot as plt

    from ussf_lib.evaluation.plots import save_figure

    fig, axes = plt.subplots(1, len(fields), figsize=(3.6 * len(fields), 3.4), squeeze=False, layout="constrained")
    for ax, (name, field) in zip(axes[0], fields.items()):
        shown = np.where(field > 0, np.log10(np.where(field > 0, field, 1.0)), np.nan)
        image = ax.imshow(shown, cmap="viridis")
        ax.plot(pixel[1], pixel[0], marker="s", markersize=6, markerfacecolor="none", markeredgecolor="red")
        ax.set_title(f"{name}: {int((field > 0).sum())} of {field.size} pixels", fontsize="small")
        ax.axis("off")
        fig.colorbar(image, ax=ax, shrink=0.8, label="log10 |gradient| (white: 0)")
    save_figure(fig, out)
    return fig


def _away_from_seams(size: int, shift: int, margin: int) -> np.ndarray:
    """Positions along one axis at least ``margin`` away from the border and from where ``roll`` wraps."""
    keep = np.ones(size, bool)
    if margin > 0:
        keep[:margin] = keep[size - margin:] = False
        keep[(shift % size + np.arange(-margin, margin)) % size] = False
    return keep


def shift_error(branch: Branch, x: Tensor, shift: tuple[int, int], margin: int = 0) -> float:
    """``||branch(roll(x)) - roll(branch(x))|| / ||branch(x)||`` for a circular shift by ``shift = (rows,
    columns)``, over the pixels at least ``margin`` away from the image border and from the seam where the roll
    wraps (zero padding makes any convolution differ there). 0 means shift-equivariant. Introduced in
    ``notebooks/03_build_conv_fft_block.ipynb``."""
    with torch.no_grad():
        y = branch(x)
        shifted = branch(torch.roll(x, shifts=shift, dims=(-2, -1)))
        expected = torch.roll(y, shifts=shift, dims=(-2, -1))
    rows = torch.from_numpy(_away_from_seams(y.shape[-2], shift[0], margin)).to(y.device)
    cols = torch.from_numpy(_away_from_seams(y.shape[-1], shift[1], margin)).to(y.device)
    keep = rows[:, None] & cols[None, :]
    diff = (shifted - expected)[..., keep]
    return float(diff.norm() / expected[..., keep].norm())


def shift_errors(branches: Mapping[str, Branch], x: Tensor, shift: tuple[int, int], margin: int = 1) -> pd.DataFrame:
    """:func:`shift_error` of each branch over the whole image and away from border and seam (``margin``).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    return pd.DataFrame([{"branch": name, "relative error, whole image": shift_error(fn, x, shift, 0),
                          f"relative error, {margin} px from border and seam": shift_error(fn, x, shift, margin)}
                         for name, fn in branches.items()])


def block_maps(model: nn.Module, x: Tensor, stage: int = 0, block: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """The Conv-FFT block ``model.stages[stage][block]`` and, for input batch ``x``, its input and its three
    terms: ``{"block input": s, "spatial(s)": ..., "freq(s)": ..., "GELU(sum)": ...}`` (model in eval mode).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    target = model.stages[stage][block]
    seen: dict[str, Tensor] = {}
    handle = target.register_forward_pre_hook(lambda module, inputs: seen.setdefault("input", inputs[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            model(x)
            s = seen["input"]
            maps = {"block input": s, "spatial(s)": target.spatial(s), "freq(s)": target.freq(s), "GELU(sum)": target(s)}
    finally:
        handle.remove()
    return target, maps


def strongest_channel(feature_map: Tensor) -> int:
    """The channel of a ``(B, C, H, W)`` map with the most energy in the first image (the one worth drawing).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    return int(feature_map[0].detach().double().square().sum(dim=(-2, -1)).argmax())


# --------------------------------------------------------------------------------------------- the ablation


def ablation_models(model: str) -> list[str]:
    """``model`` and its two frequency ablations in the registry: ``<model>_nofreq`` (no frequency branch) and
    ``<model>_nofft`` (the branch's convolutions on pixels, no Fourier transform). Introduced in
    ``notebooks/03_build_conv_fft_block.ipynb``."""
    return [model, f"{model}_nofreq", f"{model}_nofft"]


def run_ablation(model: str, data: Any, out: str | Path, *, folds: int, epochs: int, image_size: int,
                 batch_size: int, seed: int, progress: bool = False) -> Path:
    """Cross-validate :func:`ablation_models` on identical folds (:func:`ussf_lib.training.compare.compare`, one
    ``splits.csv``) on ``data`` (a :class:`~ussf_lib.nbrun.helpers.NotebookData`) into ``out``, quietly; a
    finished comparison with the same settings is reused, one with others replaced. Returns ``out``.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    from ussf_lib.training.compare import compare
    from ussf_lib.training.experiment import CVConfig

    cfg = CVConfig(**data.cv_kwargs, folds=folds, epochs=epochs, image_size=image_size, batch_size=batch_size,
                   seed=seed, progress=progress)
    return compare(ablation_models(model), cfg, out, log=lambda line: None, replace_changed=True)


def ablation_markdown(cmp_dir: str | Path) -> str:
    """The ablation's Table 1 (mean ± std over folds, %) and its paired tests, as markdown; the paper's
    accuracy column is left out (the ablations are not the paper's models). Introduced in
    ``notebooks/03_build_conv_fft_block.ipynb``."""
    from ussf_lib.evaluation.tables import paired_markdown, table1_markdown

    cmp_dir = Path(cmp_dir)
    t1 = pd.read_csv(cmp_dir / "table1.csv").assign(paper_accuracy_mean=np.nan, paper_accuracy_std=np.nan)
    return table1_markdown(t1) + "\n\n" + paired_markdown(pd.read_csv(cmp_dir / "paired.csv"))


def load_trained(cmp_dir: str | Path, model: str, fold: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The ``fold``'s trained ``model`` of a comparison (its ``checkpoint.pt``), in eval mode on the CPU, and
    its metadata. Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    from ussf_lib.training.checkpoints import load_checkpoint

    return load_checkpoint(Path(cmp_dir) / model / "folds" / str(fold) / "checkpoint.pt", expect_model=model)


def frequency_shares(models: Mapping[str, nn.Module], batch: Tensor) -> pd.DataFrame:
    """Per Conv-FFT block (rows) and model (columns): the frequency branch's share of the energy the block sums,
    ``||freq(x)||^2 / (||x||^2 + ||spatial(x)||^2 + ||freq(x)||^2)`` averaged over ``batch``
    (:func:`ussf_lib.explain.frequency.analyse_blocks`, as ``ussf explain --frequency`` reports it).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    from ussf_lib.explain.frequency import analyse_blocks

    return pd.DataFrame({name: analyse_blocks(m, [batch])[0].set_index("name")["share_frequency"]
                         for name, m in models.items()})

"""What the Conv-FFT blocks of a trained US-SFNet do with their three branches (``ussf explain --frequency``).

A :class:`~ussf_lib.models.conv_fft.ConvFFTBlock` computes ``GELU(x + spatial(x) + freq(x))``. Forward hooks on
each block's ``spatial`` and ``freq`` submodules (and on the block, to finish the sums once both ran) record,
over a set of images:

* **branch shares** (:func:`analyse_blocks`, first table): per image, ``||b||^2 / (||x||^2 + ||spatial(x)||^2 +
  ||freq(x)||^2)`` for each branch ``b`` (identity ``x``, spatial, frequency), norms over channels and pixels,
  then averaged over the images (each image weighs the same). The three shares sum to 1 per block. This
  splits the *sum of the branch energies*, not the energy of their sum: branches that cancel each other
  still both get a share. ``sum_ratio = ||x + spatial + freq||^2 / (sum of the three energies)`` (averaged
  the same way) says how much they interfere: 1 when they are orthogonal, below 1 when they cancel, above 1
  when they add coherently.
* **radial gain of the frequency branch** (second table): ``rfft2`` (orthonormal) of the branch's input ``x``
  and of its output ``y``; the power ``|X(f)|^2`` and ``|Y(f)|^2`` summed over images, channels and the spatial
  frequencies ``f`` whose radius ``|f| = sqrt(fx^2 + fy^2)`` (cycles/pixel) falls in each bin of ``[0, 0.5]``;
  ``gain = sqrt(sum |Y|^2 / sum |X|^2)`` per bin. Above 1 the branch's output carries more energy than its
  input at those frequencies, below 1 less. Frequencies beyond 0.5 (the corners of the square spectrum) are
  left out. The branch is not a linear filter (its 3x3 convolutions mix neighbouring frequencies and the
  real and imaginary parts of all channels, and a GELU and norms sit between them), so this is the energy ratio
  it showed on these images, not a transfer function.

docs/explain.md says what these views do and do not show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ussf_lib.errors import UserError

#: The three terms a Conv-FFT block sums before its GELU.
BRANCHES: tuple[str, ...] = ("identity", "spatial", "frequency")
SHARE_COLUMNS: tuple[str, ...] = ("stage", "block", "name", "channels", "height", "width", "n_images",
                                  "share_identity", "share_spatial", "share_frequency", "sum_ratio")
RESPONSE_COLUMNS: tuple[str, ...] = ("stage", "block", "name", "height", "width", "bin", "radius", "radius_lo",
                                     "radius_hi", "n_freq", "in_power", "out_power", "gain")


def conv_fft_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, block)`` of every Conv-FFT block of ``model``, in forward order."""
    from ussf_lib.models.conv_fft import ConvFFTBlock

    return [(name, m) for name, m in model.named_modules() if isinstance(m, ConvFFTBlock)]


def _stage_and_block(name: str, index: int) -> tuple[int, int]:
    """``stages.1.0`` -> (2, 0): stage counted from 1 as in the paper, block from 0 within it."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "stages" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]) + 1, int(parts[2])
    return 0, index


def radial_bins(height: int, width: int, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the half spectrum ``(height, width // 2 + 1)`` of ``rfft2``: each frequency's bin (-1 beyond radius
    0.5), its weight (2 for columns that also stand for their conjugate, else 1) and the bin edges."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy ** 2 + fx ** 2)
    edges = np.linspace(0.0, 0.5, n_bins + 1)
    index = np.minimum(np.floor(radius / 0.5 * n_bins).astype(np.int64), n_bins - 1)
    index[radius > 0.5 + 1e-12] = -1
    columns = np.arange(width // 2 + 1)
    weight = np.where((columns == 0) | (2 * columns == width), 1.0, 2.0)[None, :].repeat(height, axis=0)
    return index, weight, edges


class _BlockProbe:
    """Sums, for one block, what :func:`analyse_blocks` reports (hooks fill it batch by batch)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.x: Tensor | None = None
        self.spatial: Tensor | None = None
        self.freq: Tensor | None = None
        self.share_sums = np.zeros(len(BRANCHES))
        self.ratio_sum = 0.0
        self.n_images = 0
        self.shape: tuple[int, int, int] | None = None
        self.power_in: np.ndarray | None = None
        self.power_out: np.ndarray | None = None

    def on_spatial(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self.spatial = output.detach()

    def on_freq(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x, y = inputs[0].detach(), output.detach()
        self.x, self.freq = x, y
        spec_in = torch.fft.rfft2(x.double(), norm="ortho").abs().square().sum(dim=(0, 1))
        spec_out = torch.fft.rfft2(y.double(), norm="ortho").abs().square().sum(dim=(0, 1))
        if self.power_in is None:
            self.power_in = np.zeros(tuple(spec_in.shape))
            self.power_out = np.zeros(tuple(spec_out.shape))
        self.power_in += spec_in.cpu().numpy()
        self.power_out += spec_out.cpu().numpy()

    def on_block(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x, s, f = self.x, self.spatial, self.freq
        if x is None or s is None or f is None:
            raise RuntimeError(f"{self.name}: a branch hook did not run; the block's forward changed")
        terms = [t.double().flatten(1) for t in (x, s, f)]
        energies = torch.stack([t.square().sum(1) for t in terms], dim=1)  # (B, 3)
        total = energies.sum(1)
        keep = total > 0
        shares = energies[keep] / total[keep, None]
        ratio = (terms[0] + terms[1] + terms[2]).square().sum(1)[keep] / total[keep]
        self.share_sums += shares.sum(0).cpu().numpy()
        self.ratio_sum += float(ratio.sum())
        self.n_images += int(keep.sum())
        self.shape = tuple(x.shape[1:])
        self.x = self.spatial = self.freq = None


def analyse_blocks(model: nn.Module, batches: Iterable[Tensor], n_bins: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Branch shares (one row per block, columns :data:`SHARE_COLUMNS`) and the frequency branch's radial gain
    (``n_bins`` rows per block, columns :data:`RESPONSE_COLUMNS`) over ``batches`` of normalized images.

    Bins no frequency of a block's map falls in (small maps have few) have ``n_freq`` 0 and a NaN gain.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise UserError(f"n_bins={n_bins!r} must be a positive whole number, e.g. 16")
    blocks = conv_fft_blocks(model)
    if not blocks:
        raise UserError(f"{type(model).__name__} has no Conv-FFT blocks; the frequency view needs a US-SFNet")
    probes = [_BlockProbe(name) for name, _ in blocks]
    handles = []
    for (name, block), probe in zip(blocks, probes):
        handles += [block.spatial.register_forward_hook(probe.on_spatial),
                    block.freq.register_forward_hook(probe.on_freq),
                    block.register_forward_hook(probe.on_block)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    share_rows, response_rows = [], []
    for i, ((name, block), probe) in enumerate(zip(blocks, probes)):
        stage, index = _stage_and_block(name, i)
        if probe.n_images == 0 or probe.shape is None:
            raise UserError("no images reached the Conv-FFT blocks (all-zero feature maps?); pass other images")
        c, h, w = probe.shape
        mean_shares = probe.share_sums / probe.n_images
        share_rows.append({"stage": stage, "block": index, "name": name, "channels": c, "height": h, "width": w,
                           "n_images": probe.n_images,
                           **{f"share_{b}": float(v) for b, v in zip(BRANCHES, mean_shares)},
                           "sum_ratio": probe.ratio_sum / probe.n_images})
        bins, weight, edges = radial_bins(h, w, n_bins)
        inside = bins >= 0
        count = np.bincount(bins[inside], weights=weight[inside], minlength=n_bins)
        p_in = np.bincount(bins[inside], weights=(weight * probe.power_in)[inside], minlength=n_bins)
        p_out = np.bincount(bins[inside], weights=(weight * probe.power_out)[inside], minlength=n_bins)
        per = count * probe.n_images * c  # (image, channel, frequency) triples in each bin
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where((count > 0) & (p_in > 0), np.sqrt(p_out / p_in), np.nan)
            in_power = np.where(count > 0, p_in / per, np.nan)
            out_power = np.where(count > 0, p_out / per, np.nan)
        for k in range(n_bins):
            response_rows.append({"stage": stage, "block": index, "name": name, "height": h, "width": w, "bin": k,
                                  "radius": (edges[k] + edges[k + 1]) / 2, "radius_lo": edges[k],
                                  "radius_hi": edges[k + 1], "n_freq": int(count[k]), "in_power": in_power[k],
                                  "out_power": out_power[k], "gain": gain[k]})
    return (pd.DataFrame(share_rows, columns=list(SHARE_COLUMNS)),
            pd.DataFrame(response_rows, columns=list(RESPONSE_COLUMNS)))


def write_frequency(prep, batch_size: int = 16, n_bins: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The frequency view of a :class:`~ussf_lib.explain.gradcam.Prepared` US-SFNet: the two tables of
    :func:`analyse_blocks` as ``frequency_shares.csv`` and ``frequency_response.csv`` and the figure
    ``frequency.png`` in ``prep.out``; returns the tables."""
    import matplotlib.pyplot as plt

    from ussf_lib.explain.figures import plot_frequency_view
    from ussf_lib.explain.gradcam import to_model_input

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size={batch_size!r} must be a positive whole number")
    check_has_blocks(prep.model, prep.meta, prep.checkpoint)
    images = prep.images
    batches = (to_model_input(images[i:i + batch_size], prep.meta, prep.device)
               for i in range(0, len(images), batch_size))
    shares, response = analyse_blocks(prep.model, batches, n_bins)
    prep.out.mkdir(parents=True, exist_ok=True)
    shares.to_csv(prep.out / "frequency_shares.csv", index=False)
    response.to_csv(prep.out / "frequency_response.csv", index=False)
    fig = plot_frequency_view(shares, response, title=f"{prep.meta['model_name']}: Conv-FFT branches over "
                              f"{len(images)} image(s) at {prep.meta['image_size']} px", out=prep.out / "frequency.png")
    plt.close(fig)
    return shares, response


def check_has_blocks(model: nn.Module, meta: dict, checkpoint: str | Path) -> None:
    """:class:`UserError` unless ``model`` has Conv-FFT blocks (the frequency view needs a US-SFNet)."""
    if not conv_fft_blocks(model):
        raise UserError(f"{checkpoint}: model {meta['model_name']!r} has no Conv-FFT blocks; the frequency view "
                        "needs a us_sfnet or us_sfnet_tiny checkpoint")


def explain_frequency(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
                      device: str = "auto", batch_size: int = 16, n_bins: int = 16) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Branch shares and radial gains of a US-SFNet checkpoint (or a run folder: its fold 0) over images.

    Writes ``out_dir/frequency_shares.csv``, ``out_dir/frequency_response.csv`` and ``out_dir/frequency.png``
    (:func:`ussf_lib.explain.figures.plot_frequency_view`); returns the two tables.
    """
    from ussf_lib.explain.gradcam import prepare

    return write_frequency(prepare(checkpoint, inputs, out_dir, device), batch_size, n_bins)

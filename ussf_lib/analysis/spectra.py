"""Frequency content of ultrasound images with numpy's FFT: spectra, radial profiles, filters, phase swaps.

Introduced in ``notebooks/02_image_spectra.ipynb``, which asks why a Conv-FFT block should help on
ultrasound: speckle, tissue texture and smooth anatomy live in different frequency bands.

Conventions
-----------
* Images are grayscale ``float64`` arrays; :func:`to_gray` converts uint8 RGB/gray images (values / 255,
  channels averaged). Stacks are ``(N, H, W)``.
* Frequencies are in **cycles per pixel** (0 = constant, 0.5 = Nyquist), as ``numpy.fft.fftfreq`` gives them,
  so results at different image sizes share one axis. The radius of a frequency ``(fy, fx)`` is
  ``sqrt(fy**2 + fx**2)``.
* Spectra are taken of the image tapered by a 2-D Hann window ``w`` (:func:`spectral_window`): the FFT treats an
  image as periodic, so without a taper the jump from its bottom row to its top row (and last column to first)
  spreads power along both frequency axes up to the Nyquist frequency, lines that say nothing about the tissue
  (edge leakage). ``window=False`` gives the raw FFT.
* The power spectrum is ``|fft2(w * (image - mean))|**2 / sum(w**2)`` (the mean is removed, so the constant term
  does not swamp the plot): white noise of variance s² has power s² at every frequency. Without the window the
  divisor is ``H * W`` and, by Parseval, the sum is ``H * W`` times the image's variance.
* Radial profiles average the power over rings of width ``1 / min(H, W)`` centred on ``k / min(H, W)`` for
  ``k = 1 .. min(H, W) // 2``: a cosine of ``k`` cycles across the image peaks in ring ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ussf_lib.errors import UserError
from ussf_lib.evaluation.plots import Figure, plt, save_figure


def to_gray(images: np.ndarray) -> np.ndarray:
    """Grayscale float64 image(s): ``(H, W)``, ``(H, W, C)`` with C in {3, 4}, ``(N, H, W)`` or ``(N, H, W, C)``.

    uint8 values are scaled to [0, 1]; colour channels (the first three) are averaged. Returns ``(H, W)`` for one
    image and ``(N, H, W)`` for a stack. Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    arr = np.asarray(images)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    arr = arr.astype(np.float64) / scale
    if arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        arr = arr[..., :3].mean(axis=-1)
    if arr.ndim not in (2, 3):
        raise UserError(f"images of shape {np.asarray(images).shape}: expected (H, W), (H, W, 3), (N, H, W) "
                        "or (N, H, W, 3)")
    return arr


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim != 2:
        raise UserError(f"{name} has shape {arr.shape}; pass one grayscale image (H, W), e.g. to_gray(image)")
    return arr


def radius_grid(shape: tuple[int, int]) -> np.ndarray:
    """Radial frequency (cycles/pixel) of every coefficient of ``fft2`` of an image of ``shape`` (unshifted layout)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    return np.sqrt(fy**2 + fx**2)


def spectral_window(shape: tuple[int, int]) -> np.ndarray:
    """2-D Hann window of ``shape`` (outer product of scipy's periodic Hann windows, made for spectral analysis)."""
    from scipy.signal import get_window

    return np.outer(get_window("hann", shape[0]), get_window("hann", shape[1]))


def _tapered(image: np.ndarray, remove_mean: bool, window: bool) -> tuple[np.ndarray, float]:
    """The image ready for fft2 (mean removed, Hann-tapered as asked) and the power normalization."""
    img = _check_image(image)
    if remove_mean:
        img = img - img.mean()
    if not window:
        return img, float(img.size)
    w = spectral_window(img.shape)
    return img * w, float(np.sum(w**2))


def power_spectrum(image: np.ndarray, remove_mean: bool = True, window: bool = True) -> np.ndarray:
    """``|fft2(w * (image - mean))|**2 / sum(w**2)`` in fft2's unshifted layout (see the module's conventions;
    ``window=False``: no taper, divided by ``H * W``)."""
    img, norm = _tapered(image, remove_mean, window)
    return np.abs(np.fft.fft2(img)) ** 2 / norm


def log_magnitude_spectrum(image: np.ndarray, window: bool = True) -> np.ndarray:
    """``log(1 + |fft2(w * (image - mean))|)``, shifted so the zero frequency sits in the centre (for display).

    The mean is removed (else the one zero-frequency value would set the top of any colour scale) and the image is
    Hann-tapered (else the border's jump draws bright lines along both axes); ``window=False`` leaves the taper out.
    """
    img, _ = _tapered(image, True, window)
    return np.fft.fftshift(np.log1p(np.abs(np.fft.fft2(img))))


def class_mean_log_spectra(images: np.ndarray, labels: Sequence[int], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Mean centred log-magnitude spectrum of each class (``images`` grayscale ``(N, H, W)``, ``labels`` indices).

    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    images, labels = _check_stack(images, labels)
    out = {}
    for k, name in enumerate(classes):
        members = images[labels == k]
        if len(members):
            out[str(name)] = np.mean([log_magnitude_spectrum(im) for im in members], axis=0)
    return out


def radial_profile(power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ring averages of a power spectrum in fft2 layout: ``(frequencies, mean power)`` for rings 1 .. min(H, W)//2."""
    power = np.asarray(power, dtype=np.float64)
    n = min(power.shape)
    if n < 4:
        raise UserError(f"a {power.shape} spectrum is too small for a radial profile; use images of at least 4x4 px")
    rings = np.rint(radius_grid(power.shape) * n).astype(np.int64)
    k_max = n // 2
    sums = np.bincount(rings.ravel(), weights=power.ravel(), minlength=k_max + 1)[: k_max + 1]
    counts = np.bincount(rings.ravel(), minlength=k_max + 1)[: k_max + 1]
    k = np.arange(1, k_max + 1)
    return k / n, sums[1:] / np.maximum(counts[1:], 1)


def radial_power_spectrum(image: np.ndarray, remove_mean: bool = True,
                          window: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of one image: ``(frequencies in cycles/pixel, mean power per ring)``."""
    return radial_profile(power_spectrum(image, remove_mean=remove_mean, window=window))


def radial_spectra(groups: Mapping[str, np.ndarray], confidence: float = 0.95) -> pd.DataFrame:
    """Mean radial log10 power spectrum of each group of images with a confidence band for the mean.

    ``groups`` maps a name (a class, or "raw" / "smoothed") to a grayscale stack ``(N, H, W)`` of one image size.
    Each image's radial profile is taken in log10 (power spans decades); the band is ``mean ± t * sd / sqrt(N)``
    with Student's t at ``confidence`` and ``N - 1`` degrees of freedom (no band for a single image).
    Returns a long table ``group, frequency, mean, lower, upper, n, confidence``.
    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    from scipy import stats

    if not 0 < confidence < 1:
        raise UserError(f"confidence={confidence} must lie strictly between 0 and 1, e.g. 0.95")
    frames = []
    for name, stack in groups.items():
        stack = np.asarray(stack, dtype=np.float64)
        if stack.ndim == 2:
            stack = stack[None]
        if stack.ndim != 3 or len(stack) == 0:
            raise UserError(f"group {name!r}: pass a grayscale stack (N, H, W) with at least one image")
        profiles = []
        for im in stack:
            freqs, power = radial_power_spectrum(im)
            profiles.append(np.log10(power + 1e-20))
        profiles = np.array(profiles)
        mean = profiles.mean(axis=0)
        n = len(profiles)
        if n > 1:
            half = stats.t.ppf(0.5 + confidence / 2, n - 1) * profiles.std(axis=0, ddof=1) / np.sqrt(n)
        else:
            half = np.full_like(mean, np.nan)
        frames.append(pd.DataFrame({"group": str(name), "frequency": freqs, "mean": mean,
                                    "lower": mean - half, "upper": mean + half, "n": n, "confidence": confidence}))
    return pd.concat(frames, ignore_index=True)


def radial_spectra_by_class(images: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                            confidence: float = 0.95) -> pd.DataFrame:
    """:func:`radial_spectra` with one group per class (classes without images are left out).

    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    images, labels = _check_stack(images, labels)
    groups = {str(c): images[labels == k] for k, c in enumerate(classes) if np.any(labels == k)}
    return radial_spectra(groups, confidence)


def lowpass_mask(shape: tuple[int, int], cutoff: float) -> np.ndarray:
    """Boolean ideal low-pass mask in fft2 layout: True where the radial frequency is <= ``cutoff`` cycles/pixel."""
    if not cutoff >= 0:
        raise UserError(f"cutoff={cutoff} must be >= 0 cycles/pixel (0.5 is the Nyquist frequency)")
    return radius_grid(shape) <= cutoff


def split_frequencies(image: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the image through an ideal low-pass and the complementary high-pass filter.

    Both are computed from the spectrum (``ifft2(F * mask)`` and ``ifft2(F * ~mask)``), so ``low + high`` equals
    the image up to rounding. The mask is symmetric under ``f -> -f``, so both parts are real.
    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    img = _check_image(image)
    spectrum = np.fft.fft2(img)
    mask = lowpass_mask(img.shape, cutoff)
    low = np.fft.ifft2(spectrum * mask).real
    high = np.fft.ifft2(spectrum * ~mask).real
    return low, high


def swap_magnitude_phase(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(|A| with the phase of B, |B| with the phase of A)`` for two images of one shape.

    The spectra of real images are Hermitian, and so is ``|A| exp(i angle(B))``: the results are real images whose
    Fourier magnitudes are exactly those of ``a`` and ``b`` (Oppenheim & Lim, 1981: the phase carries the edges).
    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    a, b = _check_image(a, "a"), _check_image(b, "b")
    if a.shape != b.shape:
        raise UserError(f"images of shapes {a.shape} and {b.shape}: a magnitude/phase swap needs one shape")
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    mag_a_phase_b = np.fft.ifft2(np.abs(fa) * np.exp(1j * np.angle(fb))).real
    mag_b_phase_a = np.fft.ifft2(np.abs(fb) * np.exp(1j * np.angle(fa))).real
    return mag_a_phase_b, mag_b_phase_a


def high_frequency_fraction(image: np.ndarray, cutoff: float) -> float:
    """Share of the (Hann-tapered) image's variance at radial frequencies above ``cutoff``."""
    power = power_spectrum(image)
    total = power.sum()
    return float(power[~lowpass_mask(power.shape, cutoff)].sum() / total) if total > 0 else 0.0


def high_frequency_table(images: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                         cutoff: float) -> pd.DataFrame:
    """Per class: mean and std (ddof=1) of :func:`high_frequency_fraction` over its images, and their number.

    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    images, labels = _check_stack(images, labels)
    rows = []
    for k, name in enumerate(classes):
        values = [high_frequency_fraction(im, cutoff) for im in images[labels == k]]
        rows.append({"class": str(name), "cutoff": cutoff, "n": len(values),
                     "hf_fraction_mean": float(np.mean(values)) if values else np.nan,
                     "hf_fraction_std": float(np.std(values, ddof=1)) if len(values) > 1 else np.nan})
    return pd.DataFrame(rows)


def _check_stack(images: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, dtype=np.float64)
    labels = np.asarray(labels)
    if images.ndim != 3:
        raise UserError(f"images of shape {images.shape}: pass a grayscale stack (N, H, W), e.g. to_gray(images)")
    if len(labels) != len(images):
        raise UserError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
    return images, labels


# --------------------------------------------------------------------------------------------- figures


def plot_mean_spectra(spectra: Mapping[str, np.ndarray], out: str | Path | None = None) -> Figure:
    """One panel per class of :func:`class_mean_log_spectra`, on a shared colour scale, axes in cycles/pixel.

    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    names = list(spectra)
    if not names:
        raise UserError("no spectra to plot; pass {class: mean log-magnitude spectrum}")
    lo = min(float(s.min()) for s in spectra.values())
    hi = max(float(s.max()) for s in spectra.values())
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.6), squeeze=False, layout="constrained")
    ticks = [-0.4, -0.2, 0.0, 0.2, 0.4]  # fewer than matplotlib's default, which run together in narrow panels
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        h, w = spectra[name].shape
        # Row 0 of the centred spectrum is fy = -0.5: drawn at the bottom, so fy grows upwards like fx rightwards.
        extent = (-0.5, 0.5 - 1 / w, -0.5, 0.5 - 1 / h)
        im = ax.imshow(spectra[name], cmap="magma", vmin=lo, vmax=hi, extent=extent, origin="lower")
        ax.set(title=name, xlabel="fx (cycles/px)", ylabel="fy (cycles/px)" if i == 0 else "", xticks=ticks,
               yticks=ticks)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean log(1 + |F|)")
    save_figure(fig, out)
    return fig


def plot_radial_spectra(table: pd.DataFrame, title: str = "Radially averaged power spectrum",
                        out: str | Path | None = None) -> Figure:
    """Lines of :func:`radial_spectra` (one per group) with their confidence bands, log10 power vs frequency.

    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, rows in table.groupby("group", sort=False):
        line, = ax.plot(rows["frequency"], rows["mean"], label=f"{name} (n={int(rows['n'].iloc[0])})")
        ax.fill_between(rows["frequency"], rows["lower"], rows["upper"], color=line.get_color(), alpha=0.2)
    ax.set(xlabel="radial frequency (cycles/pixel)", ylabel="mean of log10 power over images", title=title)
    ax.grid(alpha=0.3)
    level = table["confidence"].iloc[0] if "confidence" in table.columns and len(table) else None
    ax.legend(fontsize="small", title=None if level is None else f"band: {100 * level:g} % CI of the mean",
              title_fontsize="small")
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def plot_frequency_split(image: np.ndarray, cutoff: float, title: str = "", out: str | Path | None = None) -> Figure:
    """The image, its low-pass and its high-pass part at ``cutoff`` (see :func:`split_frequencies`).

    The image and its low-pass part share one grey scale, so the low-pass panel shows what is kept, not a
    contrast-stretched version of it; the high-pass part (around zero) has its own, symmetric scale.
    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    img = _check_image(image)
    low, high = split_frequencies(img, cutoff)
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6), layout="constrained")
    shared = {"vmin": float(img.min()), "vmax": float(img.max())}
    spread = float(np.abs(high).max()) or 1.0
    panels = [(img, "image", shared), (low, f"low-pass (f <= {cutoff:g})", shared),
              (high, f"high-pass (f > {cutoff:g})", {"vmin": -spread, "vmax": spread})]
    for ax, (arr, name, scale) in zip(axes, panels):
        shown = ax.imshow(arr, cmap="gray", **scale)
        ax.set_title(name, fontsize="medium")
        ax.axis("off")
    # The high-pass part is signed: its bar shows that mid-grey is 0.
    fig.colorbar(shown, ax=axes[2], shrink=0.8, label="high-pass value (grey = 0)")
    if title:
        fig.suptitle(title, fontweight="bold")
    save_figure(fig, out)
    return fig


def plot_swap(a: np.ndarray, b: np.ndarray, names: tuple[str, str] = ("A", "B"), out: str | Path | None = None) -> Figure:
    """Two images and the two magnitude/phase swaps of :func:`swap_magnitude_phase`.

    Introduced in ``notebooks/02_image_spectra.ipynb``.
    """
    ab, ba = swap_magnitude_phase(a, b)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    # The two images on their own shared scale, so their brightness compares; the swaps' values fall outside
    # it (a swap is not an image of the same range), so each is stretched and says so.
    pair = {"vmin": float(min(np.min(a), np.min(b))), "vmax": float(max(np.max(a), np.max(b)))}
    panels = [(a, names[0], pair), (b, names[1], pair),
              (ab, f"|{names[0]}|, phase of {names[1]}\n(contrast-stretched)", {}),
              (ba, f"|{names[1]}|, phase of {names[0]}\n(contrast-stretched)", {})]
    for ax, (arr, name, scale) in zip(axes, panels):
        ax.imshow(arr, cmap="gray", **scale)
        ax.set_title(name, fontsize="small")
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out)
    return fig


def interactive_cutoff(images: Mapping[str, np.ndarray], cutoff: float = 0.1) -> Callable[..., None]:
    """ipywidgets: pick an image by name and move the cut-off; redraws :func:`plot_frequency_split`.

    For ``INTERACTIVE = True`` in ``notebooks/02_image_spectra.ipynb``; headless runs call the plot directly.
    """
    import ipywidgets as widgets

    def show(name: str, cutoff: float) -> None:
        plot_frequency_split(images[name], cutoff, title=name)
        plt.show()

    return widgets.interact(show, name=widgets.Dropdown(options=list(images)),
                            cutoff=widgets.FloatSlider(value=cutoff, min=0.0, max=0.5, step=0.01,
                                                       description="cut-off", continuous_update=False))

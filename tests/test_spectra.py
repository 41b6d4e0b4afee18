"""ussf_lib.analysis.spectra on images whose spectra are known: cosines, constants, white noise."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from PIL import Image

from ussf_lib.analysis import spectra
from ussf_lib.errors import UserError

N = 64


def cosine(k_x: int = 0, k_y: int = 0, n: int = N) -> np.ndarray:
    """cos(2 pi (k_x x + k_y y) / n): k_x cycles across, k_y cycles down the image."""
    y, x = np.mgrid[0:n, 0:n]
    return np.cos(2 * np.pi * (k_x * x + k_y * y) / n)


def test_to_gray_scales_uint8_and_averages_channels():
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    assert spectra.to_gray(rgb).shape == (4, 5)
    assert np.allclose(spectra.to_gray(rgb), 1 / 3)
    stack = np.full((2, 4, 5, 3), 51, dtype=np.uint8)
    assert spectra.to_gray(stack).shape == (2, 4, 5)
    assert np.allclose(spectra.to_gray(stack), 0.2)
    assert spectra.to_gray(np.ones((3, 4, 5))).shape == (3, 4, 5)  # already a grayscale stack
    with pytest.raises(UserError):
        spectra.to_gray(np.zeros(5))


@pytest.mark.parametrize("k_x,k_y", [(5, 0), (0, 9), (12, 0)])
def test_radial_spectrum_of_a_cosine_peaks_at_its_frequency(k_x, k_y):
    k = max(k_x, k_y)
    freqs, power = spectra.radial_power_spectrum(cosine(k_x, k_y), window=False)
    assert freqs[0] == pytest.approx(1 / N) and freqs[-1] == pytest.approx(0.5)
    assert freqs[np.argmax(power)] == pytest.approx(k / N)
    assert np.count_nonzero(power > 1e-9 * power.max()) == 1  # all energy in one ring
    freqs, power = spectra.radial_power_spectrum(cosine(k_x, k_y))  # the Hann window's main lobe: rings k-1..k+1
    assert freqs[np.argmax(power)] == pytest.approx(k / N)
    assert power[k - 2:k + 1].sum() >= 0.999 * power.sum()


def test_power_spectrum_obeys_parseval_and_ignores_the_mean():
    rng = np.random.default_rng(0)
    img = rng.normal(3.0, 2.0, (N, N))
    power = spectra.power_spectrum(img, window=False)
    assert power.sum() == pytest.approx(img.size * img.var())
    assert power[0, 0] == pytest.approx(0.0, abs=1e-9)
    freqs, radial = spectra.radial_power_spectrum(np.full((N, N), 7.0))
    assert np.allclose(radial, 0.0)


def test_white_noise_has_a_flat_radial_spectrum_at_its_variance():
    rng = np.random.default_rng(1)
    profiles = [spectra.radial_power_spectrum(rng.normal(0, 2.0, (N, N)))[1] for _ in range(20)]
    mean = np.mean(profiles, axis=0)
    assert np.allclose(mean[4:], 4.0, rtol=0.25)  # sigma^2 = 4 per coefficient; low rings hold few coefficients


def test_radial_profile_rejects_tiny_spectra():
    with pytest.raises(UserError, match="too small"):
        spectra.radial_profile(np.ones((2, 2)))


def test_low_pass_plus_high_pass_sums_back_to_the_image():
    rng = np.random.default_rng(2)
    img = rng.random((N, N + 3))  # odd, non-square on purpose
    for cutoff in (0.0, 0.05, 0.1, 0.3, 0.8):
        low, high = spectra.split_frequencies(img, cutoff)
        assert low.shape == high.shape == img.shape
        assert np.allclose(low + high, img)
    low, high = spectra.split_frequencies(img, 0.0)
    assert np.allclose(low, img.mean())  # only the constant term passes a zero cut-off


def test_filters_route_cosines_by_frequency():
    slow, fast = cosine(2), cosine(20)  # 0.031 and 0.31 cycles/pixel
    low, high = spectra.split_frequencies(slow + fast, cutoff=0.1)
    assert np.allclose(low, slow, atol=1e-9)
    assert np.allclose(high, fast, atol=1e-9)
    assert spectra.high_frequency_fraction(fast, 0.1) == pytest.approx(1.0)
    assert spectra.high_frequency_fraction(slow, 0.1) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(UserError):
        spectra.lowpass_mask((8, 8), -0.1)


def test_magnitude_phase_swap_keeps_magnitudes_and_swaps_back():
    rng = np.random.default_rng(3)
    a, b = rng.random((N, N)), cosine(3, 1) + rng.random((N, N))
    ab, ba = spectra.swap_magnitude_phase(a, b)
    assert ab.dtype == np.float64 and ab.shape == a.shape
    assert np.allclose(np.abs(np.fft.fft2(ab)), np.abs(np.fft.fft2(a)))
    assert np.allclose(np.abs(np.fft.fft2(ba)), np.abs(np.fft.fft2(b)))
    phase = lambda img: np.angle(np.fft.fft2(img))  # noqa: E731
    assert np.allclose(np.exp(1j * phase(ab)), np.exp(1j * phase(b)))
    a_again, b_again = spectra.swap_magnitude_phase(ab, ba)  # |a| with phase of a: a itself
    assert np.allclose(a_again, a) and np.allclose(b_again, b)
    with pytest.raises(UserError, match="one shape"):
        spectra.swap_magnitude_phase(a, b[:-1])


def test_log_magnitude_spectrum_is_centred_without_its_mean():
    spec = spectra.log_magnitude_spectrum(cosine(4) + 5.0)
    assert spec.shape == (N, N)
    peaks = {tuple(int(v) for v in np.unravel_index(i, spec.shape)) for i in np.argsort(spec.ravel())[-2:]}
    assert peaks == {(N // 2, N // 2 - 4), (N // 2, N // 2 + 4)}  # +-4 cycles across, around the centre
    assert spec[N // 2, N // 2] == pytest.approx(0.0, abs=1e-9)  # the mean (+5) is removed
    assert np.allclose(spectra.log_magnitude_spectrum(np.full((N, N), 3.0)), 0.0)


def test_the_window_keeps_the_border_jump_out_of_the_spectrum():
    """A smooth ramp down the image: the FFT sees a periodic saw-tooth whose jump leaks power along fx = 0 up to
    the Nyquist frequency; the Hann taper removes that leakage."""
    ramp = np.repeat(np.linspace(0.0, 1.0, N)[:, None], N, axis=1)
    above = ~spectra.lowpass_mask((N, N), 0.25)
    share_above = lambda power: power[above].sum() / power.sum()  # noqa: E731
    tapered = share_above(spectra.power_spectrum(ramp))
    assert tapered == pytest.approx(spectra.high_frequency_fraction(ramp, 0.25))
    assert share_above(spectra.power_spectrum(ramp, window=False)) > 100 * tapered and tapered < 1e-3
    line = lambda spec: spec[: N // 2 - 8, N // 2].mean()  # far from the centre on the fx = 0 column  # noqa: E731
    assert line(spectra.log_magnitude_spectrum(ramp, window=False)) > 1.0 > 0.1 > line(spectra.log_magnitude_spectrum(ramp))


def test_class_spectra_and_bands():
    rng = np.random.default_rng(5)
    smooth = np.stack([cosine(2) + 0.1 * rng.random((N, N)) for _ in range(6)])
    rough = np.stack([cosine(20) + 0.1 * rng.random((N, N)) for _ in range(6)])
    images = np.concatenate([smooth, rough])
    labels = np.array([0] * 6 + [1] * 6)
    means = spectra.class_mean_log_spectra(images, labels, ["smooth", "rough", "empty"])
    assert list(means) == ["smooth", "rough"] and means["smooth"].shape == (N, N)

    table = spectra.radial_spectra_by_class(images, labels, ["smooth", "rough"])
    assert list(table.columns) == ["group", "frequency", "mean", "lower", "upper", "n", "confidence"]
    assert (table["lower"] <= table["mean"]).all() and (table["mean"] <= table["upper"]).all()
    assert set(table["n"]) == {6}
    peak = table.loc[table.groupby("group")["mean"].idxmax()].set_index("group")["frequency"]
    assert peak["smooth"] == pytest.approx(2 / N) and peak["rough"] == pytest.approx(20 / N)

    narrow = spectra.radial_spectra({"g": rough}, confidence=0.5)
    wide = spectra.radial_spectra({"g": rough}, confidence=0.99)
    assert ((wide["upper"] - wide["lower"]) > (narrow["upper"] - narrow["lower"])).all()
    single = spectra.radial_spectra({"one": rough[0]})
    assert single["lower"].isna().all() and (single["n"] == 1).all()
    with pytest.raises(UserError):
        spectra.radial_spectra({"g": rough}, confidence=1.5)

    hf = spectra.high_frequency_table(images, labels, ["smooth", "rough"], cutoff=0.1).set_index("class")
    assert hf.at["rough", "hf_fraction_mean"] > 0.9 > 0.1 > hf.at["smooth", "hf_fraction_mean"]
    with pytest.raises(UserError, match="labels"):
        spectra.high_frequency_table(images, labels[:-1], ["smooth", "rough"], 0.1)


def test_figures_are_saved(tmp_path):
    import matplotlib.pyplot as plt

    img = cosine(4) + cosine(0, 9)
    figs = [
        spectra.plot_mean_spectra({"a": spectra.log_magnitude_spectrum(img)}, out=tmp_path / "mean.png"),
        spectra.plot_radial_spectra(spectra.radial_spectra({"a": np.stack([img, img.T])}), out=tmp_path / "radial.png"),
        spectra.plot_frequency_split(img, 0.1, title="x", out=tmp_path / "split.png"),
        spectra.plot_swap(img, img.T, out=tmp_path / "swap.png"),
    ]
    image_clim, low_clim, high_clim = (ax.images[0].get_clim() for ax in figs[2].axes[:3])
    assert figs[2].axes[3].get_ylabel() == "high-pass value (grey = 0)"  # the signed panel's colour bar
    legend = figs[1].axes[0].get_legend()
    assert legend.get_title().get_text() == "band: 95 % CI of the mean"
    assert image_clim == low_clim == (img.min(), img.max())  # what the low-pass keeps, on the image's scale
    assert high_clim[0] == -high_clim[1] and high_clim[1] > 0  # the high-pass part, centred on zero
    for fig in figs:
        plt.close(fig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.png", "radial.png", "split.png", "swap.png"]
    for png in tmp_path.iterdir():  # real pictures with something drawn, not empty canvases
        with Image.open(png) as im:
            pixels = np.asarray(im.convert("L"))
        assert im.format == "PNG" and min(im.size) >= 150 and pixels.std() > 5, png.name

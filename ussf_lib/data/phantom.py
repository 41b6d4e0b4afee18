"""Synthetic B-mode phantom of cervical lymph nodes: the toolkit's built-in default data.

Introduced in ``notebooks/01_explore_data.ipynb``. The paper's images are private, so every command and
notebook can run on this stand-in instead. It is a teaching and testing phantom, not clinical data.

Physics (a simplified version of the linear convolution model behind Field II, Jensen 1996)
-------------------------------------------------------------------------------------------
1. A *tissue echogenicity map* in dB is built in millimetres: skin line, subcutaneous fat with echogenic
   septa, superficial and deep fascia lines, a striated muscle layer, deep soft tissue, sometimes an anechoic vessel, and the
   lymph node drawn with the morphology of its class (below).
2. *Scatterers*: every grid point carries a circular complex Gaussian amplitude whose variance is the
   echogenicity there (fully developed speckle: many sub-resolution scatterers per cell, Rayleigh envelope),
   with bright reflectors (fascia, capsule, calcifications) added to that amplitude as random-phase scatterers
   too, so they speckle like tissue.
3. *Attenuation*: a per-pixel attenuation map (dB/mm, round trip, scaled with the transmit frequency) is
   integrated along depth, so fluid (necrosis, vessels, pseudo-cystic lymphoma) gives posterior enhancement
   and calcifications cast an acoustic shadow.
4. *Point-spread function*, applied by FFT: axially a Gaussian-windowed complex carrier (the analytic pulse,
   2-3 cycles at 6-11 MHz); laterally a Gaussian beam whose width grows away from the focal depth.
   The magnitude of the resulting analytic (IQ) field is the envelope.
5. *Receiver*: thermal noise, time-gain compensation (TGC) that compensates the nominal attenuation slope
   with a few-percent slope error and slider bumps, then log compression to a 45-60 dB dynamic range and
   8-bit quantisation. The PSF is specified in millimetres, so speckle size scales with ``image_size``; below
   180 px the field is simulated on a 2-4x finer grid and the displayed image is area-averaged to the pixel.

Class criteria (see ``data_README.md`` for the table and literature)
--------------------------------------------------------------------
* ``normal``: small, oval (short/long axis < 0.5), echogenic fatty hilum, thin smooth hypoechoic cortex.
* ``benign`` (reactive): enlarged but oval, hilum preserved though narrowed by a widened cortex, smooth border.
* ``primary`` (lymphoma): round (S/L > 0.5), markedly hypoechoic, pseudo-cystic with a reticulated /
  micronodular pattern, hilum usually absent, posterior enhancement.
* ``metastatic``: round, hilum lost, heterogeneous echoes, cystic necrosis and/or punctate calcifications
  with shadowing, sometimes an irregular border.

All classes share nuisance variation (depth setting, gain, dynamic range, TGC, focus, frequency, node
position and rotation, overlapping sizes, vessels, noise), so the classes overlap. Each synthetic patient
has one node; its images are new views of it (new speckle, slightly different plane, angle, position, depth).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence, overload

import numpy as np
from PIL import Image
from scipy import fft as sfft

from ussf_lib.errors import UserError
from ussf_lib.paper import PAPER_CLASSES, PAPER_DATASET

__all__ = [
    "PHANTOM_CLASSES",
    "MASK_LABELS",
    "NODE_MASK_VALUES",
    "ClassPrior",
    "CLASS_PRIORS",
    "NodePatient",
    "sample_patient",
    "render_view",
    "render_node",
    "patient_sizes",
    "patients_per_class",
    "min_images_per_class",
    "PAPER_CLASS_RATIO",
    "ClassRatio",
    "class_counts",
    "generate_phantom",
    "is_phantom_folder",
    "PHANTOM_MARKER",
]

#: The phantom's classes: the paper's four, in the paper's order.
PHANTOM_CLASSES: tuple[str, ...] = PAPER_CLASSES
#: Views per synthetic patient, (fewest, most).
PHANTOM_IMAGES_PER_PATIENT: tuple[int, int] = (8, 10)

#: Values of the label mask that ``render_node(..., return_mask=True)`` returns.
MASK_LABELS: dict[int, str] = {
    0: "background",
    1: "parenchyma",  # node cortex / tumour tissue
    2: "hilum",  # echogenic fatty hilum
    3: "necrosis",  # anechoic cystic necrosis
    4: "calcification",  # punctate echogenic focus
    5: "vessel",  # anechoic vessel lumen (not part of the node)
}
#: Mask values that belong to the lymph node.
NODE_MASK_VALUES: tuple[int, ...] = (1, 2, 3, 4)

SOUND_SPEED_MM_PER_US = 1.54
#: Round-trip soft-tissue attenuation in dB/mm per MHz (0.5-0.7 dB/cm/MHz one way).
TISSUE_ATTENUATION_DB_PER_MM_MHZ = 2 * 0.06
LN10 = math.log(10.0)

Range = tuple[float, float]


@dataclass(frozen=True)
class ClassPrior:
    """Patient-level distributions of one class. ``(mean, sd)`` pairs are clipped normals, ``(lo, hi)`` uniform."""

    long_axis_mm: Range  # (mean, sd), clipped to long_axis_clip
    long_axis_clip: Range
    sl_ratio: Range  # short/long axis ratio (mean, sd), clipped to sl_clip
    sl_clip: Range
    p_hilum: float  # probability that the node has an echogenic hilum
    p_hilum_view: float  # probability that a view's plane shows it
    hilum_width: Range  # (lo, hi) fraction of the short semi-axis
    hilum_length: Range  # (lo, hi) fraction of the long semi-axis
    hilum_db: Range  # (mean, sd) relative to deep soft tissue (0 dB)
    cortex_db: Range  # (mean, sd) parenchyma echogenicity
    texture_db: Range  # (lo, hi) sd of coarse heterogeneity inside the node
    reticulation_db: Range  # (lo, hi) strength of echogenic septa between micronodules (lymphoma)
    p_necrosis: float
    n_necrosis: tuple[int, int]
    p_calcification: float
    n_calcification: tuple[int, int]
    irregularity: Range  # (lo, hi) amplitude of border harmonics (fraction of radius)
    attenuation_factor: Range  # (lo, hi) node attenuation relative to soft tissue (<1: posterior enhancement)
    capsule_db: Range  # (lo, hi) brightness of the capsule's specular echo (0 = none)


#: The sonographic criteria each class encodes (the table in ``data_README.md`` mirrors these numbers).
CLASS_PRIORS: dict[str, ClassPrior] = {
    "normal": ClassPrior(
        long_axis_mm=(9.0, 2.0), long_axis_clip=(5.0, 15.0), sl_ratio=(0.40, 0.08), sl_clip=(0.22, 0.62),
        p_hilum=0.92, p_hilum_view=0.85, hilum_width=(0.3, 0.55), hilum_length=(0.55, 0.85), hilum_db=(5.0, 2.0),
        cortex_db=(-13.0, 2.5), texture_db=(0.5, 1.5), reticulation_db=(0.0, 0.0),
        p_necrosis=0.0, n_necrosis=(0, 0), p_calcification=0.0, n_calcification=(0, 0),
        irregularity=(0.0, 0.02), attenuation_factor=(0.9, 1.1), capsule_db=(2.0, 6.0)),
    "benign": ClassPrior(
        long_axis_mm=(17.0, 4.0), long_axis_clip=(8.0, 30.0), sl_ratio=(0.44, 0.07), sl_clip=(0.25, 0.70),
        p_hilum=0.85, p_hilum_view=0.8, hilum_width=(0.15, 0.35), hilum_length=(0.45, 0.75), hilum_db=(3.0, 2.0),
        cortex_db=(-15.0, 3.0), texture_db=(0.5, 2.0), reticulation_db=(0.0, 0.0),
        p_necrosis=0.0, n_necrosis=(0, 0), p_calcification=0.0, n_calcification=(0, 0),
        irregularity=(0.0, 0.03), attenuation_factor=(0.8, 1.0), capsule_db=(2.0, 6.0)),
    "primary": ClassPrior(
        long_axis_mm=(20.0, 5.0), long_axis_clip=(10.0, 34.0), sl_ratio=(0.70, 0.10), sl_clip=(0.40, 0.95),
        p_hilum=0.2, p_hilum_view=0.6, hilum_width=(0.08, 0.18), hilum_length=(0.3, 0.6), hilum_db=(-2.0, 2.0),
        cortex_db=(-23.0, 3.0), texture_db=(0.5, 1.5), reticulation_db=(10.0, 18.0),
        p_necrosis=0.05, n_necrosis=(1, 1), p_calcification=0.0, n_calcification=(0, 0),
        irregularity=(0.0, 0.03), attenuation_factor=(0.25, 0.6), capsule_db=(2.0, 7.0)),
    "metastatic": ClassPrior(
        long_axis_mm=(18.0, 5.0), long_axis_clip=(8.0, 34.0), sl_ratio=(0.68, 0.12), sl_clip=(0.35, 0.95),
        p_hilum=0.12, p_hilum_view=0.6, hilum_width=(0.1, 0.25), hilum_length=(0.3, 0.6), hilum_db=(1.0, 2.0),
        cortex_db=(-13.0, 4.0), texture_db=(3.0, 6.0), reticulation_db=(0.0, 0.0),
        p_necrosis=0.55, n_necrosis=(1, 3), p_calcification=0.4, n_calcification=(2, 7),
        irregularity=(0.03, 0.1), attenuation_factor=(0.8, 1.2), capsule_db=(0.0, 3.0)),
}


@dataclass
class NodePatient:
    """Patient-level parameters (millimetres, dB): shared by every view of the same node."""

    label: str
    long_axis_mm: float
    sl_ratio: float
    angle_deg: float
    center_x_frac: float  # lateral position as a fraction of the field of view
    depth_mm: float  # node centre depth
    fov_mm: float  # depth setting (the image is fov x fov)
    f0_mhz: float
    n_cycles: float
    f_number: float
    dynamic_range_db: float
    cortex_db: float
    texture_db: float
    reticulation_db: float
    has_hilum: bool
    hilum_width: float
    hilum_length: float
    hilum_offset: float  # along the long axis, fraction of semi-axis
    hilum_side: int  # +1 / -1: side of the hilar notch
    hilum_db: float
    necrosis: list[tuple[float, float, float]]  # (u, v, r) in node-normalised coordinates
    calcifications: list[tuple[float, float, float]]  # (u, v, radius_mm)
    border_harmonics: list[tuple[int, float, float]]  # (k, amplitude, phase)
    attenuation_factor: float
    capsule_db: float
    # background anatomy
    skin_mm: float
    fat_mm: float
    muscle_mm: float
    layer_tilt: float
    layer_wave: tuple[float, float, float]  # amplitude mm, period mm, phase
    vessel: tuple[float, float, float] | None  # (dx from node centre in mm, depth offset mm, radius mm)


def _clipped_normal(rng: np.random.Generator, mean_sd: Range, clip: Range) -> float:
    return float(np.clip(rng.normal(mean_sd[0], mean_sd[1]), clip[0], clip[1]))


def _uniform(rng: np.random.Generator, lo_hi: Range) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1])) if lo_hi[1] > lo_hi[0] else float(lo_hi[0])


def _check_label(label: str) -> ClassPrior:
    try:
        return CLASS_PRIORS[label]
    except KeyError:
        raise UserError(f"unknown phantom class {label!r}; choose from {', '.join(PHANTOM_CLASSES)}") from None


def sample_patient(label: str, rng: np.random.Generator) -> NodePatient:
    """Draw one synthetic patient (one node plus its surrounding anatomy and scanner settings) of ``label``."""
    pr = _check_label(label)
    long_axis = _clipped_normal(rng, pr.long_axis_mm, pr.long_axis_clip)
    sl = _clipped_normal(rng, pr.sl_ratio, pr.sl_clip)
    short_axis = long_axis * sl
    skin = rng.uniform(1.2, 2.2)
    fat = rng.uniform(2.0, 7.0)
    muscle = rng.uniform(4.0, 11.0) if rng.random() < 0.8 else 0.0
    top_deep = skin + fat + muscle
    # depth setting: deep enough for the node, with the usual 30-45 mm presets
    depth = top_deep + short_axis / 2 + rng.uniform(1.0, 6.0)
    # depth setting: the sonographer zooms on small nodes, but only partly (apparent size stays informative)
    preset = rng.uniform(0.6, 1.0) * long_axis + rng.uniform(16.0, 26.0)
    fov = float(np.clip(max(preset, depth + short_axis / 2 + 5.0, 1.1 * long_axis + 4), 22, 60))
    depth = min(depth, fov - short_axis / 2 - 3.0)
    has_hilum = bool(rng.random() < pr.p_hilum)
    necrosis: list[tuple[float, float, float]] = []
    if pr.p_necrosis > 0 and rng.random() < pr.p_necrosis:
        for _ in range(int(rng.integers(pr.n_necrosis[0], pr.n_necrosis[1] + 1))):
            rad = rng.uniform(0.0, 0.55)
            phi = rng.uniform(0, 2 * np.pi)
            necrosis.append((rad * math.cos(phi), rad * math.sin(phi), rng.uniform(0.15, 0.4)))
    calcs: list[tuple[float, float, float]] = []
    if pr.p_calcification > 0 and rng.random() < pr.p_calcification:
        for _ in range(int(rng.integers(pr.n_calcification[0], pr.n_calcification[1] + 1))):
            rad = math.sqrt(rng.uniform(0.0, 0.7))
            phi = rng.uniform(0, 2 * np.pi)
            calcs.append((rad * math.cos(phi), rad * math.sin(phi), rng.uniform(0.12, 0.35)))
    irr = _uniform(rng, pr.irregularity)
    harmonics = [(k, float(irr * rng.uniform(0.3, 1.0) / math.sqrt(k - 1)), float(rng.uniform(0, 2 * np.pi)))
                 for k in range(2, 8)]
    vessel = None
    if rng.random() < 0.25:
        side = 1 if rng.random() < 0.5 else -1
        r_v = rng.uniform(2.5, 4.5)
        vessel = (side * (long_axis / 2 + r_v + rng.uniform(1.5, 6.0)), rng.uniform(-3.0, 3.0), r_v)
    return NodePatient(
        label=label, long_axis_mm=long_axis, sl_ratio=sl, angle_deg=float(rng.normal(0.0, 12.0)),
        center_x_frac=float(rng.uniform(0.35, 0.65)), depth_mm=float(depth), fov_mm=fov,
        f0_mhz=float(rng.uniform(6.0, 11.0)), n_cycles=float(rng.uniform(2.0, 3.0)),
        f_number=float(rng.uniform(1.8, 3.0)), dynamic_range_db=float(rng.uniform(45.0, 60.0)),
        cortex_db=_clipped_normal(rng, pr.cortex_db, (-32.0, 0.0)), texture_db=_uniform(rng, pr.texture_db),
        reticulation_db=_uniform(rng, pr.reticulation_db), has_hilum=has_hilum,
        hilum_width=_uniform(rng, pr.hilum_width), hilum_length=_uniform(rng, pr.hilum_length),
        hilum_offset=float(rng.uniform(-0.15, 0.15)), hilum_side=1 if rng.random() < 0.5 else -1,
        hilum_db=_clipped_normal(rng, pr.hilum_db, (-6.0, 10.0)), necrosis=necrosis, calcifications=calcs,
        border_harmonics=harmonics, attenuation_factor=_uniform(rng, pr.attenuation_factor),
        capsule_db=_uniform(rng, pr.capsule_db), skin_mm=float(skin), fat_mm=float(fat), muscle_mm=float(muscle),
        layer_tilt=float(rng.normal(0.0, 0.05)),
        layer_wave=(float(rng.uniform(0.0, 1.5)), float(rng.uniform(25.0, 80.0)), float(rng.uniform(0, 2 * np.pi))),
        vessel=vessel,
    )


def _supersample(image_size: int) -> int:
    """Sub-pixel factor so that the axial PSF (sigma ~0.1 mm over a ~40 mm field) is at least ~0.5 px."""
    return int(min(4, max(1, math.ceil(180.0 / image_size))))


def _gauss_tf(freq: np.ndarray, sigma_px: float | np.ndarray) -> np.ndarray:
    """Transfer function of a unit-sum Gaussian of the given sigma (pixels) at frequencies in cycles/px."""
    return np.exp(np.float32(-2.0 * np.pi**2) * (freq * sigma_px) ** 2)


def _textures(rng: np.random.Generator, shape: tuple[int, int], specs: list[tuple[float, float, float, float]],
              ) -> list[np.ndarray]:
    """Zero-mean, unit-sd textures from one white-noise field, each filtered by a Gaussian (band-pass when the
    second pair of sigmas is non-zero). ``specs``: (sigma_z, sigma_x, sigma2_z, sigma2_x) in pixels."""
    nz, nx = shape
    # uniform white noise is ~4x cheaper than normal; after Gaussian filtering it is Gaussian (central limit)
    spec = sfft.rfft2(rng.random(shape, dtype=np.float32) - np.float32(0.5), workers=1)
    fz = sfft.fftfreq(nz)[:, None].astype(np.float32)
    fx = sfft.rfftfreq(nx)[None, :].astype(np.float32)
    out = []
    for sz, sx, sz2, sx2 in specs:
        tf = _gauss_tf(fz, sz) * _gauss_tf(fx, sx)
        if sz2 > 0:
            tf = tf - _gauss_tf(fz, sz2) * _gauss_tf(fx, sx2)
        t = sfft.irfft2(spec * tf, s=shape, workers=1)
        sd = float(t.std())
        if sd > 0:
            t *= np.float32(1.0 / sd)
        out.append(t)
    return out


def _complex_gaussian(rng: np.random.Generator, shape: tuple[int, int], sd: np.ndarray) -> np.ndarray:
    """Circular complex Gaussian scatterer amplitudes with E|a|^2 = sd^2: Rayleigh magnitude, uniform phase."""
    u = rng.random((2, *shape), dtype=np.float32)
    mag = np.sqrt(-np.log1p(-u[0])) * sd  # Rayleigh with E[mag^2] = sd^2
    phase = np.float32(2.0 * np.pi) * u[1]
    out = np.empty(shape, np.complex64)
    out.real = mag * np.cos(phase)
    out.imag = mag * np.sin(phase)
    return out


def _cumsum_depth(a: np.ndarray) -> np.ndarray:
    """Cumulative sum along axis 0 (a row loop is ~3x faster than np.cumsum(axis=0) on C-ordered arrays)."""
    out = np.empty_like(a)
    acc = np.zeros(a.shape[1], a.dtype)
    for i in range(a.shape[0]):
        acc += a[i]
        out[i] = acc
    return out


def _soft_inside(signed_mm: np.ndarray, soft_mm: float) -> np.ndarray:
    """1 inside (negative signed distance), 0 outside, linear ramp of width ``soft_mm``."""
    return np.clip(0.5 - signed_mm / soft_mm, 0.0, 1.0)


@overload
def render_view(patient: NodePatient, rng: np.random.Generator, image_size: int = ...,
                return_mask: Literal[False] = ...) -> np.ndarray: ...
@overload
def render_view(patient: NodePatient, rng: np.random.Generator, image_size: int = ...,
                return_mask: Literal[True] = ...) -> tuple[np.ndarray, np.ndarray]: ...


def render_view(patient: NodePatient, rng: np.random.Generator, image_size: int = 224,
                return_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One B-mode view of ``patient``'s node: new speckle, slightly different plane, angle, position, depth.

    Returns a uint8 array of shape ``(image_size, image_size)`` (rows = depth); with ``return_mask`` also a
    uint8 label mask of the same shape (values in :data:`MASK_LABELS`).
    """
    # Long on purpose: one image's physics reads top to bottom in four marked sections (view, background anatomy,
    # node, acoustics) that share dozens of intermediate arrays; split into functions they would pass them all.
    if image_size < 8:
        raise UserError(f"image size {image_size} is too small for the phantom; use at least 8 px")
    p = patient
    n_out = int(image_size)
    ss = _supersample(n_out)
    n_in = n_out * ss

    # ---- view: probe position, plane and scanner settings ------------------------------------------------
    plane = rng.uniform(0.85, 1.05)  # an off-centre plane cuts a smaller section of the node
    a = p.long_axis_mm / 2 * plane  # semi-axes (mm)
    b = p.long_axis_mm * p.sl_ratio / 2 * plane * rng.uniform(0.92, 1.08)
    fov = float(np.clip(p.fov_mm + rng.uniform(-2.0, 2.0), 20.0, 60.0))
    theta = math.radians(p.angle_deg + rng.normal(0.0, 6.0))
    xc = p.center_x_frac * fov + rng.uniform(-2.5, 2.5)
    top_deep = p.skin_mm + p.fat_mm + p.muscle_mm
    zc = float(np.clip(p.depth_mm + rng.uniform(-1.5, 1.5), max(b + 2.0, top_deep + 0.8 * b), fov - b - 1.0))
    shift_z = zc - p.depth_mm  # the anatomy moves with the node (probe pressure / position)
    gain_level = rng.uniform(0.28, 0.46)  # display level of mean soft-tissue echo
    dyn = p.dynamic_range_db + rng.uniform(-3.0, 3.0)
    focus = zc + rng.uniform(-6.0, 4.0)
    noise_db = rng.uniform(-58.0, -46.0)
    tgc_slope_error = rng.normal(0.0, 0.06)
    show_hilum = p.has_hilum and rng.random() < _check_label(p.label).p_hilum_view

    px = fov / n_in  # mm per internal pixel
    c = SOUND_SPEED_MM_PER_US
    sigma_z_mm = p.n_cycles * c / (2.0 * p.f0_mhz) / 2.355  # round-trip pulse envelope
    wavelength = c / p.f0_mhz
    sigma_x0_mm = wavelength * p.f_number / 2.355 * 1.4  # focal beam width (with apodisation broadening)
    rayleigh_mm = 2.0 * wavelength * p.f_number**2 * 1.5 + 4.0
    sigma_z = sigma_z_mm / px
    max_sigma_x = sigma_x0_mm / px * math.sqrt(1.0 + (fov / rayleigh_mm) ** 2)
    margin = int(math.ceil(3.0 * max(sigma_z, max_sigma_x, 1.0))) + 2
    nz = nx = sfft.next_fast_len(n_in + 2 * margin)
    shape = (nz, nx)
    z = ((np.arange(nz, dtype=np.float32) - margin + 0.5) * px)[:, None]  # depth (mm), column vector
    x = ((np.arange(nx, dtype=np.float32) - margin + 0.5) * px)[None, :]  # lateral (mm), row vector

    mm = 1.0 / px
    t_lobule, t_muscle, t_coarse = _textures(rng, shape, [
        # fat lobules and lymphoma micronodules (echogenic septa at the zero crossings); also used to
        # perturb the shapes of hilum and necrosis (regions that never overlap a reticulated pattern's use)
        (0.5 * mm, 0.6 * mm, 1.3 * mm, 1.5 * mm),
        (0.15 * mm, 2.5 * mm, 0, 0),  # muscle fibrils: thin, laterally elongated striations
        (1.0 * mm, 1.0 * mm, 0, 0),  # coarse heterogeneity of soft tissue and of the node
    ])
    t_fat = t_micro = t_shape = t_lobule

    # ---- background anatomy (dB relative to deep soft tissue) --------------------------------------------
    amp_w, period, phase = p.layer_wave
    tilt = p.layer_tilt + rng.normal(0.0, 0.02)
    wave = amp_w * np.sin(2 * np.pi * x / period + phase) + tilt * (x - fov / 2)
    b_skin = p.skin_mm + 0.0 * x
    b_fat = np.maximum(b_skin + 0.8, p.skin_mm + p.fat_mm + shift_z * 0.3 + wave)
    b_muscle = b_fat + p.muscle_mm + 0.6 * wave
    echo = np.where(z < b_muscle, -6.0 + 2.5 * t_muscle, 0.0 + 1.8 * t_coarse).astype(np.float32)
    fat_db = -6.0 + 7.0 * np.exp(-((t_fat / 0.35) ** 2))
    echo = np.where(z < b_fat, fat_db, echo)
    echo = np.where(z < b_skin, 4.0 + 1.0 * t_coarse, echo)
    echo = np.where(z < 0.0, -80.0, echo)  # coupling gel
    extra = np.zeros(shape, np.float32)  # coherent (specular / point) reflectors, linear amplitude
    extra += 4.0 * np.exp(-(((z - 0.25) / 0.25) ** 2))  # skin entry echo
    extra += rng.uniform(2.0, 4.0) * np.exp(-(((z - b_fat) / 0.18) ** 2))  # superficial fascia
    if p.muscle_mm > 0:
        extra += rng.uniform(2.0, 4.0) * np.exp(-(((z - b_muscle) / 0.18) ** 2))  # deep fascia
    atten = np.full(shape, 1.0, np.float32)  # relative to soft tissue
    atten[z[:, 0] < 0.0, :] = 0.0
    mask = np.zeros(shape, np.uint8)

    if p.vessel is not None:
        vdx, vdz, vr = p.vessel
        vx, vz = xc + vdx, zc + vdz
        vr_z = vr * rng.uniform(0.8, 1.0)
        dv = np.sqrt(((x - vx) / vr) ** 2 + ((z - vz) / vr_z) ** 2)
        inside = _soft_inside((dv - 1.0) * vr, 0.3)
        echo = echo * (1 - inside) + (-38.0 + 2.0 * t_coarse) * inside
        extra += 2.0 * np.exp(-(((dv - 1.0) * vr / 0.25) ** 2)) * (np.abs(z - vz) / (vr_z + 1e-6))
        atten = atten * (1 - inside) + 0.05 * inside
        mask[inside > 0.5] = 5

    # ---- the node -----------------------------------------------------------------------------------------
    half = (a * 1.4 + 2.0) / px
    r0, r1 = max(0, int(zc / px + margin - half)), min(nz, int(zc / px + margin + half) + 1)
    c0, c1 = max(0, int(xc / px + margin - half)), min(nx, int(xc / px + margin + half) + 1)
    zz, xx = z[r0:r1] - zc, x[:, c0:c1] - xc
    ct, st = math.cos(theta), math.sin(theta)
    u = (ct * xx + st * zz) / a  # node-normalised coordinates: u along the long axis
    v = (-st * xx + ct * zz) / b
    rn = np.sqrt(u**2 + v**2)
    phi = np.arctan2(v, u)
    rho = np.ones_like(rn)
    for k, amp_k, ph_k in p.border_harmonics:
        rho += amp_k * np.cos(k * phi + ph_k)
    signed = (rn - rho) * b  # ~ mm outside the border
    w_node = _soft_inside(signed, 0.25)
    sl_z, sl_x = slice(r0, r1), slice(c0, c1)
    tc, tm, ts = t_coarse[sl_z, sl_x], t_micro[sl_z, sl_x], t_shape[sl_z, sl_x]

    node_db = p.cortex_db + p.texture_db * tc
    if p.reticulation_db > 0:  # hypoechoic micronodules separated by thin echogenic septa
        node_db = node_db + p.reticulation_db * (np.exp(-((tm / 0.25) ** 2)) - 0.15)
    node_att = np.full_like(rn, p.attenuation_factor)
    node_mask = np.where(w_node > 0.5, 1, 0).astype(np.uint8)
    if show_hilum:
        hu = p.hilum_offset
        dh = np.sqrt(((u - hu) / p.hilum_length) ** 2 + (v / p.hilum_width) ** 2) + 0.12 * ts
        w_h = _soft_inside((dh - 1.0) * b * p.hilum_width, 0.3)
        if rng.random() < 0.6:  # the plane cuts the hilar notch: fat band continuous with perinodal fat
            half_w = (0.3 + 0.25 * ts) * p.hilum_width * b  # mm
            dch = np.abs(u - hu) * a - half_w
            w_h = np.maximum(w_h, _soft_inside(dch, 0.3) * np.clip(4.0 * v * p.hilum_side, 0.0, 1.0))
        w_h = w_h * w_node
        node_db = node_db * (1 - w_h) + (p.hilum_db + 1.5 * tm) * w_h
        node_mask[(w_h > 0.5) & (node_mask == 1)] = 2
    for nu, nv, nr in p.necrosis:
        dn = np.sqrt((u - nu) ** 2 + (v - nv) ** 2) / nr + 0.25 * ts
        w_n = _soft_inside((dn - 1.0) * nr * b, 0.3) * w_node
        node_db = node_db * (1 - w_n) + (-40.0 + 3.0 * tc) * w_n
        node_att = node_att * (1 - w_n) + 0.05 * w_n
        node_mask[(w_n > 0.5)] = 3
    region = echo[sl_z, sl_x]
    echo[sl_z, sl_x] = region * (1 - w_node) + node_db * w_node
    atten[sl_z, sl_x] = atten[sl_z, sl_x] * (1 - w_node) + node_att * w_node
    # capsule: specular echo, strongest where the border faces the beam (top and bottom of the node)
    if p.capsule_db > 0:
        facing = np.abs(zz) / np.sqrt(zz**2 + xx**2 + 1e-6)
        capsule = np.exp(-((signed / 0.2) ** 2)) * (0.25 + 0.75 * facing)
        extra[sl_z, sl_x] += (10 ** (p.capsule_db / 20) - 1.0) * capsule
    for cu, cv, cr in p.calcifications:
        cx = xc + (ct * cu * a - st * cv * b)
        cz = zc + (st * cu * a + ct * cv * b)
        d2 = (x[:, c0:c1] - cx) ** 2 + (z[r0:r1] - cz) ** 2
        spot = np.exp(-d2 / (2 * cr**2))
        extra[sl_z, sl_x] += rng.uniform(4.0, 10.0) * spot
        atten[sl_z, sl_x] += (12.0 * cr / 0.3) * spot / np.float32(TISSUE_ATTENUATION_DB_PER_MM_MHZ * p.f0_mhz)
        node_mask[spot > 0.5] = 4
    mask[sl_z, sl_x] = np.where(node_mask > 0, node_mask, mask[sl_z, sl_x])

    # ---- acoustics: scatterers, attenuation, PSF, noise, TGC ------------------------------------------------
    alpha = TISSUE_ATTENUATION_DB_PER_MM_MHZ * p.f0_mhz  # dB/mm round trip
    att_db = (_cumsum_depth(atten) - 0.5 * atten) * np.float32(alpha * px)  # attenuation to the pixel and back
    amp = (np.exp(echo * np.float32(LN10 / 20.0)) + extra) * np.exp(att_db * np.float32(-LN10 / 20.0))
    noise_amp = 10.0 ** (noise_db / 20.0)  # receiver noise, white before beamforming, added in quadrature
    field_ = _complex_gaussian(rng, shape, np.sqrt(amp**2 + np.float32(noise_amp**2)))

    # lateral beam: Gaussian whose width follows a focused beam profile along depth
    zf = z[:, 0] - focus
    sigma_x = (sigma_x0_mm * np.sqrt(1.0 + (zf / rayleigh_mm) ** 2)) / px
    tf_x = _gauss_tf(sfft.fftfreq(nx).astype(np.float32)[None, :], sigma_x.astype(np.float32)[:, None])
    tf_x /= np.sqrt(np.mean(tf_x**2, axis=1, keepdims=True))  # unit energy per depth
    spec = sfft.fft(field_, axis=1, workers=1)
    spec *= tf_x
    field_ = sfft.ifft(spec, axis=1, workers=1)
    # axial pulse: Gaussian-windowed carrier (analytic signal), applied as a circular convolution
    k_off = np.arange(nz)
    k_off = np.where(k_off > nz // 2, k_off - nz, k_off).astype(np.float64) * px  # mm
    pulse = np.exp(-0.5 * (k_off / sigma_z_mm) ** 2) * np.exp(1j * 2 * np.pi * (2 * p.f0_mhz / c) * k_off)
    pulse /= np.sqrt(np.sum(np.abs(pulse) ** 2))
    tf_z = sfft.fft(pulse)[:, None].astype(np.complex64)
    field_ = sfft.ifft(sfft.fft(field_, axis=0, workers=1) * tf_z, axis=0, workers=1)

    # TGC: nominal attenuation slope with an error, plus smooth slider bumps
    depth_mm = z[:, 0]
    sliders = rng.normal(0.0, 1.5, size=8)
    bumps = np.interp(depth_mm, np.linspace(0, fov, 8), sliders)
    tgc_db = alpha * (1.0 + tgc_slope_error) * np.clip(depth_mm, 0, None) + bumps
    inten = (field_.real**2 + field_.imag**2) * (10.0 ** (tgc_db / 10.0))[:, None]
    inten = inten[margin:margin + n_in, margin:margin + n_in]
    gray = np.clip(gain_level + (10.0 / dyn) * np.log10(inten + 1e-12), 0.0, 1.0)
    if ss > 1:  # area-average the displayed image, as resizing a finer scan would
        gray = gray.reshape(n_out, ss, n_out, ss).mean(axis=(1, 3))
    img = np.round(gray * 255.0).astype(np.uint8)
    if not return_mask:
        return img
    m = mask[margin:margin + n_in, margin:margin + n_in][ss // 2::ss, ss // 2::ss]
    return img, np.ascontiguousarray(m)


@overload
def render_node(label: str, rng: np.random.Generator, image_size: int = ...,
                return_mask: Literal[False] = ...) -> np.ndarray: ...
@overload
def render_node(label: str, rng: np.random.Generator, image_size: int = ...,
                return_mask: Literal[True] = ...) -> tuple[np.ndarray, np.ndarray]: ...


def render_node(label: str, rng: np.random.Generator, image_size: int = 224,
                return_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One synthetic B-mode image (uint8, shape (image_size, image_size), grayscale) of the given class.

    A new patient is drawn from ``rng`` each call; use :func:`sample_patient` and :func:`render_view` for
    several views of one node. With ``return_mask=True`` returns ``(image, mask)``; see :data:`MASK_LABELS`.
    """
    return render_view(sample_patient(label, rng), rng, image_size,  # type: ignore[call-overload]
                       return_mask=return_mask)


def patient_sizes(n_images: int, images_per_patient: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """Split ``n_images`` into patients of ``lo..hi`` images each (as evenly random as possible).

    Where no split fits (``n_images < lo``, or e.g. 11 with (8, 10)), the fewest patients are used and the
    sizes are as even as possible, so a few patients may fall outside ``lo..hi``.
    """
    lo, hi = images_per_patient
    if n_images <= 0:
        return []
    p_min, p_max = math.ceil(n_images / hi), n_images // lo
    if p_min > p_max:
        n_pat = max(1, p_min if n_images >= lo else 1)
        base, rem = divmod(n_images, n_pat)
        return [base + (1 if i < rem else 0) for i in range(n_pat)]
    target = round(n_images / ((lo + hi) / 2))
    n_pat = int(min(max(target, p_min), p_max))
    sizes = [lo] * n_pat
    for _ in range(n_images - lo * n_pat):
        open_ = [i for i, s in enumerate(sizes) if s < hi]
        sizes[int(open_[int(rng.integers(len(open_)))])] += 1
    return sizes


def patients_per_class(n_per_class: int, images_per_patient: tuple[int, int] = PHANTOM_IMAGES_PER_PATIENT) -> int:
    """How many synthetic patients :func:`generate_phantom` makes per class (the count does not depend on the seed)."""
    return len(patient_sizes(n_per_class, images_per_patient, np.random.default_rng(0)))


def min_images_per_class(folds: int, images_per_patient: tuple[int, int] = PHANTOM_IMAGES_PER_PATIENT) -> int:
    """The smallest ``n_per_class`` that gives every class ``folds`` patients: grouped folds never split one."""
    n = folds
    while patients_per_class(n, images_per_patient) < folds:
        n += 1
    return n


#: The paper's class proportions (its authors' counts, :data:`ussf_lib.paper.PAPER_DATASET`), as weights per class:
#: normal 1217, benign 601, primary 236, metastatic 1338 images, so the largest class has 5.7 times the smallest.
PAPER_CLASS_RATIO: dict[str, float] = {str(k): float(v) for k, v in PAPER_DATASET["class_counts"].items()}  # type: ignore[union-attr]

#: What ``class_ratio`` takes: ``None`` (balanced), ``"paper"``, weights in class order (``"5.7,1,1,1"`` or a
#: sequence) or weights by class name (a mapping; classes not named get none and are refused).
ClassRatio = str | Sequence[float] | Mapping[str, float] | None


def class_counts(n_per_class: int, class_ratio: ClassRatio = None,
                 classes: Sequence[str] = PAPER_CLASSES) -> dict[str, int]:
    """Images per class of a phantom: ``n_per_class`` each when ``class_ratio`` is ``None`` (balanced), else the
    class with the largest weight gets ``n_per_class`` and every other class ``round(n_per_class * weight /
    largest weight)``, at least 1. ``class_ratio="paper"`` uses the paper's proportions
    (:data:`PAPER_CLASS_RATIO`); ``"5.7,1,1,1"`` or ``[5.7, 1, 1, 1]`` gives weights in the order of ``classes``.
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    classes = tuple(classes)
    n = int(n_per_class)
    if class_ratio is None or (isinstance(class_ratio, str) and class_ratio.strip().lower() in ("", "balanced")):
        return {c: n for c in classes}
    weights = _ratio_weights(class_ratio, classes)
    top = max(weights.values())
    return {c: max(1, int(round(n * weights[c] / top))) for c in classes}


def _ratio_weights(class_ratio: ClassRatio, classes: tuple[str, ...]) -> dict[str, float]:
    """``class_ratio`` as one positive weight per class (see :func:`class_counts`); anything else a UserError."""
    hint = (f"use 'paper', or {len(classes)} positive weights in class order ({', '.join(classes)}), "
            "e.g. --class-ratio 5.7,1,1,1")
    if isinstance(class_ratio, str) and class_ratio.strip().lower() == "paper":
        missing = [c for c in classes if c not in PAPER_CLASS_RATIO]
        if missing:
            raise UserError(f"--class-ratio paper: the paper has no class {missing[0]!r}; give weights instead ({hint})")
        return {c: PAPER_CLASS_RATIO[c] for c in classes}
    if isinstance(class_ratio, Mapping):
        unknown = sorted(set(class_ratio) - set(classes))
        missing = [c for c in classes if c not in class_ratio]
        if unknown or missing:
            raise UserError(f"--class-ratio {dict(class_ratio)}: "
                            + (f"no class {unknown[0]!r}" if unknown else f"no weight for {missing[0]!r}") + f"; {hint}")
        values = [class_ratio[c] for c in classes]
    else:
        items = class_ratio.split(",") if isinstance(class_ratio, str) else list(class_ratio)  # type: ignore[arg-type]
        try:
            values = [float(v) for v in items]
        except (TypeError, ValueError):
            raise UserError(f"--class-ratio {class_ratio!r} is not a list of numbers; {hint}") from None
        if len(values) != len(classes):
            raise UserError(f"--class-ratio {class_ratio!r} gives {len(values)} weight(s) for {len(classes)} "
                            f"classes; {hint}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--class-ratio {class_ratio!r}: every weight must be a positive number; {hint}")
    return dict(zip(classes, values))


#: Written beside the manifest by :func:`generate_phantom`. A manifest alone proves nothing: ``path,label,patient``
#: is also the layout users are told to give their own data, and regenerating deletes the listed images.
PHANTOM_MARKER = ".ussf-phantom.json"

#: The only file names the phantom writes: ``<class>/<class>_p<patient>_<view>.png``.
_PHANTOM_IMAGE = re.compile(r"(?P<label>[a-z]+)/(?P=label)_p\d+_\d+\.png")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_phantom_folder(out: str | Path) -> bool:
    """True if ``out`` is a phantom written by :func:`generate_phantom` and left as written: its marker file
    names the generator and the SHA-256 of the ``manifest.csv`` beside it."""
    out = Path(out)
    manifest, marker = out / "manifest.csv", out / PHANTOM_MARKER
    if not (manifest.is_file() and marker.is_file()):
        return False
    try:
        stamp = json.loads(marker.read_text(encoding="utf-8"))
        return (isinstance(stamp, dict) and stamp.get("generator") == "ussf_lib.data.phantom"
                and stamp.get("manifest_sha256") == _sha256(manifest))
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def _clear_previous(out: Path) -> None:
    """Delete the images a previous phantom listed in its manifest, if named as the phantom names them (nothing
    else), then the class folders left empty, the manifest and the marker."""
    manifest = out / "manifest.csv"
    root = out.resolve()
    dirs: set[Path] = set()
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rel = (row.get("path") or "").strip()
            target = (out / rel).resolve()
            if (_PHANTOM_IMAGE.fullmatch(rel) and root in target.parents and target.is_file()
                    and target.relative_to(root).as_posix() == rel):
                target.unlink()
                dirs.add(target.parent)
    for d in sorted(dirs, reverse=True):
        if d != root and not any(d.iterdir()):
            d.rmdir()
    manifest.unlink()
    (out / PHANTOM_MARKER).unlink()


def _patient_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, class, patient): the first patients do not change with n_per_class."""
    key = [abs(int(seed)), int(int(seed) < 0), zlib.crc32(label.encode()), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def generate_phantom(out: str | Path, n_per_class: int = 250, image_size: int = 224, seed: int = 0,
                     classes: Sequence[str] = PAPER_CLASSES,
                     images_per_patient: tuple[int, int] = PHANTOM_IMAGES_PER_PATIENT,
                     progress: bool = False, class_ratio: ClassRatio = None) -> Path:
    """Write ``OUT/<class>/<patient>_<k>.png`` for each class plus ``OUT/manifest.csv`` (``path,label,patient``).

    Balanced by default: ``n_per_class`` images in every class. ``class_ratio`` unbalances it as
    :func:`class_counts` says (``"paper"``: the paper's 5.7:1 proportions; ``"5.7,1,1,1"``: weights in class
    order), the largest class keeping ``n_per_class``. A class's first patients and images do not depend on how
    many it gets, so an unbalanced phantom holds a subset of the balanced one's patients.

    ``path`` is relative to OUT with forward slashes. Returns the manifest path. Deterministic by ``seed``
    (same seed, same bytes). Each synthetic patient contributes ``images_per_patient`` views of one node, so
    cross-validation must group by patient. Patient ids are unique across classes (``normal_p003``).
    An existing OUT must be empty or a previous phantom, recognized by its :data:`PHANTOM_MARKER` file and
    unchanged manifest (its listed images are replaced); anything else raises :class:`UserError`.
    """
    out = Path(out)
    classes = tuple(classes)
    if not classes:
        raise UserError("no classes given for the phantom; use some of " + ", ".join(PHANTOM_CLASSES))
    for c in classes:
        _check_label(c)
    if len(set(classes)) != len(classes):
        raise UserError(f"phantom classes repeat a name: {', '.join(classes)}; list each class once")
    if int(n_per_class) < 1:
        raise UserError(f"--n-per-class must be at least 1 (got {n_per_class})")
    counts = class_counts(int(n_per_class), class_ratio, classes)  # checks class_ratio before anything is written
    if int(image_size) < 8:
        raise UserError(f"--image-size must be at least 8 px for the phantom (got {image_size})")
    lo, hi = (int(v) for v in images_per_patient)
    if not 1 <= lo <= hi:
        raise UserError(f"images per patient must satisfy 1 <= lo <= hi (got {images_per_patient})")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another --out for the phantom")
    if out.is_dir() and any(out.iterdir()):
        if not is_phantom_folder(out):
            raise UserError(f"{out} is not empty and is not a phantom left as ussf wrote it ({PHANTOM_MARKER} and "
                            "its manifest.csv); choose a new or empty --out folder (the phantom never writes into "
                            "other data)")
        _clear_previous(out)
    out.mkdir(parents=True, exist_ok=True)

    plan: list[tuple[str, str, int, int]] = []  # (label, patient id, patient index, n views)
    for label in classes:
        sizes = patient_sizes(counts[label], (lo, hi), _patient_rng(seed, label, 0xFFFFFFFF))
        width = max(3, len(str(len(sizes) - 1)))
        plan += [(label, f"{label}_p{i:0{width}d}", i, s) for i, s in enumerate(sizes)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(counts.values()), desc="phantom", unit="img")
    rows: list[tuple[str, str, str]] = []
    for label, pid, index, n_views in plan:
        (out / label).mkdir(exist_ok=True)
        rng = _patient_rng(seed, label, index)
        patient = sample_patient(label, rng)
        for k in range(n_views):
            img = render_view(patient, rng, int(image_size))
            rel = f"{label}/{pid}_{k:02d}.png"
            Image.fromarray(img).save(out / rel, format="PNG", compress_level=1)  # speckle barely compresses
            rows.append((rel, label, pid))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "patient"])
    writer.writerows(rows)
    manifest = out / "manifest.csv"
    manifest.write_text(buf.getvalue(), encoding="utf-8")
    marker = {"generator": "ussf_lib.data.phantom", "manifest_sha256": _sha256(manifest), "n_per_class": int(n_per_class),
              "image_size": int(image_size), "seed": int(seed), "classes": list(classes)}
    if set(counts.values()) != {int(n_per_class)}:  # a balanced phantom's marker stays as it always was
        marker["class_counts"] = counts
    (out / PHANTOM_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return manifest


if __name__ == "__main__":  # python -m ussf_lib.data.phantom [N_PER_CLASS] [IMAGE_SIZE]: timing of one generation
    import sys
    import tempfile
    import time

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 250
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        generate_phantom(Path(tmp) / "phantom", n_per_class=n, image_size=size, seed=0)
        dt = time.perf_counter() - t0
    print(f"{n * len(PHANTOM_CLASSES)} images at {size} px in {dt:.1f} s "
          f"({1000 * dt / (n * len(PHANTOM_CLASSES)):.1f} ms/image, one process)")

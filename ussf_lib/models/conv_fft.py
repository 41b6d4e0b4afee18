"""The Conv-FFT block of US-SFNet (paper section 2.2): identity + spatial branch + frequency branch, then GELU.

Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.

The paper's figure gives the branch order (PW-Conv -> Conv3x3 -> PW-Conv in the spatial branch,
RFFT -> Conv3x3 -> Conv3x3 -> IRFFT in the frequency branch) but not the normalization, the
activations inside the branches, the channel widths or the FFT scaling; each of those is a
constructor argument here, with the default chosen and justified in :class:`ConvFFTBlock`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ussf_lib.errors import UserError

#: ``norm=`` values accepted by ``torch.fft.rfft2`` / ``irfft2``.
FFT_NORMS: tuple[str, ...] = ("ortho", "backward", "forward")

#: Branches a :class:`ConvFFTBlock` can have besides its identity path (the paper's block has both).
BRANCHES: tuple[str, ...] = ("spatial", "freq")

#: How the frequency branch turns a ``(C, H, W)`` feature map into the ``(2C, H, W//2+1)`` tensor its
#: convolutions take, and back: ``"rfft2"`` (the paper's half spectrum, real and imaginary parts stacked) or
#: ``"polyphase"`` (the same shape from the even and odd columns, no Fourier transform: the ``_nofft`` ablation).
FREQ_TRANSFORMS: tuple[str, ...] = ("rfft2", "polyphase")

NormLayer = Callable[[int], nn.Module] | None
ActLayer = Callable[[], nn.Module]


def conv_norm_act(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    *,
    stride: int = 1,
    groups: int = 1,
    norm_layer: NormLayer = nn.BatchNorm2d,
    act_layer: ActLayer | None = None,
) -> nn.Sequential:
    """``Conv2d`` (same padding) -> norm (if ``norm_layer``) -> activation (if ``act_layer``).

    The convolution has a bias only when no norm follows it (a norm's shift makes a bias redundant).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups,
                  bias=norm_layer is None)
    ]
    if norm_layer is not None:
        layers.append(norm_layer(out_ch))
    if act_layer is not None:
        layers.append(act_layer())
    return nn.Sequential(*layers)


class SpatialBranch(nn.Module):
    """Central branch: PW-Conv -> norm -> act -> Conv3x3 -> norm -> act -> PW-Conv -> norm.

    No activation after the last PW-Conv: the block applies GELU after summing the three branches.
    ``hidden`` channels sit between the two point-wise convolutions.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """

    def __init__(self, channels: int, hidden: int, *, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = nn.GELU) -> None:
        super().__init__()
        self.pw1 = conv_norm_act(channels, hidden, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.conv = conv_norm_act(hidden, hidden, 3, norm_layer=norm_layer, act_layer=act_layer)
        self.pw2 = conv_norm_act(hidden, channels, 1, norm_layer=norm_layer, act_layer=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.pw2(self.conv(self.pw1(x)))


class FrequencyBranch(nn.Module):
    """Upper branch: ``rfft2`` -> [real | imag] as 2C channels -> Conv3x3 -> norm -> act -> Conv3x3 -> norm
    -> split into real/imag -> ``irfft2`` back to the input's exact ``(H, W)``.

    Precision under ``torch.autocast``: ``rfft2`` and ``irfft2`` always run in float32 (float64 in a float64 model) with autocast
    disabled (torch's FFT has no bfloat16 kernels and its float16 kernels need power-of-two sizes). The two
    convolutions between them follow autocast like every other convolution (``freq_autocast=True``,
    default): they hold about three quarters of the network's MACs; in float32 they left ``--amp bf16``
    1.36x faster than float32 in training and no faster in inference on a GPU (docs/performance.md).
    ``freq_autocast=False`` keeps the whole branch in float32. The result is cast back to the input's dtype. Do not cast the model itself to a low precision
    (``model.bfloat16()``): use autocast.

    Speed, not maths: each transform is an autograd Function that writes the spectrum once, straight in the
    dtype and memory format the convolutions take, and differentiates ``rfft2`` through a half-spectrum
    ``irfft2`` instead of torch's full complex transform; on an H100 that cut US-SFNet's training step from
    57.5 to 47.4 ms of device time (docs/performance.md). Values and gradients are those of the plain
    formulation (tests/test_models.py).

    ``groups=1`` (default) mixes real and imaginary parts of all channels in both convolutions, like the
    Fourier unit of Fast Fourier Convolution (Chi et al., 2020); ``groups=2`` convolves real and
    imaginary parts separately; ``groups=2*C`` is depthwise.

    ``transform="polyphase"`` (the ``_nofft`` ablation; ``"rfft2"`` is the paper's branch) keeps the same two
    convolutions, norms, activation, dtypes and memory formats and replaces only the two transforms, by
    :func:`width_polyphase` and :func:`width_interleave`: the input, zero-padded on the right to ``2*(W//2+1)``
    columns, is split into its even and its odd columns, stacked as ``[even | odd]`` 2C channels of
    ``H x (W//2+1)`` (where the spectrum stacks ``[real | imag]``), and the convolutions' output is interleaved
    back and cropped to ``W``. Both maps are linear and lossless and give the convolutions a tensor of exactly
    the spectrum's shape, so the parameters and the convolutions' MACs are the paper's branch's exactly; what
    changes is the basis the convolutions see (pixels instead of Fourier coefficients: a local receptive field
    of 3 rows by 6 columns per convolution instead of a global one). ``fft_norm`` is then unused.
    Rejected alternatives: ``x`` stacked with zeros or with a shifted copy at full width (``2C x H x W``) would
    leave half the weights idle or double the convolutions' MACs; pooling the width to ``W//2+1`` would match
    the MACs but lose half the input and need an upsampling back. The polyphase split matches both the shape
    and the information content (``2C x H x (W//2+1)`` real numbers holding all of ``x``, as the spectrum does).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """

    def __init__(self, channels: int, *, fft_norm: str = "ortho", groups: int = 1,
                 norm_layer: NormLayer = nn.BatchNorm2d, act_layer: ActLayer = nn.GELU,
                 freq_autocast: bool = True, transform: str = "rfft2") -> None:
        super().__init__()
        self.freq_autocast = freq_autocast
        if fft_norm not in FFT_NORMS:
            raise UserError(f"fft_norm={fft_norm!r} is not a torch.fft norm; use one of {', '.join(FFT_NORMS)}")
        if transform not in FREQ_TRANSFORMS:
            raise UserError(f"freq_transform={transform!r} is not known; use one of {', '.join(FREQ_TRANSFORMS)}")
        self.transform = transform
        width = 2 * channels
        if groups < 1 or width % groups:
            raise UserError(f"freq_groups={groups} must divide 2*channels={width}; use 1, 2 or {width}")
        self.fft_norm = fft_norm
        self.convs = nn.Sequential(
            conv_norm_act(width, width, 3, groups=groups, norm_layer=norm_layer, act_layer=act_layer),
            conv_norm_act(width, width, 3, groups=groups, norm_layer=norm_layer, act_layer=None),
        )

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        device_type = x.device.type
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        no_autocast = torch.autocast(device_type=device_type, enabled=False)
        conv_dtype = _fft_dtype(x.dtype)
        # Autocast leaves float64 alone (it lowers float32 only), so a float64 model stays float64 here too.
        if self.freq_autocast and torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
            conv_dtype = torch.get_autocast_dtype(device_type)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        fourier = self.transform == "rfft2"  # fixed at construction: no data-dependent branching when compiled
        if fourier:
            stacked = _RealSpectrum.apply(x, self.fft_norm, conv_dtype, fmt)  # (B, 2C, H, W//2+1): [real | imag]
        else:
            stacked = width_polyphase(x).to(conv_dtype, memory_format=fmt)  # (B, 2C, H, W//2+1): [even | odd]
        if self.freq_autocast:
            z = self.convs(stacked)  # in autocast's dtype when autocast is on
        else:
            with no_autocast:
                z = self.convs(stacked)
        # Back in the input's dtype and memory format, so the block's sum adds like-for-like tensors.
        if fourier:
            return _SpatialFromSpectrum.apply(z, (height, width), self.fft_norm, x.dtype, fmt)
        return width_interleave(z, width).to(x.dtype, memory_format=fmt)


def width_polyphase(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, 2C, H, W//2+1)``: the even columns, then the odd columns, of ``x`` zero-padded on
    the right to ``2*(W//2+1)`` columns (two zero columns for an even ``W``, one for an odd ``W``).

    The spatial stand-in for ``rfft2`` in the ``_nofft`` ablation (see :class:`FrequencyBranch`): the same output
    shape as the stacked half spectrum, linear and lossless (:func:`width_interleave` undoes it), no Fourier
    transform. Plain tensor operations, so autograd differentiates it and ``torch.compile`` traces it.
    """
    columns = x.shape[-1] // 2 + 1
    padded = F.pad(x, (0, 2 * columns - x.shape[-1]))
    return torch.cat((padded[..., 0::2], padded[..., 1::2]), dim=1)


def width_interleave(z: Tensor, width: int) -> Tensor:
    """Inverse of :func:`width_polyphase`: ``(B, 2C, H, W//2+1)`` ``[even | odd]`` -> ``(B, C, H, width)``."""
    even, odd = z.chunk(2, dim=1)
    return torch.stack((even, odd), dim=-1).flatten(-2)[..., :width]


#: The norm whose scale factor is the adjoint's: the adjoint of an FFT scaled by 1/n is the inverse summed and
#: scaled by 1/n, which is the inverse FFT with the swapped norm.
_ADJOINT_NORM = {"backward": "forward", "forward": "backward", "ortho": "ortho"}


def _fft_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the FFTs run in: float64 for a float64 model (exact gradient checks), else float32 (torch's
    FFT has no bfloat16 kernels, and float16 ones only for power-of-two sizes)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _half_spectrum_weights(width: int, columns: int, double: bool, device: torch.device) -> Tensor:
    """Per-column weights of a half spectrum: 1 for the DC column (and the Nyquist one of an even width); the
    columns that stand for a conjugate pair weigh 2 (``double``) or 1/2.

    Cached in eager mode: every backward pass of every block asks for one of a few never-modified vectors, and
    building one on a GPU costs a host-to-device copy in a step that is already launch-bound. A compiled graph
    holds it as a constant (and dynamo warns about cached functions), so tracing builds it directly.
    """
    if torch.compiler.is_compiling():
        return _build_half_spectrum_weights(width, columns, double, device)
    return _cached_half_spectrum_weights(width, columns, double, device)


def _build_half_spectrum_weights(width: int, columns: int, double: bool, device: torch.device) -> Tensor:
    weights = [1.0 if k == 0 or 2 * k == width else (2.0 if double else 0.5) for k in range(columns)]
    return torch.tensor(weights, device=device)


_cached_half_spectrum_weights = functools.lru_cache(maxsize=64)(_build_half_spectrum_weights)


class _RealSpectrum(torch.autograd.Function):
    """``rfft2`` (float32) with real and imaginary parts stacked as channels, and a cheaper exact backward.

    torch differentiates ``rfft2`` by zero-padding the gradient to the full spectrum and running a complex
    ``c2c`` transform over it; the adjoint of a half-spectrum transform is also ``irfft2`` of the gradient with
    its paired columns halved, which reads and writes half as much (tests/test_models.py checks both agree).
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm: str, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
        ctx.norm, ctx.size, ctx.in_dtype, ctx.fmt = norm, tuple(x.shape[-2:]), x.dtype, fmt
        with torch.autocast(x.device.type, enabled=False):
            # One copy casts to float32 and lays the planes out as cuFFT wants them (no copy inside rfft2).
            spec = torch.fft.rfft2(x.to(_fft_dtype(x.dtype), memory_format=torch.contiguous_format), norm=norm)
            return _stack_real_imag(spec, dtype, fmt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        weights = _half_spectrum_weights(ctx.size[-1], grad.shape[-1], double=False, device=grad.device)
        spec_grad = _unstack_real_imag(grad, weights)
        x_grad = torch.fft.irfft2(spec_grad, s=ctx.size, norm=_ADJOINT_NORM[ctx.norm])
        return x_grad.to(ctx.in_dtype, memory_format=ctx.fmt), None, None, None


class _SpatialFromSpectrum(torch.autograd.Function):
    """Inverse of :class:`_RealSpectrum`: stacked ``[real | imag]`` channels -> ``irfft2`` -> ``dtype``, ``fmt``."""

    @staticmethod
    def forward(ctx, z: Tensor, size: tuple[int, int], norm: str, dtype: torch.dtype,
                fmt: torch.memory_format) -> Tensor:
        ctx.norm, ctx.width, ctx.z_dtype, ctx.fmt = norm, size[-1], z.dtype, fmt
        with torch.autocast(z.device.type, enabled=False):
            y = torch.fft.irfft2(_unstack_real_imag(z), s=size, norm=norm)
            return y.to(dtype, memory_format=fmt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        spec = torch.fft.rfft2(grad.to(_fft_dtype(grad.dtype), memory_format=torch.contiguous_format),
                               norm=_ADJOINT_NORM[ctx.norm])
        weights = _half_spectrum_weights(ctx.width, spec.shape[-1], double=True, device=grad.device)
        return _stack_real_imag(spec, ctx.z_dtype, ctx.fmt, weights), None, None, None, None


def _stack_real_imag(spec: Tensor, dtype: torch.dtype, fmt: torch.memory_format,
                     column_weights: Tensor | None = None) -> Tensor:
    """``cat([spec.real, spec.imag], dim=1)`` as ``dtype`` in memory format ``fmt``, written by one kernel
    (which also multiplies each frequency column by ``column_weights``, if given).

    The eager ``cat`` -> autocast cast -> cuDNN layout change took three copies of the spectrum; here the
    real/imaginary axis of ``view_as_real`` is moved beside the channels and written once.
    """
    b, c, h, w = spec.shape
    parts = torch.view_as_real(spec)  # (B, C, H, W', 2) float32 view, no copy
    if fmt == torch.channels_last:  # memory (B, H, W', 2, C) is (B, 2C, H, W') in channels-last
        out = _dense_copy(parts.permute(0, 2, 3, 4, 1), dtype, column_weights, (-1, 1, 1))
        return out.reshape(b, h, w, 2 * c).permute(0, 3, 1, 2)
    return _dense_copy(parts.permute(0, 4, 1, 2, 3), dtype, column_weights, (-1,)).reshape(b, 2 * c, h, w)


def _unstack_real_imag(z: Tensor, column_weights: Tensor | None = None) -> Tensor:
    """Inverse of :func:`_stack_real_imag`: ``(B, 2C, H, W')`` real -> ``(B, C, H, W')`` complex, one kernel."""
    parts = z.unflatten(1, (2, z.shape[1] // 2)).permute(0, 2, 3, 4, 1)  # (B, C, H, W', 2), a view in either format
    return torch.view_as_complex(_dense_copy(parts, _fft_dtype(z.dtype), column_weights, (-1, 1)))


def _dense_copy(t: Tensor, dtype: torch.dtype, column_weights: Tensor | None = None,
                weight_shape: tuple[int, ...] = (-1,)) -> Tensor:
    """``t`` written contiguously as ``dtype``, times ``column_weights`` (viewed as ``weight_shape``) if given."""
    if column_weights is None:
        # copy=True: without it ``.to`` may hand back a permuted view of the same dtype unchanged.
        return t.to(dtype, memory_format=torch.contiguous_format, copy=True)
    weights = column_weights.view(weight_shape)
    if torch.compiler.is_compiling():  # traced graphs have no out= buffers; inductor fuses the two steps anyway
        return (t * weights).to(dtype, memory_format=torch.contiguous_format, copy=True)
    return torch.mul(t, weights, out=torch.empty(t.shape, dtype=dtype, device=t.device))


class ConvFFTBlock(nn.Module):
    """Conv-FFT block: ``out = GELU(x + spatial(x) + freq(x))`` (paper section 2.2, Fig. 2).

    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.

    Ablations (the registry's ``us_sfnet*_nofreq``, ``_nospatial``, ``_nofft``) are this block with other
    ``branches`` / ``freq_transform``: ``branches=("spatial",)`` gives ``GELU(x + spatial(x))`` and no
    frequency-branch modules at all (``self.freq is None``), ``branches=("freq",)`` gives ``GELU(x + freq(x))``
    (``self.spatial is None``), ``freq_transform="polyphase"`` keeps both branches and every parameter but
    runs the frequency branch's convolutions without ``rfft2`` / ``irfft2`` (see :class:`FrequencyBranch`).

    Args:
        channels: input = output channels C (the block keeps the shape of its input).
        fft_norm: ``torch.fft`` scaling, ``"ortho"`` by default: the spectrum then has the same energy
            as the feature map (Parseval), so the frequency convolutions see values on the same scale
            at every resolution, and ``irfft2(rfft2(x)) == x`` whatever the scaling. The paper is silent.
        spatial_expansion: hidden width of the spatial branch as a multiple of C; 1.0 by default (the
            paper names no bottleneck or inverted bottleneck, so the width is kept).
        freq_groups: groups of the two frequency Conv3x3s, which act on 2C channels (real and imaginary
            parts stacked) and keep 2C channels; 1 by default (a plain "Conv3x3", as the paper says).
        norm_layer: normalization after every convolution, ``nn.BatchNorm2d`` by default (the paper's
            stem uses BatchNorm and the figure shows no other norm); ``None`` removes the norms and gives
            the convolutions a bias.
        freq_autocast: whether the frequency branch's convolutions follow ``torch.autocast`` (True,
            default) or stay float32 with its FFTs (False); see :class:`FrequencyBranch`.
        act_layer: activation between the convolutions of a branch, ``nn.GELU`` by default (the paper's
            only activation). The last convolution of each branch has a norm and no activation, since
            the block applies ``nn.GELU`` to the sum of the branches (ResNet's placement). That final
            activation is always GELU, as in the paper, whatever ``act_layer`` is.
        branches: which of :data:`BRANCHES` the block has, ``("spatial", "freq")`` by default (the paper's
            block); at least one. A branch left out is not built (its attribute is ``None``) and its
            arguments (``spatial_expansion``; ``fft_norm``, ``freq_groups``, ``freq_transform``) are unused.
        freq_transform: one of :data:`FREQ_TRANSFORMS`: ``"rfft2"`` (default, the paper's) or
            ``"polyphase"`` (the same convolutions without a Fourier transform; see :class:`FrequencyBranch`).
    """

    def __init__(self, channels: int, *, fft_norm: str = "ortho", spatial_expansion: float = 1.0,
                 freq_groups: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 act_layer: ActLayer = nn.GELU, freq_autocast: bool = True,
                 branches: tuple[str, ...] = BRANCHES, freq_transform: str = "rfft2") -> None:
        super().__init__()
        self.branches = check_branches(branches)
        if freq_transform not in FREQ_TRANSFORMS:
            raise UserError(f"freq_transform={freq_transform!r} is not known; use one of {', '.join(FREQ_TRANSFORMS)}")
        self.spatial: SpatialBranch | None = None
        self.freq: FrequencyBranch | None = None
        if "spatial" in self.branches:
            hidden = int(round(channels * spatial_expansion))
            if hidden < 1:
                raise UserError(f"spatial_expansion={spatial_expansion} leaves no channels; use a value >= {1 / channels:g}")
            self.spatial = SpatialBranch(channels, hidden, norm_layer=norm_layer, act_layer=act_layer)
        if "freq" in self.branches:
            self.freq = FrequencyBranch(channels, fft_norm=fft_norm, groups=freq_groups, norm_layer=norm_layer,
                                        act_layer=act_layer, freq_autocast=freq_autocast, transform=freq_transform)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        # Which branches exist is fixed at construction, so these ``if``s compile away; the sum keeps the order
        # x + spatial + freq of the paper's block, which therefore computes exactly what it always did.
        out = x
        if self.spatial is not None:
            out = out + self.spatial(x)
        if self.freq is not None:
            out = out + self.freq(x)
        return self.act(out)


def check_branches(branches: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """``branches`` as a tuple in :data:`BRANCHES` order; a :class:`UserError` for an unknown, repeated or
    missing branch (a block needs at least one besides its identity)."""
    names = (branches,) if isinstance(branches, str) else tuple(branches)
    unknown = [b for b in names if b not in BRANCHES]
    if unknown or not names or len(set(names)) != len(names):
        raise UserError(f"branches={names!r}: name one or both of {', '.join(BRANCHES)}, each once")
    return tuple(b for b in BRANCHES if b in names)

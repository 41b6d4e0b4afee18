"""Model size and cost: trainable parameters and multiply-accumulates (MACs) of one forward pass.

Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2). It counts matrix
products, convolutions and attention, without biases, and nothing else (no norms, activations,
poolings, additions): the usual convention behind published "GMACs" / torchvision's "GFLOPS" figures.
It has no formula for the FFT, so this module adds one (see :func:`fft_flops`): US-SFNet's counts
include its ``rfft2`` / ``irfft2`` at an analytic estimate; :func:`mac_breakdown` shows them apart.
It also lacks the CPU attention kernel, added here so ViT's attention is counted on CPU too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter elements (only those with ``requires_grad`` unless ``trainable_only=False``).

    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fft_flops(signal_shape: Sequence[int], dims: Sequence[int], complex_input: bool) -> int:
    """Analytic FLOPs of an FFT over ``dims`` of a tensor whose real-space shape is ``signal_shape``.

    The usual radix-2 estimate: ``5 N log2 N`` real FLOPs for a complex transform of ``N = prod(sizes over
    dims)`` points, half of it (``2.5 N log2 N``) for a real-input forward (``rfft``) or real-output inverse
    (``irfft``) transform, times the number of transforms (the other dimensions). An estimate: real FFT
    libraries do somewhat more at sizes that are not powers of two.
    """
    n = math.prod(signal_shape[d] for d in dims)
    if n <= 1:
        return 0
    batch = math.prod(signal_shape) // n
    per_point = 5.0 if complex_input else 2.5
    return int(round(batch * per_point * n * math.log2(n)))


def _r2c_flop(x_shape, dim, normalization, onesided, *, out_shape=None, **kwargs) -> int:
    return fft_flops(x_shape, dim, complex_input=False)


def _c2r_flop(x_shape, dim, normalization, last_dim_size, *, out_shape=None, **kwargs) -> int:
    return fft_flops(out_shape, dim, complex_input=False)


def _c2c_flop(x_shape, dim, normalization, forward, *, out_shape=None, **kwargs) -> int:
    return fft_flops(x_shape, dim, complex_input=True)


def _cpu_sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """``softmax(Q K^T) V``: two batched products, ``2 * B * heads * Lq * Lk * (D + Dv)`` FLOPs."""
    *batch, lq, d = q_shape
    lk, dv = k_shape[-2], v_shape[-1]
    return 2 * math.prod(batch) * lq * lk * (d + dv)


#: Formulas ``FlopCounterMode`` lacks: the FFT kernels, and the CPU kernel of
#: ``scaled_dot_product_attention`` (it only knows the CUDA ones), which ViT's attention runs on CPU.
EXTRA_FLOP_FORMULAS = {
    aten._fft_r2c: _r2c_flop,
    aten._fft_c2r: _c2r_flop,
    aten._fft_c2c: _c2c_flop,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
}


def mac_breakdown(model: nn.Module, image_size: int | tuple[int, int], in_chans: int = 3) -> dict[str, int]:
    """MACs of one forward pass on a ``(1, in_chans, H, W)`` input, per aten operator (e.g. ``"convolution"``,
    ``"_fft_r2c"``). The model runs once in eval mode (its mode is restored), with autograd on so that
    ``nn.MultiheadAttention`` takes its counted path rather than the fused inference kernel.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, in_chans, h, w, device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    flops = counter.get_flop_counts().get("Global", {})
    return {getattr(op, "__name__", str(op)).split(".")[0]: int(v) // 2 for op, v in flops.items()}


def count_macs(model: nn.Module, image_size: int | tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a single image (FFT included, see the module docstring).

    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    return sum(mac_breakdown(model, image_size, in_chans).values())

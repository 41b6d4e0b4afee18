"""``torch.compile`` for training and benchmarking: the whole model, or each repeated block on its own.

Used by ``ussf cv --compile`` (:func:`ussf_lib.training.loop.train_fold`) and ``ussf bench --compile``; measured in
``docs/performance.md``.

``scope="model"`` (default) hands inductor the whole network as one graph. On an H100 that trained US-SFNet
fastest (1,532 img/s at 224 px, bf16, channels-last, against 973 img/s with ``scope="blocks"`` and about
900-1,100 eager), at the price of the longest compilation (about 100 s). ``scope="blocks"`` compiles each
repeated block in place (PyTorch's "regional compilation"): the 15 Conv-FFT blocks have only 4 distinct
shapes, so inductor compiles 4 small graphs and reuses them, in about half the time, while the stem,
transitions and head stay eager (which is what makes its steps slower). Inside the compiled graphs inductor
fuses each batch norm with its GELU, the sum of the three branches and the casts around the FFTs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.convnext import CNBlock
from torchvision.models.densenet import _DenseLayer
from torchvision.models.resnet import Bottleneck
from torchvision.models.swin_transformer import SwinTransformerBlock
from torchvision.models.vision_transformer import EncoderBlock

from ussf_lib import settings
from ussf_lib.errors import UserError
from ussf_lib.models.conv_fft import ConvFFTBlock

#: ``--compile-scope`` values: each repeated block compiled on its own, or the model as one graph.
COMPILE_SCOPES: tuple[str, ...] = settings.get("compile_scope").choices
#: ``--compile-mode`` values, torch.compile's own ("default" passes no mode). The modes that capture CUDA graphs
#: (reduce-overhead, max-autotune) are left out: a training step and the evaluation after it overwrote the
#: graphs' outputs on an H100 (docs/performance.md), which needs step markers this loop does not place.
COMPILE_MODES: tuple[str, ...] = settings.get("compile_mode").choices
#: Blocks that ``scope="blocks"`` compiles: US-SFNet's and those of every baseline (ResNet, DenseNet, ConvNeXt,
#: Swin and Swin V2, ViT).
REPEATED_BLOCKS: tuple[type[nn.Module], ...] = (ConvFFTBlock, Bottleneck, _DenseLayer, CNBlock,
                                                SwinTransformerBlock, EncoderBlock)
#: Compiled graphs kept per block kind. Every block of a kind runs the same code, so each of its distinct
#: (shape, batch size, train/eval) cases is one cache entry; torch's default of 8 would silently send
#: US-SFNet's blocks back to eager once training and evaluation batches have been seen.
RECOMPILE_LIMIT = 64


def check_compile_settings(scope: str, mode: str) -> None:
    """Raise :class:`UserError` naming the flag if ``scope`` or ``mode`` is not one torch.compile takes here."""
    if scope not in COMPILE_SCOPES:
        raise UserError(f"--compile-scope {scope}: use one of {', '.join(COMPILE_SCOPES)}")
    if mode not in COMPILE_MODES:
        raise UserError(f"--compile-mode {mode}: use one of {', '.join(COMPILE_MODES)}")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``model`` that are one of :data:`REPEATED_BLOCKS`, in module order."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, REPEATED_BLOCKS):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def compile_model(model: nn.Module, *, backend: str = "inductor", scope: str = "model",
                  mode: str = "default") -> tuple[nn.Module, str]:
    """Compile ``model`` for training; returns the module to call and a line saying what was compiled.

    ``scope="blocks"`` compiles every :func:`repeated_blocks` module in place (``nn.Module.compile``: the
    state-dict keys do not change) and returns ``model`` itself; a model without such blocks is compiled whole.
    ``scope="model"`` returns ``torch.compile(model)``.

    Blocks are compiled for static shapes (``dynamic=False``): every block kind runs the same code, and
    torch's automatic dynamic shapes would otherwise merge the four stages' shapes into one generic graph.
    A whole model keeps torch's default, so a batch dimension marked by :func:`mark_batch_dynamic` (the
    training and evaluation loops do) is compiled once for every batch size, the last, smaller batch of an
    epoch included, instead of once per size. No notebook compiles: this is for GPU runs from ``ussf``.
    """
    check_compile_settings(scope, mode)
    options: dict[str, Any] = {"backend": backend}
    if mode != "default":
        options["mode"] = mode
    blocks = repeated_blocks(model) if scope == "blocks" else []
    if not blocks:
        how = "whole model" if scope == "model" else "whole model (no repeated blocks to compile alone)"
        return torch.compile(model, **options), f"torch.compile ({backend}, mode {mode}): {how}"
    options["dynamic"] = False
    dynamo_config = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), RECOMPILE_LIMIT))
    for block in blocks:
        block.compile(**options)
    kinds = sorted({type(b).__name__ for b in blocks})
    return model, f"torch.compile ({backend}, mode {mode}): {len(blocks)} {'/'.join(kinds)} blocks, rest eager"


def mark_batch_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Mark ``x``'s batch dimension as dynamic for a whole-model compile, so that a new batch size does not
    recompile (a no-op outside ``torch.compile``); a batch of one stays static, as torch requires.

    The mark is a hint (``maybe_mark_dynamic``): where the model's operators fix the batch size (CPU
    convolution does at 16 images), torch compiles that size statically and recompiles for another one
    instead of failing.
    """
    if x.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(x, 0)
    return x

"""DropBlock whose block size shrinks to fit small feature maps.

Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
"""

from __future__ import annotations

from torch import Tensor
from torchvision.ops import DropBlock2d, drop_block2d

from ussf_lib.errors import UserError


def fitted_block_size(block_size: int, height: int, width: int) -> int:
    """The largest odd block size <= ``block_size`` that fits an ``height`` x ``width`` map.

    torchvision's ``drop_block2d`` clamps to the map but then refuses an even size (a 4x4 map with
    block 7 fails), so the clamp is done here and rounded down to odd.
    """
    size = min(block_size, height, width)
    return size - 1 + size % 2 if size > 1 else 1


class FittedDropBlock2d(DropBlock2d):
    """``torchvision.ops.DropBlock2d`` with the block size fitted to each input (see :func:`fitted_block_size`).

    Identity in eval mode or when ``p == 0``. The block size depends on the input's shape only, never on
    its values, so the module traces under ``torch.compile``.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """

    def __init__(self, p: float = 0.1, block_size: int = 7, inplace: bool = False, eps: float = 1e-6) -> None:
        if not 0.0 <= p <= 1.0:
            raise UserError(f"drop_block_p={p} is not a probability; use a value in [0, 1] (0 turns DropBlock off)")
        if block_size < 1 or block_size % 2 == 0:
            raise UserError(f"drop_block_size={block_size} must be a positive odd number; use e.g. 7 or 5")
        super().__init__(p=p, block_size=block_size, inplace=inplace, eps=eps)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torchvision's argument name
        size = fitted_block_size(self.block_size, input.shape[-2], input.shape[-1])
        return drop_block2d(input, self.p, size, self.inplace, self.eps, self.training)

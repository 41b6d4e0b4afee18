"""The paper's 12 reference networks (section 3), from torchvision, trained from scratch.

Each is built with ``weights=None`` (nothing is downloaded) and torchvision's ``num_classes=`` argument,
so its classifier already has the right number of outputs. Input sizes: ViT only takes the
``image_size`` it was built for, a multiple of 16 (its position embeddings are sized by it); the others
pool adaptively and take any size above a minimum (DenseNet 29 px, ConvNeXt 32 px, Swin / Swin V2 4 px
thanks to its own padding, ResNet 1 px). The registry checks these limits.
Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision.models as tvm
from torch import nn


def torchvision_builder(fn_name: str, *, takes_image_size: bool = False) -> Callable[..., nn.Module]:
    """A builder ``(num_classes, image_size, **kwargs) -> nn.Module`` for ``torchvision.models.<fn_name>``.

    ``image_size`` is forwarded only to constructors that need it (ViT); extra ``kwargs`` go to torchvision
    (e.g. ``dropout=0.1`` for ViT, ``stochastic_depth_prob`` for Swin / ConvNeXt).
    """
    fn = getattr(tvm, fn_name)

    def build(num_classes: int, image_size: int, **kwargs) -> nn.Module:
        if takes_image_size:
            kwargs["image_size"] = image_size
        return fn(weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = f"build_{fn_name}"
    build.__doc__ = f"torchvision.models.{fn_name}(weights=None, num_classes=num_classes, ...)"
    return build


#: name -> (dotted path of the classifier ``nn.Linear``, smallest accepted image size, required multiple)
BASELINES: dict[str, tuple[str, int, int]] = {
    "densenet121": ("classifier", 29, 1),
    "densenet161": ("classifier", 29, 1),
    "resnet101": ("fc", 1, 1),
    "resnet152": ("fc", 1, 1),
    "convnext_base": ("classifier.2", 32, 1),
    "convnext_large": ("classifier.2", 32, 1),
    "swin_b": ("head", 4, 1),
    "swin_s": ("head", 4, 1),
    "vit_b_16": ("heads.head", 16, 16),
    "vit_l_16": ("heads.head", 16, 16),
    "swin_v2_b": ("head", 4, 1),
    "swin_v2_s": ("head", 4, 1),
}

"""Model registry: US-SFNet, its tiny variant for CPU smoke runs, the paper's 12 torchvision baselines, and
ablations of the Conv-FFT block at both sizes (``us_sfnet[_tiny]_nofreq``, ``_nospatial``, ``_nofft``).

``build_model(name, num_classes, image_size, weights_path)`` is the one way the CLI, the
cross-validation loop and the notebooks make a network. Introduced in
``notebooks/03_build_conv_fft_block.ipynb``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ussf_lib.errors import UserError
from ussf_lib.models.baselines import BASELINES, torchvision_builder
from ussf_lib.models.us_sfnet import USSFNet, min_input_size
from ussf_lib.models.weights import load_weights

#: Widths and depths of ``us_sfnet_tiny``: the paper's layout at 1/4 width and 1-2 blocks per stage.
TINY_WIDTHS: tuple[int, ...] = (8, 16, 32, 64)
TINY_DEPTHS: tuple[int, ...] = (1, 2, 1, 1)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model, and what input sizes it accepts."""

    name: str
    build: Callable[..., nn.Module]  #: ``(num_classes, image_size, **kwargs) -> nn.Module``
    head: str  #: dotted path of the classifier ``nn.Linear`` (skipped by weights of another class count)
    min_image_size: int = 1
    size_multiple: int = 1  #: image_size must be a multiple of this (ViT's patch size)
    description: str = ""
    #: For an ablation, the registry name of the model it ablates (``"us_sfnet"`` for ``us_sfnet_nofft``); an
    #: ablation is not the paper's model, and no paper figure is shown beside it.
    ablation_of: str | None = None


def _build_us_sfnet(num_classes: int, image_size: int, **kwargs) -> nn.Module:
    return USSFNet(num_classes=num_classes, **kwargs)


def _build_us_sfnet_tiny(num_classes: int, image_size: int, **kwargs) -> nn.Module:
    kwargs.setdefault("widths", TINY_WIDTHS)
    kwargs.setdefault("depths", TINY_DEPTHS)
    return USSFNet(num_classes=num_classes, **kwargs)


#: Ablations of the Conv-FFT block (see :class:`~ussf_lib.models.us_sfnet.USSFNet`), registered for each of
#: ``us_sfnet`` and ``us_sfnet_tiny`` as ``<parent>_<suffix>``: suffix -> (the constructor arguments the ablation
#: fixes, what it is).
ABLATIONS: dict[str, tuple[dict[str, object], str]] = {
    "nofreq": ({"branches": ("spatial",)}, "blocks GELU(x + spatial(x)): no frequency branch"),
    "nospatial": ({"branches": ("freq",)}, "blocks GELU(x + freq(x)): no spatial branch"),
    "nofft": ({"freq_transform": "polyphase"},
              "the frequency convolutions on even/odd columns instead of the half spectrum, no rfft2/irfft2: "
              "same parameters and convolution MACs"),
}


def _ablation_builder(parent: str, name: str, fixed: dict[str, object]) -> Callable[..., nn.Module]:
    parent_build = MODEL_REGISTRY[parent].build

    def build(num_classes: int, image_size: int, **kwargs) -> nn.Module:
        clash = sorted(k for k in fixed if k in kwargs)
        if clash:
            raise UserError(f"{name} fixes {', '.join(clash)}; pass {', '.join(clash)} to {parent} instead")
        return parent_build(num_classes, image_size, **fixed, **kwargs)

    return build


MODEL_REGISTRY: dict[str, ModelSpec] = {
    "us_sfnet": ModelSpec("us_sfnet", _build_us_sfnet, "head.fc", min_input_size(),
                          description="US-SFNet as in the paper: widths 32-256, depths 3-6-3-3"),
    "us_sfnet_tiny": ModelSpec("us_sfnet_tiny", _build_us_sfnet_tiny, "head.fc", min_input_size(),
                               description=f"same layout, widths {TINY_WIDTHS}, depths {TINY_DEPTHS}: CPU smoke runs"),
    **{name: ModelSpec(name, torchvision_builder(name, takes_image_size=multiple > 1), head, minimum, multiple,
                       description=f"torchvision {name}, from scratch")
       for name, (head, minimum, multiple) in BASELINES.items()},
}
MODEL_REGISTRY.update({
    f"{parent}_{suffix}": ModelSpec(f"{parent}_{suffix}", _ablation_builder(parent, f"{parent}_{suffix}", fixed),
                                    MODEL_REGISTRY[parent].head, MODEL_REGISTRY[parent].min_image_size,
                                    MODEL_REGISTRY[parent].size_multiple,
                                    description=f"ablation of {parent}: {what}", ablation_of=parent)
    for parent in ("us_sfnet", "us_sfnet_tiny") for suffix, (fixed, what) in ABLATIONS.items()
})

#: Registered names: US-SFNet and its CPU-sized variant, then the baselines by family, in the order of
#: :data:`ussf_lib.models.baselines.BASELINES`, then the ablations (``us_sfnet_*``, then ``us_sfnet_tiny_*``,
#: in the order of :data:`ABLATIONS`).
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_REGISTRY)


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODEL_NAMES)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name is a :class:`UserError` listing the valid ones."""
    try:
        return MODEL_REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def check_image_size(name: str, image_size: int) -> None:
    """Raise :class:`UserError` if model ``name`` cannot take square images of ``image_size`` pixels."""
    spec = get_spec(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise UserError(f"image_size={image_size!r} must be an integer number of pixels, e.g. 224")
    if image_size < spec.min_image_size:
        raise UserError(f"image_size={image_size} is too small for {name}; use {spec.min_image_size} px or more")
    m = spec.size_multiple
    if image_size % m:
        low, high = image_size // m * m, (image_size // m + 1) * m
        fix = f"{low} or {high}" if low >= spec.min_image_size else f"{high}"
        raise UserError(f"image_size={image_size} is not a multiple of {m}, which {name} needs (patches of {m} px); use {fix}")


def classifier_head(model: nn.Module, name: str) -> nn.Linear:
    """The classifier ``nn.Linear`` of a model built as ``name``."""
    return model.get_submodule(get_spec(name).head)


def build_model(name: str, num_classes: int, image_size: int = 224, weights_path: str | Path | None = None,
                **kwargs) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier for ``image_size`` px inputs.

    Baselines are torchvision's, built from scratch (``weights=None``). ``weights_path`` optionally loads a
    local state dict (see :func:`~ussf_lib.models.weights.load_weights`: a head of another size is skipped,
    everything else must match). ``kwargs`` go to the constructor (:class:`USSFNet` or torchvision's).
    ``image_size`` is checked against the model's limits; only ViT is built for it and then takes only it.
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} must be a positive integer (e.g. 4 for the paper's classes)")
    check_image_size(name, image_size)
    try:
        model = spec.build(num_classes, image_size, **kwargs)
    except TypeError as exc:
        if not kwargs:
            raise
        raise UserError(f"{name} does not accept the arguments {sorted(kwargs)} ({exc}); remove or rename them") from exc
    if weights_path is not None:
        load_weights(model, weights_path, head=spec.head, model_name=name)
    return model

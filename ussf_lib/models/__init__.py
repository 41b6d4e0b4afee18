"""Networks: US-SFNet and its Conv-FFT block, the paper's 12 torchvision baselines, and the registry.

``build_model(name, num_classes, image_size, weights_path)`` builds any of them; ``list_models()`` names
them. Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
"""

from ussf_lib.models.conv_fft import BRANCHES, FFT_NORMS, FREQ_TRANSFORMS, ConvFFTBlock, FrequencyBranch, SpatialBranch
from ussf_lib.models.dropblock import FittedDropBlock2d, fitted_block_size
from ussf_lib.models.registry import (
    ABLATIONS,
    MODEL_NAMES,
    MODEL_REGISTRY,
    TINY_DEPTHS,
    TINY_WIDTHS,
    ModelSpec,
    build_model,
    check_image_size,
    classifier_head,
    get_spec,
    list_models,
)
from ussf_lib.models.us_sfnet import STAGE_NAMES, Transition, USSFNet, min_input_size
from ussf_lib.models.weights import load_weights

__all__ = [
    "BRANCHES", "FFT_NORMS", "FREQ_TRANSFORMS", "ConvFFTBlock", "FrequencyBranch", "SpatialBranch",
    "FittedDropBlock2d", "fitted_block_size",
    "ABLATIONS", "MODEL_NAMES", "MODEL_REGISTRY", "TINY_DEPTHS", "TINY_WIDTHS", "ModelSpec",
    "build_model", "check_image_size", "classifier_head", "get_spec", "list_models",
    "STAGE_NAMES", "Transition", "USSFNet", "min_input_size",
    "load_weights",
]

"""What a run folder records about where it came from: package versions, device, git commit, data fingerprint.

Introduced in ``notebooks/01_explore_data.ipynb``, whose imports cell (like every notebook's) prints
:func:`environment_line`; ``notebooks/04_train_cross_validation.ipynb`` shows what a run folder records.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ussf_lib.training.placement import PLACED_ENV

PACKAGES = ("ussf", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "scipy", "pillow", "imagehash",
            "matplotlib", "seaborn", "papermill")


def package_versions() -> dict[str, str | None]:
    """Installed version of each of :data:`PACKAGES` (None where one is missing)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit of the ussf checkout this code runs from (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_info(device: torch.device | str) -> dict[str, Any]:
    """The device, torch's thread count and, on CUDA, the GPU's name, count and CUDA/cuDNN versions."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(gpu=torch.cuda.get_device_name(index), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def environment_info(device: torch.device | str, data_fingerprint: str | None = None) -> dict[str, Any]:
    """Everything ``environment.json`` holds."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        **device_info(device),
        "git_commit": git_commit(),
        "data_fingerprint": data_fingerprint,
        # Where `--devices` placed this run (ussf_lib.training.placement): the GPUs this process was allowed to see
        # (None: not restricted, "": none) and the --devices entry; None for a run started by hand.
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "placed_device": os.environ.get(PLACED_ENV),
    }


def environment_line(device: torch.device | str | None = None) -> str:
    """One printable line for a notebook's imports cell: versions and device.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    from ussf_lib.training.runtime import select_device

    device = torch.device(device) if device is not None else select_device()
    versions = package_versions()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return (f"ussf {versions['ussf']} | torch {versions['torch']} | torchvision {versions['torchvision']} | "
            f"python {platform.python_version()} | device {device}{gpu}")

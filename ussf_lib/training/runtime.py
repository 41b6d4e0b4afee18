"""Where and how training runs: the device, seeds and random-number states, mixed precision, the image cache on
the device, and each process's share of a batch under DDP.

Introduced in ``notebooks/03_build_conv_fft_block.ipynb`` (:func:`select_device`, :func:`seed_everything`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from ussf_lib import settings
from ussf_lib.errors import UserError

#: ``--amp`` names (declared in :mod:`ussf_lib.settings`) and the autocast dtype each stands for.
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SEED = settings.MAX_SEED


def check_seed(seed: int) -> None:
    """Raise :class:`UserError` for a seed that is not a whole number from 0 to :data:`MAX_SEED`."""
    if settings.problem(settings.get("seed"), seed):
        raise UserError(f"--seed {seed}: use a whole number from 0 to {MAX_SEED}")


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda:1``, ``cpu`` etc. are taken as given.

    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {requested}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {requested}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"numbered 0..{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {requested}: Apple's MPS is not available here; use --device cpu or auto")
    elif device.type != "cpu":
        raise UserError(f"--device {requested}: ussf runs on cpu, cuda or mps; use --device cpu or auto")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask cuDNN/torch for deterministic kernels.

    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS picks reproducible reductions only with a fixed workspace, read when CUDA first starts; a value
        # the user set is kept.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Set both ways: a later run in the same process (a notebook, a sweep) must not inherit an earlier one's mode.
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The random-number states a checkpoint keeps: torch's CPU generator and, on CUDA, the device's own.

    DropBlock draws its masks on the device of its input, so on a GPU the CUDA generator decides them; without
    its state a resumed fold would replay the masks of the fold's first epochs.
    """
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators from a checkpoint written by :func:`rng_states` (states loaded on any device)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def process_batch_size(batch_size: int, world: int) -> tuple[int, str | None]:
    """Each process's share of a global batch under DDP, and a note when ``world`` does not divide it.

    Every process must take the same number of images per step (DDP averages their gradients), so a share is
    rounded up and the global batch grows slightly rather than dropping images.
    """
    local = math.ceil(batch_size / world)
    if local * world == batch_size:
        return local, None
    return local, (f"--batch-size {batch_size} over {world} processes: each takes {local} images a step, so a global "
                   f"batch holds {local * world}; use a multiple of {world} for exactly {batch_size}")


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast for ``--amp bf16|fp16`` (the model keeps its FFT branch in float32 itself)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype is torch.float16:
        # CPU fp16 autocast is slow and poorly supported; bf16 is the CPU's reduced precision.
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class DeviceImages:
    """The uint8 image cache, placed for fast batch gathering.

    On CUDA the whole uint8 array is copied to the GPU once when it fits in a quarter of free memory (a
    3,392-image set at 224 px is about 0.5 GB), otherwise batches are gathered on the host into pinned memory
    and copied asynchronously. On CPU batches are index views of the array.
    """

    def __init__(self, images: np.ndarray, device: torch.device):
        self.device = device
        with warnings.catch_warnings():
            # A cache memory-mapped read-only from --cache-dir is never written through this tensor, so torch's
            # "non-writable array" warning does not apply; copying it would defeat the memory map.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            host = torch.from_numpy(np.ascontiguousarray(images))
        self.on_device = False
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if host.numel() < free // 4:
                host = host.to(device)
                self.on_device = True
        self.images = host

    def batch(self, idx: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The images at ``idx``, on the training device. With the cache on the GPU, pass ``idx`` as a tensor
        already there: a host array costs a copy that waits for every kernel queued before it."""
        if self.on_device:
            return self.images[torch.as_tensor(idx, device=self.device)]
        batch = self.images[torch.as_tensor(idx)]
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch


def flag_notes(cfg: Any, device: torch.device) -> list[str]:
    """How speed flags apply on ``device``: accepted everywhere, and said plainly where they change nothing."""
    notes = []
    if cfg.amp == "fp16" and device.type == "cpu":
        notes.append("--amp fp16 runs as bf16 on CPU (CPU autocast has no useful fp16 path)")
    if cfg.channels_last and device.type == "cpu":
        notes.append("--channels-last is applied, but mostly speeds up GPUs")
    if cfg.deterministic and device.type == "cpu":
        notes.append("--deterministic: CPU runs are already deterministic for a fixed seed")
    return notes

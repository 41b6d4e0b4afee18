"""Train and evaluate one cross-validation fold.

``train`` knows one fold: it gets the decoded uint8 images, the indices of the fold's training and test
images and a :class:`TrainConfig`, and returns the per-epoch history and the test images' class
probabilities. Batches are gathered from the uint8 cache and normalized on the training device, so no image
is decoded inside the loop. A checkpoint (model, optimizer, GradScaler and RNG states, epoch, fold, and what the
caller adds: the run's config) is written atomically after every epoch (or every ``checkpoint_every`` epochs, and
always after the last), in the background while the next epoch trains (:mod:`ussf_lib.training.checkpoints`), so an
interrupted fold resumes from its last checkpoint with the same results. The learning rate is constant: section 2.4
gives an "initial learning rate" of 0.001 but names no schedule, so none is guessed (and there is no scheduler
state to keep). Introduced in ``notebooks/03_build_conv_fft_block.ipynb`` (:func:`select_device`,
:func:`seed_everything`); the fold loop in ``notebooks/04_train_cross_validation.ipynb`` (through
:func:`ussf_lib.training.experiment.run_cv`).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ussf_lib.training import distributed as dist_mod
from ussf_lib.training.checkpoints import CheckpointWriter, atomic_save
from ussf_lib.data.index import normalization_on, normalize_batch
from ussf_lib.training.distributed import DistContext
from ussf_lib.errors import UserError
from ussf_lib.paper import PAPER_PROTOCOL
from ussf_lib.models.compiling import check_compile_settings, compile_model, mark_batch_dynamic

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


#: Seeds are whole numbers NumPy accepts everywhere (scikit-learn's folds pass them to RandomState).
MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> None:
    """Raise :class:`UserError` for a seed that is not a whole number from 0 to :data:`MAX_SEED`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed {seed}: use a whole number from 0 to {MAX_SEED}")


@dataclass
class TrainConfig:
    """Optimization settings; the defaults are the paper's protocol (section 2.4)."""

    epochs: int = int(PAPER_PROTOCOL["epochs"])
    batch_size: int = int(PAPER_PROTOCOL["batch_size"])
    lr: float = float(PAPER_PROTOCOL["lr"])
    betas: tuple[float, float] = tuple(PAPER_PROTOCOL["betas"])  # type: ignore[assignment]
    weight_decay: float = float(PAPER_PROTOCOL["weight_decay"])
    seed: int = 0
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    #: torch.compile backend; "inductor" generates kernels, "aot_eager" only traces (fast checks on CPU).
    compile_backend: str = "inductor"
    #: "model": one graph; "blocks": each Conv-FFT (or baseline) block compiled alone (models.compiling)
    compile_scope: str = "model"
    compile_mode: str = "default"  #: torch.compile's mode: default or max-autotune-no-cudagraphs
    deterministic: bool = False
    progress: bool = True
    #: Evaluate on the test fold after every this many epochs, and always after the last one. Skipped epochs
    #: have no val_loss / val_acc in the history; the fold's predictions always come from the last epoch.
    eval_every: int = 1
    #: Write the checkpoint after every this many epochs, and always after the last one. US-SFNet's checkpoint
    #: (weights and Adam's moments) is 274 MB; it is written in the background, but each one still costs a copy
    #: to the host and disk bandwidth.
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: the learning rate must be a positive number, e.g. 1e-3")
        check_seed(self.seed)
        if not self.weight_decay >= 0:
            raise UserError(f"--weight-decay {self.weight_decay}: must be 0 or more (the paper uses 1e-4)")
        if len(self.betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
            raise UserError(f"betas {tuple(self.betas)}: Adam needs two values in [0, 1), e.g. (0.9, 0.999)")
        if self.amp not in AMP_DTYPES:
            raise UserError(f"--amp {self.amp}: use one of {', '.join(AMP_DTYPES)}")
        check_compile_settings(self.compile_scope, self.compile_mode)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FoldResult:
    """What one fold leaves: per-epoch history and the test images' probabilities (rows follow ``test_idx``)."""

    history: pd.DataFrame
    probs: np.ndarray
    test_idx: np.ndarray
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class NonFiniteLossError(UserError):
    """Training diverged; the message names the epoch and batch, and a debug checkpoint is kept."""


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


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each training batch over ``n`` images; a last batch of one image joins the one before.

    BatchNorm cannot normalize a single value per channel in training, which a lone image gives once a stage's
    map is 1x1 (images under 32 px); joining it keeps every image in the epoch.
    """
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else n) for i, start in enumerate(starts)]


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


def flag_notes(cfg: TrainConfig, device: torch.device) -> list[str]:
    """How speed flags apply on ``device``: accepted everywhere, and said plainly where they change nothing."""
    notes = []
    if cfg.amp == "fp16" and device.type == "cpu":
        notes.append("--amp fp16 runs as bf16 on CPU (CPU autocast has no useful fp16 path)")
    if cfg.channels_last and device.type == "cpu":
        notes.append("--channels-last is applied, but mostly speeds up GPUs")
    if cfg.deterministic and device.type == "cpu":
        notes.append("--deterministic: CPU runs are already deterministic for a fixed seed")
    return notes


def make_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device) -> torch.optim.Adam:
    """Adam as the paper trains (section 2.4); on CUDA the fused kernel (one launch per step, not one per tensor).

    Shared by :func:`train_fold` and ``ussf bench`` so that the benchmark times the step training takes.
    """
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                            fused=True if device.type == "cuda" else None)


def evaluate(model: nn.Module, images: DeviceImages, targets: np.ndarray, idx: np.ndarray, batch_size: int,
             mean: Sequence[float], std: Sequence[float], amp: str = "off",
             channels_last: bool = False, dynamic_batch: bool = False) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and softmax probabilities (rows in ``idx`` order) without gradients.

    ``dynamic_batch`` marks each batch's size as dynamic for a whole-model ``torch.compile``
    (:func:`ussf_lib.models.compiling.mark_batch_dynamic`), so the last, smaller batch does not recompile.
    """
    model.eval()
    device = images.device
    losses, probs = [], []
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    # Indices, labels and constants go to the device once, not once per batch (see DeviceImages.batch).
    idx_dev = torch.tensor(idx, dtype=torch.int64, device=device)
    y_all = torch.as_tensor(np.asarray(targets)[idx], device=device)
    mean_t, std_t = normalization_on(device, mean, std)
    with torch.inference_mode():
        for start in range(0, len(idx), batch_size):
            chunk = idx_dev[start:start + batch_size] if images.on_device else idx[start:start + batch_size]
            x = normalize_batch(images.batch(chunk), mean_t, std_t, channels_last)
            if dynamic_batch:
                mark_batch_dynamic(x)
            y = y_all[start:start + batch_size]
            with autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            # Kept on the device until the end: one copy to the host instead of one wait per batch.
            losses.append(loss_fn(logits, y))
            probs.append(torch.softmax(logits, dim=1))
    if not probs:
        return 0.0, np.zeros((0, 0))
    total = float(torch.stack(losses).sum().item())
    return total / len(idx), torch.cat(probs).cpu().numpy().astype(np.float64)


def _evaluate_split(model: nn.Module, images: DeviceImages, targets: np.ndarray, test_idx: np.ndarray,
                    cfg: TrainConfig, mean: Sequence[float], std: Sequence[float], ctx: DistContext,
                    device: torch.device, dynamic_batch: bool = False) -> tuple[float, np.ndarray]:
    """:func:`evaluate` on this rank's share of ``test_idx``; loss and probabilities combined over all ranks."""
    if not ctx.enabled:
        return evaluate(model, images, targets, test_idx, cfg.batch_size * 2, mean, std, cfg.amp, cfg.channels_last,
                        dynamic_batch=dynamic_batch)
    dist_mod.sync_buffers(model, ctx)
    local = dist_mod.shard(test_idx, ctx)
    loss, probs = evaluate(model, images, targets, local, cfg.batch_size * 2, mean, std, cfg.amp, cfg.channels_last)
    total_loss, n = dist_mod.all_reduce_sum([loss * len(local), len(local)], ctx, device)
    return total_loss / max(1.0, n), dist_mod.gather_rows(probs, ctx)


def train_fold(model: nn.Module, images: np.ndarray | DeviceImages, targets: np.ndarray, train_idx: np.ndarray,
               test_idx: np.ndarray, cfg: TrainConfig, mean: Sequence[float], std: Sequence[float],
               device: torch.device | None = None, fold_dir: str | Path | None = None, fold: int = 0,
               checkpoint_extra: dict[str, Any] | None = None,
               log: Callable[[str], None] = print, dist_ctx: DistContext | None = None) -> FoldResult:
    """Train ``model`` on ``train_idx`` with Adam and cross-entropy, evaluating on ``test_idx`` every
    ``cfg.eval_every`` epochs and after the last.

    With ``fold_dir`` a checkpoint ``checkpoint.pt`` is written there every ``cfg.checkpoint_every`` epochs and
    after the last (temporary file, then rename) and, if one is already there, training resumes from it.
    Returns the history and the last epoch's test probabilities.

    With ``dist_ctx`` of a torchrun launch (:mod:`ussf_lib.training.distributed`) every process calls this with the same
    arguments: the model is wrapped in ``DistributedDataParallel``, each global batch of ``cfg.batch_size`` is
    split across the processes by a ``DistributedSampler``, the test images are split for evaluation and their
    probabilities gathered, and only rank 0 writes the checkpoint.
    """
    ctx = dist_ctx or DistContext()
    device = device or select_device()
    started = time.perf_counter()
    dev_images = images if isinstance(images, DeviceImages) else DeviceImages(images, device)
    targets = np.asarray(targets, dtype=np.int64)
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    seed_everything(cfg.seed * 1000 + fold, cfg.deterministic)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16" and device.type == "cuda"))
    shuffle_gen = torch.Generator().manual_seed(cfg.seed * 1000 + fold)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = Path(fold_dir) / "checkpoint.pt" if fold_dir is not None else None
    if ckpt_path is not None and ctx.is_main:
        # A process killed while saving leaves its half-written temporary file; the checkpoint itself is whole.
        for stale in ckpt_path.parent.glob(f".{ckpt_path.name}.tmp*"):
            stale.unlink(missing_ok=True)
    if ckpt_path is not None and ckpt_path.is_file():
        # On the host: the random-number states must stay CPU byte tensors, and load_state_dict moves the
        # weights and Adam's moments to the model's device itself.
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        shuffle_gen.set_state(state["shuffle_rng"])
        restore_rng_states(state, device)
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        log(f"fold {fold}: resuming after epoch {start_epoch}")
    for note in flag_notes(cfg, device):
        log(f"fold {fold}: {note}")
    dist_mod.barrier(ctx)  # every rank has read the checkpoint before rank 0 may overwrite it
    wrapped = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = wrapped
    if cfg.compile:
        # Blocks are compiled in place inside the DDP wrapper; a whole-model compile wraps DDP itself.
        step_model, how = compile_model(wrapped, backend=cfg.compile_backend, scope=cfg.compile_scope,
                                        mode=cfg.compile_mode)
        log(f"fold {fold}: {how}")
    dynamic_batch = step_model is not wrapped  # a whole-model compile: one graph for every batch size
    # On the device once per fold, and the batch order once per epoch: a copy from host memory waits for every
    # kernel queued before it, so copies made per step would keep the host from queueing the next step early.
    targets_dev = torch.tensor(targets, dtype=torch.int64, device=device)
    mean_t, std_t = normalization_on(device, mean, std)
    local_batch, _ = process_batch_size(cfg.batch_size, ctx.world)  # run_cv logs a global batch that grows
    probs = np.zeros((len(test_idx), 0))
    # The checkpoint is written while the next epoch trains; leaving the block waits for the last write.
    with CheckpointWriter(background=True) as writer:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            if ctx.enabled:
                order = dist_mod.epoch_order(train_idx, ctx, cfg.seed * 1000 + fold, epoch)
            else:
                order = train_idx[torch.randperm(len(train_idx), generator=shuffle_gen).numpy()]
            # Sums stay on the device: the only wait for the GPU per step is the non-finite check.
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            batches = batch_bounds(len(order), local_batch)
            bar = tqdm(batches, desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                       disable=not (cfg.progress and ctx.is_main), mininterval=1.0)
            order_dev = torch.as_tensor(order, device=device)
            for b, (start, stop) in enumerate(bar):
                chunk = order_dev[start:stop]
                gather = chunk if dev_images.on_device else order[start:stop]
                x = normalize_batch(dev_images.batch(gather), mean_t, std_t, cfg.channels_last)
                if dynamic_batch:
                    mark_batch_dynamic(x)
                y = targets_dev[chunk]
                try:
                    with autocast(device, cfg.amp):
                        logits = step_model(x)
                        loss = loss_fn(logits.float(), y)
                except ValueError as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise
                    raise UserError(f"--batch-size {cfg.batch_size}: a batch of {len(chunk)} image(s) leaves "
                                    "BatchNorm one value per channel on the model's smallest feature map; use "
                                    "--batch-size 2 or more, or a larger --image-size") from None
                if dist_mod.any_nonfinite(loss, ctx):
                    if ckpt_path is not None and ctx.is_main:
                        atomic_save({"model": model.state_dict(), "epoch": epoch, "batch": b},
                                     ckpt_path.with_name("debug_nonfinite.pt"))
                    raise NonFiniteLossError(
                        f"fold {fold}: loss became {loss.item()} at epoch {epoch + 1}, batch {b + 1}; "
                        f"lower --lr (now {cfg.lr}) or use --amp off"
                        + (f" (model state saved to {ckpt_path.with_name('debug_nonfinite.pt')})" if ckpt_path else "")
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().double() * len(chunk)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(chunk)
            loss_sum, correct, seen = dist_mod.all_reduce_sum([loss_sum.item(), float(correct.item()), seen], ctx, device)
            train_seconds = time.perf_counter() - t0  # .item() above waited for the epoch's last step
            last_epoch = epoch + 1 == cfg.epochs
            val_loss = val_acc = math.nan
            if last_epoch or (epoch + 1) % cfg.eval_every == 0:
                eval_model = step_model if not ctx.enabled else model
                val_loss, probs = _evaluate_split(eval_model, dev_images, targets, test_idx, cfg, mean, std, ctx,
                                                  device, dynamic_batch and not ctx.enabled)
                if not np.isfinite(probs).all():  # finite training loss, but the weights themselves overflowed
                    raise NonFiniteLossError(f"fold {fold}: the model's outputs on its test images became non-finite "
                                             f"after epoch {epoch + 1}; lower --lr (now {cfg.lr}) or use --amp off")
                val_acc = float((probs.argmax(1) == targets[test_idx]).mean()) if len(test_idx) else math.nan
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0, "train_seconds": train_seconds}
            history.append(row)
            val_text = "" if math.isnan(val_loss) else f" | val loss {val_loss:.4f} acc {val_acc:.3f}"
            log(f"fold {fold} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                f"acc {row['train_acc']:.3f}{val_text} ({row['seconds']:.1f}s)")
            if ckpt_path is not None and ctx.is_main and (last_epoch or (epoch + 1) % cfg.checkpoint_every == 0):
                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                writer.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict(), "shuffle_rng": shuffle_gen.get_state(),
                              **rng_states(device), "epoch": epoch + 1, "fold": fold,
                              "history": history, **(checkpoint_extra or {})}, ckpt_path)
    if probs.shape[1] == 0:  # resumed after the last epoch: recompute the test probabilities
        _, probs = _evaluate_split(model, dev_images, targets, test_idx, cfg, mean, std, ctx, device)
    dist_mod.barrier(ctx)
    return FoldResult(history=pd.DataFrame(history), probs=probs, test_idx=test_idx,
                      seconds=time.perf_counter() - started)

"""Train and evaluate one cross-validation fold.

``train`` knows one fold: it gets the decoded uint8 images, the indices of the fold's training and test
images and a :class:`TrainConfig`, and returns the per-epoch history and the test images' class
probabilities. Batches are gathered from the uint8 cache and normalized on the training device, so no image
is decoded inside the loop. A checkpoint (model, optimizer, GradScaler and RNG states, epoch, fold, and what the
caller adds: the run's config) is written atomically after every epoch (or every ``checkpoint_every`` epochs, and
always after the last), in the background while the next epoch trains (:mod:`ussf_lib.training.checkpoints`), so an
interrupted fold resumes from its last checkpoint with the same results. By default the learning rate is
constant: section 2.4 gives an "initial learning rate" of 0.001 but names no schedule, so none is guessed; the
opt-in recipe (:mod:`ussf_lib.training.recipe`: augmentation, schedules, imbalance, label smoothing) adds its
parts to the fold's state, the scheduler's state to the checkpoint. Introduced in ``notebooks/03_build_conv_fft_block.ipynb`` (:func:`select_device`,
:func:`seed_everything`); the fold loop in ``notebooks/04_train_cross_validation.ipynb`` (through
:func:`ussf_lib.training.experiment.run_cv`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ussf_lib import settings
from ussf_lib.training import recipe
from ussf_lib.data.index import normalization_on, normalize_batch
from ussf_lib.errors import UserError
from ussf_lib.models.compiling import compile_model, mark_batch_dynamic
from ussf_lib.training import distributed as dist_mod
from ussf_lib.training.checkpoints import CheckpointWriter, atomic_save, load_fold_state, remove_partial_saves
from ussf_lib.training.distributed import DistContext
from ussf_lib.training.runtime import (DeviceImages, autocast, flag_notes, process_batch_size,
                                       rng_states, select_device, seed_everything)


class _TrainChecks:
    """Checks of :class:`TrainConfig` beyond each setting's own range (:mod:`ussf_lib.settings`)."""

    def __post_init__(self) -> None:
        settings.check_values(settings.config_to_dict(self), "train")
        if len(self.betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
            raise UserError(f"betas {tuple(self.betas)}: Adam needs two values in [0, 1), e.g. (0.9, 0.999)")
        self.betas = tuple(float(b) for b in self.betas)

    def to_dict(self) -> dict[str, Any]:
        return settings.config_to_dict(self)


TrainConfig = settings.config_class(
    "TrainConfig", "train", _TrainChecks,
    "Optimization settings of one fold (the ``scope='train'`` settings); the defaults are the paper's protocol "
    "(section 2.4).")


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


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each training batch over ``n`` images; a last batch of one image joins the one before.

    BatchNorm cannot normalize a single value per channel in training, which a lone image gives once a stage's
    map is 1x1 (images under 32 px); joining it keeps every image in the epoch.
    """
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return [(start, starts[i + 1] if i + 1 < len(starts) else n) for i, start in enumerate(starts)]


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




@dataclass
class _Fold:
    """What one fold's training carries from epoch to epoch."""

    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    shuffle_gen: torch.Generator
    fold: int
    cfg: Any
    ctx: DistContext
    device: torch.device
    ckpt_path: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    start_epoch: int = 0
    dynamic_batch: bool = False
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    scheduler: Any = None
    augment: nn.Module | None = None

    def checkpoint(self, epoch: int, extra: dict[str, Any] | None) -> dict[str, Any]:
        """Everything a resumed fold needs to continue exactly where this one is after ``epoch`` epochs."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "shuffle_rng": self.shuffle_gen.get_state(),
                **({"scheduler": self.scheduler.state_dict()} if self.scheduler is not None else {}),
                **rng_states(self.device), "epoch": epoch, "fold": self.fold, "history": self.history,
                **(extra or {})}


def _start_fold(model: nn.Module, cfg: Any, device: torch.device, ctx: DistContext, fold: int,
                fold_dir: str | Path | None, log: Callable[[str], None], train_targets: np.ndarray,
                n_classes: int, image_size: int) -> _Fold:
    """Seed, place the model, build the optimizer and the recipe's parts, resume from ``fold_dir``'s checkpoint,
    wrap and compile."""
    seed_everything(cfg.seed * 1000 + fold, cfg.deterministic)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg.lr, cfg.betas, cfg.weight_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(cfg.amp == "fp16" and device.type == "cuda"))
    state = _Fold(model, model, optimizer, scaler, torch.Generator().manual_seed(cfg.seed * 1000 + fold), fold,
                  cfg, ctx, device, Path(fold_dir) / "checkpoint.pt" if fold_dir is not None else None,
                  loss_fn=recipe.make_loss(cfg.imbalance, train_targets, n_classes, cfg.label_smoothing,
                                           cfg.focal_gamma, device),
                  scheduler=recipe.make_scheduler(optimizer, cfg.lr_schedule, cfg.warmup_epochs, cfg.epochs),
                  augment=recipe.make_augment(cfg.augment, image_size))
    if cfg.imbalance == "weighted_ce":
        weights = recipe.class_weights(train_targets, n_classes)
        log(f"fold {fold}: class weights from its training images: {', '.join(f'{w:.3f}' for w in weights)}")
    if state.ckpt_path is not None:
        if ctx.is_main:
            remove_partial_saves(state.ckpt_path)
        if state.ckpt_path.is_file():
            state.history, state.start_epoch = load_fold_state(state, state.ckpt_path, device)
            log(f"fold {fold}: resuming after epoch {state.start_epoch}")
    for note in flag_notes(cfg, device):
        log(f"fold {fold}: {note}")
    dist_mod.barrier(ctx)  # every rank has read the checkpoint before rank 0 may overwrite it
    wrapped = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state.step_model = wrapped
    if cfg.compile:
        # Blocks are compiled in place inside the DDP wrapper; a whole-model compile wraps DDP itself.
        state.step_model, how = compile_model(wrapped, backend=cfg.compile_backend, scope=cfg.compile_scope,
                                              mode=cfg.compile_mode)
        log(f"fold {fold}: {how}")
    state.dynamic_batch = state.step_model is not wrapped  # a whole-model compile: one graph for every batch size
    return state


def _epoch_order(state: _Fold, train_idx: np.ndarray, targets: np.ndarray, epoch: int) -> np.ndarray:
    """The training images' order this epoch (under DDP, this rank's share of a common order); with a balanced
    sampler, a class-balanced draw with replacement seeded by the run, fold and epoch."""
    if state.cfg.imbalance == "balanced_sampler":
        draw = torch.Generator().manual_seed(recipe.batch_seed(state.cfg.seed, state.fold, epoch, 0))
        train_idx = recipe.balanced_order(train_idx, targets, draw)
    if state.ctx.enabled:
        return dist_mod.epoch_order(train_idx, state.ctx, state.cfg.seed * 1000 + state.fold, epoch)
    return train_idx[torch.randperm(len(train_idx), generator=state.shuffle_gen).numpy()]


def _forward_loss(state: _Fold, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and cross-entropy of one batch; BatchNorm's refusal of a batch of one is one clear line."""
    try:
        with autocast(state.device, state.cfg.amp):
            logits = state.step_model(x)
            return logits, state.loss_fn(logits.float(), y)
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            raise
        raise UserError(f"--batch-size {state.cfg.batch_size}: a batch of {len(y)} image(s) leaves BatchNorm one "
                        "value per channel on the model's smallest feature map; use --batch-size 2 or more, or a "
                        "larger --image-size") from None


def _refuse_nonfinite(state: _Fold, loss: torch.Tensor, epoch: int, batch: int) -> None:
    """Stop a diverged fold with one line, keeping the weights that diverged for a look."""
    if not dist_mod.any_nonfinite(loss, state.ctx):
        return
    debug = state.ckpt_path.with_name("debug_nonfinite.pt") if state.ckpt_path is not None else None
    if debug is not None and state.ctx.is_main:
        atomic_save({"model": state.model.state_dict(), "epoch": epoch, "batch": batch}, debug)
    raise NonFiniteLossError(f"fold {state.fold}: loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}; "
                             f"lower --lr (now {state.cfg.lr}) or use --amp off"
                             + (f" (model state saved to {debug})" if debug else ""))


def _batch(state: _Fold, raw: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor, epoch: int,
           b: int) -> torch.Tensor:
    """One training batch, standardized on the device (and augmented, with draws seeded per batch)."""
    if state.augment is None:
        return normalize_batch(raw, mean_t, std_t, state.cfg.channels_last)
    seed = recipe.batch_seed(state.cfg.seed, state.fold, epoch, b, state.ctx.rank)
    return recipe.augment_batch(state.augment, raw, mean_t, std_t, state.cfg.channels_last, seed)


def _train_epoch(state: _Fold, images: DeviceImages, targets_dev: torch.Tensor, train_idx: np.ndarray,
                 targets: np.ndarray, epoch: int, mean_t: torch.Tensor, std_t: torch.Tensor) -> tuple[float, float]:
    """One pass over the training images; returns the mean loss and accuracy (over all ranks)."""
    cfg, device = state.cfg, state.device
    state.model.train()
    order = _epoch_order(state, train_idx, targets, epoch)
    # Sums stay on the device: the only wait for the GPU per step is the non-finite check.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    local_batch, _ = process_batch_size(cfg.batch_size, state.ctx.world)  # run_cv logs a global batch that grows
    bar = tqdm(batch_bounds(len(order), local_batch), desc=f"fold {state.fold} epoch {epoch + 1}/{cfg.epochs}",
               unit="batch", leave=False, disable=not (cfg.progress and state.ctx.is_main), mininterval=1.0)
    order_dev = torch.as_tensor(order, device=device)
    for b, (start, stop) in enumerate(bar):
        chunk = order_dev[start:stop]
        x = _batch(state, images.batch(chunk if images.on_device else order[start:stop]), mean_t, std_t, epoch, b)
        if state.dynamic_batch:
            mark_batch_dynamic(x)
        y = targets_dev[chunk]
        logits, loss = _forward_loss(state, x, y)
        _refuse_nonfinite(state, loss, epoch, b)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        loss_sum += loss.detach().double() * len(chunk)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(chunk)
    loss_total, correct_total, n = dist_mod.all_reduce_sum([loss_sum.item(), float(correct.item()), seen],
                                                           state.ctx, device)
    return loss_total / n, correct_total / n


def _evaluate_fold(state: _Fold, images: DeviceImages, targets: np.ndarray, test_idx: np.ndarray, epoch: int,
                   mean: Sequence[float], std: Sequence[float]) -> tuple[float, float, np.ndarray]:
    """Test loss, accuracy and probabilities after ``epoch``; non-finite outputs stop the fold."""
    eval_model = state.step_model if not state.ctx.enabled else state.model
    val_loss, probs = _evaluate_split(eval_model, images, targets, test_idx, state.cfg, mean, std, state.ctx,
                                      state.device, state.dynamic_batch and not state.ctx.enabled)
    if not np.isfinite(probs).all():  # finite training loss, but the weights themselves overflowed
        raise NonFiniteLossError(f"fold {state.fold}: the model's outputs on its test images became non-finite "
                                 f"after epoch {epoch + 1}; lower --lr (now {state.cfg.lr}) or use --amp off")
    val_acc = float((probs.argmax(1) == targets[test_idx]).mean()) if len(test_idx) else math.nan
    return val_loss, val_acc, probs


def _log_epoch(state: _Fold, row: dict[str, float], log: Callable[[str], None]) -> None:
    val = "" if math.isnan(row["val_loss"]) else f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}"
    log(f"fold {state.fold} epoch {row['epoch']}/{state.cfg.epochs}: loss {row['train_loss']:.4f} "
        f"acc {row['train_acc']:.3f}{val} ({row['seconds']:.1f}s)")


def _due(epoch: int, every: int, last: bool) -> bool:
    """Whether the work done every ``every`` epochs (and after the last) falls after 0-based ``epoch``."""
    return last or (epoch + 1) % every == 0


def train_fold(model: nn.Module, images: np.ndarray | DeviceImages, targets: np.ndarray, train_idx: np.ndarray,
               test_idx: np.ndarray, cfg: Any, mean: Sequence[float], std: Sequence[float],
               device: torch.device | None = None, fold_dir: str | Path | None = None, fold: int = 0,
               checkpoint_extra: dict[str, Any] | None = None,
               log: Callable[[str], None] = print, dist_ctx: DistContext | None = None) -> FoldResult:
    """Train ``model`` on ``train_idx`` with Adam and cross-entropy (``cfg`` a :class:`TrainConfig`), evaluating on
    ``test_idx`` every ``cfg.eval_every`` epochs and after the last.

    With ``fold_dir`` a checkpoint ``checkpoint.pt`` is written there every ``cfg.checkpoint_every`` epochs and
    after the last (temporary file, then rename) and, if one is already there, training resumes from it.
    Returns the history and the last epoch's test probabilities.

    With ``dist_ctx`` of a torchrun launch (:mod:`ussf_lib.training.distributed`) every process calls this with
    the same arguments: the model is wrapped in ``DistributedDataParallel``, each global batch of
    ``cfg.batch_size`` is split across the processes, the test images are split for evaluation and their
    probabilities gathered, and only rank 0 writes the checkpoint.
    """
    ctx = dist_ctx or DistContext()
    device = device or select_device()
    started = time.perf_counter()
    dev_images = images if isinstance(images, DeviceImages) else DeviceImages(images, device)
    targets = np.asarray(targets, dtype=np.int64)
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    n_classes = int(targets.max()) + 1 if len(targets) else 0
    state = _start_fold(model, cfg, device, ctx, fold, fold_dir, log, targets[train_idx], n_classes,
                        dev_images.images.shape[1])
    # On the device once per fold: a copy from host memory waits for every kernel queued before it.
    targets_dev = torch.tensor(targets, dtype=torch.int64, device=device)
    mean_t, std_t = normalization_on(device, mean, std)
    probs = np.zeros((len(test_idx), 0))
    # The checkpoint is written while the next epoch trains; leaving the block waits for the last write.
    with CheckpointWriter(background=True) as writer:
        for epoch in range(state.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            train_loss, train_acc = _train_epoch(state, dev_images, targets_dev, train_idx, targets, epoch, mean_t,
                                                 std_t)
            train_seconds = time.perf_counter() - t0  # .item() in the epoch waited for its last step
            last = epoch + 1 == cfg.epochs
            val_loss = val_acc = math.nan
            if _due(epoch, cfg.eval_every, last):
                val_loss, val_acc, probs = _evaluate_fold(state, dev_images, targets, test_idx, epoch, mean, std)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": state.optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0, "train_seconds": train_seconds}
            state.history.append(row)
            _log_epoch(state, row, log)
            if state.scheduler is not None:
                state.scheduler.step()
            if state.ckpt_path is not None and ctx.is_main and _due(epoch, cfg.checkpoint_every, last):
                state.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                writer.save(state.checkpoint(epoch + 1, checkpoint_extra), state.ckpt_path)
    if probs.shape[1] == 0:  # resumed after the last epoch: recompute the test probabilities
        _, probs = _evaluate_split(state.model, dev_images, targets, test_idx, cfg, mean, std, ctx, device)
    dist_mod.barrier(ctx)
    return FoldResult(history=pd.DataFrame(state.history), probs=probs, test_idx=test_idx,
                      seconds=time.perf_counter() - started)

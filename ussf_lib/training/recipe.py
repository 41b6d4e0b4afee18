"""The opt-in training recipe for small real data: augmentation, learning-rate schedule, class imbalance, label
smoothing. Every default is the paper's protocol (section 2.4): none of it.

* ``augment``: ``light`` is a random resized crop (scale 0.8-1), a horizontal flip, a rotation of up to 10 degrees
  and brightness/contrast jitter; ``ultrasound`` adds what a scanner varies (gain and gamma, multiplicative
  speckle, a mild blur) and never flips vertically, since depth has a direction in B-mode. Batches are augmented
  on the training device by kornia, with parameters drawn per image; each batch's draws are seeded from the run's
  seed, the fold, the epoch and the batch, so a seed gives the same run and ``--resume`` stays exact.
* ``lr_schedule`` / ``warmup_epochs``: torch's own schedulers, stepped once per epoch; their state is kept in the
  checkpoint.
* ``imbalance``: ``weighted_ce`` weighs cross-entropy with scikit-learn's "balanced" class weights of the training
  fold alone; ``balanced_sampler`` draws each epoch's images with replacement, every class equally likely;
  ``focal`` is the multi-class focal loss ``-(1 - p_t)^gamma log p_t`` (Lin et al., 2017).
* ``label_smoothing``: torch's ``CrossEntropyLoss(label_smoothing=...)``.

The test loss in ``history.csv`` stays plain cross-entropy whatever the recipe, so runs compare.
Introduced in ``notebooks/04_train_cross_validation.ipynb``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

#: Multiplicative speckle's looks (the shape of its Gamma distribution, mean 1): fewer looks, stronger speckle.
SPECKLE_LOOKS = (8.0, 40.0)


class Speckle(nn.Module):
    """Multiplicative speckle on a [0, 1] batch: each pixel times Gamma(L, 1/L) noise (mean 1, variance 1/L), one
    noise field shared by the channels (a grey B-mode image stored as RGB), L drawn per image from
    :data:`SPECKLE_LOOKS`, applied to each image with probability ``p``.

    Written here because no augmentation library models speckle: fully developed speckle's intensity is
    exponentially distributed and averaging L looks makes it Gamma-distributed.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        lo, hi = SPECKLE_LOOKS
        looks = (lo + (hi - lo) * torch.rand(n, device=x.device)).view(n, 1, 1, 1)
        noise = torch._standard_gamma(looks.expand(n, 1, *x.shape[2:]).contiguous()) / looks
        apply = (torch.rand(n, device=x.device) < self.p).view(n, 1, 1, 1)
        return torch.where(apply, (x * noise).clamp_(0.0, 1.0), x)


def make_augment(name: str, image_size: int) -> nn.Module | None:
    """The augmentation pipeline ``name`` (``none`` gives ``None``) for [0, 1] NCHW batches of ``image_size``."""
    if name == "none":
        return None
    import kornia.augmentation as K

    light = [K.RandomResizedCrop((image_size, image_size), scale=(0.8, 1.0), ratio=(0.9, 1.1)),
             K.RandomHorizontalFlip(),
             K.RandomRotation(10.0, p=0.5),
             K.ColorJitter(brightness=0.1, contrast=0.1, p=0.8)]
    if name == "light":
        return K.AugmentationSequential(*light)
    scanner = [K.RandomGamma(gamma=(0.8, 1.25), gain=(0.85, 1.15), p=0.8),
               Speckle(p=0.5),
               K.RandomGaussianBlur((3, 3), sigma=(0.1, 0.8), p=0.3)]
    return nn.Sequential(K.AugmentationSequential(*light), *scanner)


def batch_seed(seed: int, fold: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The seed of one batch's augmentation draws: the same for the same run, fold, epoch, batch and process."""
    return ((((seed * 1000 + fold) * 100_003 + epoch) * 10_007 + batch) * 101 + rank) % (2**63 - 1)


def augment_batch(augment: nn.Module, batch: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor,
                  channels_last: bool, seed: int) -> torch.Tensor:
    """uint8 NHWC batch -> augmented, standardized float32 NCHW, with the draws seeded by ``seed`` alone (the
    global random state is left as it was)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        x = augment(x).clamp_(0.0, 1.0)
    x = (x - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_epochs: int,
                   epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch schedule: a linear warm-up from lr/(warmup+1) over ``warmup_epochs``, then constant or a
    cosine decay to 0 over the remaining epochs. ``None`` for the paper's constant rate without warm-up."""
    from torch.optim import lr_scheduler

    if schedule == "constant" and warmup_epochs == 0:
        return None
    warm = (lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup_epochs + 1), total_iters=warmup_epochs)
            if warmup_epochs else None)
    if schedule == "constant":
        return warm
    cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs - warmup_epochs))
    if warm is None:
        return cosine
    return lr_scheduler.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_epochs])


def class_weights(train_targets: np.ndarray, n_classes: int) -> np.ndarray:
    """scikit-learn's "balanced" weights ``n / (k * n_c)`` from the training fold's labels; a class absent from
    the fold weighs 0 (it has no image to weigh)."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(train_targets)
    weights = np.zeros(n_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=train_targets)
    return weights


def make_loss(imbalance: str, train_targets: np.ndarray, n_classes: int, label_smoothing: float,
              focal_gamma: float, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss of one fold: cross-entropy (class-weighted for ``weighted_ce``) or the focal loss."""
    weight = None
    if imbalance == "weighted_ce":
        weight = torch.tensor(class_weights(train_targets, n_classes), dtype=torch.float32, device=device)
    if imbalance != "focal":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)

    def focal(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
        p_t = torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
        return ((1.0 - p_t).pow(focal_gamma) * ce).mean()

    return focal


def balanced_order(train_idx: np.ndarray, targets: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """One epoch of ``len(train_idx)`` images drawn with replacement, each class equally likely (torch's
    ``WeightedRandomSampler`` rule: weight 1 / the image's class count)."""
    labels = targets[train_idx]
    weights = 1.0 / np.bincount(labels)[labels]
    picks = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), len(train_idx), replacement=True,
                              generator=generator)
    return train_idx[picks.numpy()]


def describe(cfg: Any) -> str | None:
    """One line naming the recipe's parts a run uses (``None`` for the paper's protocol)."""
    parts = []
    if cfg.augment != "none":
        parts.append(f"augment {cfg.augment}")
    if cfg.lr_schedule != "constant" or cfg.warmup_epochs:
        parts.append(f"lr {cfg.lr_schedule}" + (f" after {cfg.warmup_epochs} warm-up epoch(s)"
                                                  if cfg.warmup_epochs else ""))
    if cfg.imbalance != "none":
        parts.append(f"imbalance {cfg.imbalance}" + (f" (gamma {cfg.focal_gamma:g})" if cfg.imbalance == "focal"
                                                      else ""))
    if cfg.label_smoothing:
        parts.append(f"label smoothing {cfg.label_smoothing:g}")
    return "recipe: " + ", ".join(parts) if parts else None

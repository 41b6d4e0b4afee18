"""Data-parallel training across processes with torch.distributed, launched by ``torchrun``.

``torchrun --nproc_per_node N -m ussf_lib cv ...`` starts N copies of the same command. Each reads the
same data and folds; within a fold every global batch is split across the processes, gradients are averaged
by ``DistributedDataParallel``, the test images are split for evaluation and their probabilities are
gathered, and only rank 0 writes the run folder. Without torchrun (``WORLD_SIZE`` unset) everything here is
a no-op. A launch with one process (``--nproc_per_node 1``) still runs the distributed code path with a
process group of one, so that path can be checked on a machine with a single GPU. The backend is NCCL on GPUs
and gloo on CPU (which the tests use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world`` processes (1 when not distributed).

    ``launched`` marks a torchrun launch; with it even a world of one trains through DDP.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistContext:
    """Read torchrun's environment; initialise the process group on first use."""
    # torchrun sets both; WORLD_SIZE alone may be left over in a user's shell.
    if "WORLD_SIZE" not in os.environ or "LOCAL_RANK" not in os.environ:
        return DistContext()
    world = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world=world, local_rank=local_rank, launched=True)


def device_for(ctx: DistContext, requested: torch.device) -> torch.device:
    """Each process of a multi-GPU run takes the GPU of its local rank."""
    if ctx.enabled and requested.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return requested


def shard(indices: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This rank's share of ``indices`` (strided, so shares differ in size by at most one)."""
    return indices[ctx.rank::ctx.world] if ctx.enabled else indices


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device | None = None) -> list[float]:
    """Sum a few numbers over all ranks (epoch loss, correct count, images seen).

    ``device`` is the training device: NCCL reduces only GPU tensors, gloo any.
    """
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather_rows(rows: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Reassemble rows sharded with :func:`shard` into their original order, on every rank."""
    if not ctx.enabled:
        return rows
    parts: list[np.ndarray | None] = [None] * ctx.world
    dist.all_gather_object(parts, rows)
    arrays = [np.asarray(p) for p in parts]
    # A rank with no rows (fewer test images than processes) sends an empty array of unknown width.
    width = next((a.shape[1:] for a in arrays if len(a)), rows.shape[1:])
    out = np.empty((sum(len(a) for a in arrays), *width), dtype=rows.dtype)
    for r, part in enumerate(arrays):
        if len(part):
            out[r::ctx.world] = part
    return out


def epoch_order(train_idx: np.ndarray, ctx: DistContext, seed: int, epoch: int) -> np.ndarray:
    """This rank's shuffled share of ``train_idx`` for ``epoch``, from torch's ``DistributedSampler``.

    Every rank draws the same permutation from ``seed + epoch`` and takes its own strided share; the shares are
    padded to equal length so every rank runs the same number of steps (DDP needs that).
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(train_idx)), num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return np.asarray(train_idx)[np.fromiter(iter(sampler), dtype=np.int64)]


def sync_buffers(model: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank before evaluating or saving.

    DDP averages gradients but each rank updates its running statistics from its own share of the last batch.
    """
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def any_nonfinite(loss: torch.Tensor, ctx: DistContext) -> bool:
    """True when the loss is NaN or infinite on any rank, so that all ranks stop together instead of hanging."""
    value = loss.detach().float().reshape(1).clone()
    if ctx.enabled:
        dist.all_reduce(value)  # a NaN or inf anywhere makes the sum non-finite
    return not bool(torch.isfinite(value).item())


def finish(ctx: DistContext) -> None:
    """Wait for every rank, then tear the process group down (end of a torchrun command)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()

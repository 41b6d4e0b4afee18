"""Writing training checkpoints: whole or not at all, and without holding up training.

A fold's checkpoint (weights, Adam's moments, RNG states, history; 274 MB for US-SFNet) is written after
every epoch by default. Written in the training loop, that write stops training for a sizeable part of a GPU
epoch (0.3-0.8 s on the 2-core CI machine's disk, against about 1.8 s for a compiled H100 training epoch of the
paper's protocol; docs/performance.md), so :class:`CheckpointWriter` takes a snapshot of the state on the host (the only part
training waits for) and writes it in a background thread while the next epoch trains. torch's own
asynchronous saving (``torch.distributed.checkpoint.async_save``) writes a folder of shards, not the single
``checkpoint.pt`` that ``ussf predict`` and ``--resume`` read, so a thread of our own does it here.
Introduced in ``notebooks/04_train_cross_validation.ipynb`` (through :func:`ussf_lib.training.loop.train_fold`).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ussf_lib.errors import UserError


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: an interruption leaves the old file or the new, whole.

    A write the system refuses (a full disk, no permission) removes the temporary file and raises
    :class:`UserError` naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: could not write the checkpoint ({exc.strerror or exc}); free disk space or "
                        "choose another --out") from exc


def host_snapshot(obj: Any) -> Any:
    """A copy of ``obj`` whose tensors are new CPU tensors and whose dicts, lists and tuples are new containers.

    Training goes on changing the weights, optimizer state and history in place after a checkpoint is taken;
    the snapshot is what they were at that moment.
    """
    if isinstance(obj, torch.Tensor):
        # clone() on the CPU; to("cpu") already copies from a GPU.
        return obj.detach().clone() if obj.device.type == "cpu" else obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {key: host_snapshot(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_snapshot(value) for value in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints one at a time, in a background thread (``background=True``) or in the caller's.

    :meth:`save` returns once the state is copied to the host; the file appears, whole, when the write
    finishes. A later :meth:`save` or :meth:`wait` first waits for the write before it and raises its error,
    if any, so a full disk stops training at the next checkpoint. Use as a context manager, or call
    :meth:`wait` before relying on the file.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ussf-checkpoint") if background else None
        self._pending: Future | None = None

    def save(self, state: dict[str, Any], path: str | os.PathLike) -> None:
        snapshot = host_snapshot(state)
        self.wait()
        if self._pool is None:
            atomic_save(snapshot, path)
        else:
            self._pending = self._pool.submit(atomic_save, snapshot, path)

    def wait(self) -> None:
        """Block until the last checkpoint is on disk; raise the error its write met."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Training checkpoints: written whole or not at all without holding up training, and read back checked.

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
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ussf_lib.errors import UserError
from ussf_lib.files import writing
from ussf_lib.models import build_model
from ussf_lib.training.runtime import restore_rng_states


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: an interruption leaves the old file or the new, whole.

    A write the system refuses (a full disk, which makes ``torch.save`` raise a RuntimeError; a read-only file
    system; no permission) removes the temporary file and raises :class:`UserError` naming the file and the fix;
    the previous checkpoint stays, so the run can be resumed once there is room.
    """
    path = Path(path)
    with writing(path, then=_resume_hint(path)) as tmp:
        torch.save(obj, tmp)


def _resume_hint(path: Path) -> str:
    """How to go on after a fold's checkpoint could not be written or read: resume its run."""
    run = path.parent.parent.parent
    if path.parent.parent.name == "folds" and (run / "config.json").is_file():
        return f"ussf cv --resume {run}"
    return "run the command again"


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


def remove_partial_saves(ckpt_path: Path) -> None:
    """Delete the half-written temporary files a process killed while saving left beside ``ckpt_path`` (the
    checkpoint itself is always whole)."""
    for stale in ckpt_path.parent.glob(f".{ckpt_path.name}.tmp*"):
        stale.unlink(missing_ok=True)


def load_fold_state(fold: Any, ckpt_path: Path, device: torch.device) -> tuple[list[dict[str, float]], int]:
    """Resume a fold: load ``ckpt_path`` into ``fold``'s model, optimizer, GradScaler and shuffle generator, restore
    the random-number states, and return the history so far and the number of epochs done.

    Read on the host: the random-number states must stay CPU byte tensors, and ``load_state_dict`` moves the
    weights and Adam's moments to the model's device itself.
    """
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    fold.model.load_state_dict(state["model"])
    fold.optimizer.load_state_dict(state["optimizer"])
    fold.scaler.load_state_dict(state["scaler"])
    fold.shuffle_gen.set_state(state["shuffle_rng"])
    restore_rng_states(state, device)
    return list(state["history"]), int(state["epoch"])


#: What a fold checkpoint's ``meta`` must hold (written by :func:`ussf_lib.training.experiment.run_cv`).
META_KEYS: tuple[str, ...] = ("model_name", "classes", "image_size", "mean", "std", "model_kwargs")


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a fold's ``checkpoint.pt`` (tensors and plain metadata only: ``weights_only=True``).

    A missing file, a file that is not a checkpoint, or one without ``model`` weights and complete ``meta`` is a
    :class:`UserError`.
    """
    path = Path(path)
    if path.is_dir():
        folds = sorted(path.glob("folds/*/checkpoint.pt")) or sorted(path.glob("*/folds/*/checkpoint.pt"))  # a run, a comparison
        hint = f"pass one fold's checkpoint, e.g. {folds[0]}" if folds else "pass RUN/folds/K/checkpoint.pt of a `ussf cv` run"
        raise UserError(f"{path}: is a folder, not a checkpoint; {hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint; pass RUN/folds/K/checkpoint.pt of a `ussf cv` run")
    try:
        with warnings.catch_warnings():  # torch warns about what it then refuses; the error below says it once
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        raise UserError(f"{path}: not a ussf checkpoint ({type(exc).__name__}); pass RUN/folds/K/checkpoint.pt") from None
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: checkpoint lacks model metadata; pass RUN/folds/K/checkpoint.pt of a `ussf cv` run")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint metadata lacks {missing}; pass RUN/folds/K/checkpoint.pt of a `ussf cv` run")
    return state


def check_meta(path: str | Path, meta: dict[str, Any], expected: dict[str, Any], fix: str) -> None:
    """Raise :class:`UserError` when ``meta`` (a checkpoint's) differs from ``expected`` in any key ``expected`` has.

    The message names the checkpoint, what it was made for, what is expected, and ``fix``.
    """
    differ = [k for k in expected if meta.get(k) != expected[k]]
    if differ:
        have = ", ".join(f"{k}={meta.get(k)!r}" for k in differ)
        want = ", ".join(f"{k}={expected[k]!r}" for k in differ)
        raise UserError(f"{path}: checkpoint was made for {have}, not {want}; {fix}")


def check_weights_fit(path: str | Path, model: nn.Module, weights: dict[str, Any], meta: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``weights`` has exactly the parameter names and shapes of ``model``."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()}
    if own != theirs:
        odd = sorted(set(own) ^ set(theirs)) or sorted(k for k in own if own[k] != theirs[k])
        raise UserError(f"{path}: weights do not fit model {meta['model_name']!r} with {len(meta['classes'])} classes "
                        f"(first mismatch: {odd[0]!r}); the checkpoint comes from another model or class list")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", expect_model: str | None = None,
                    expect_classes: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a fold's ``checkpoint.pt``; returns it (eval mode) and its metadata.

    A checkpoint whose weights do not fit the model its metadata names is refused; so is one made for another
    model or class list than ``expect_model`` / ``expect_classes`` when those are given.
    """
    state = read_checkpoint(path, device)
    meta = state["meta"]
    expected: dict[str, Any] = {}
    if expect_model is not None:
        expected["model_name"] = expect_model
    if expect_classes is not None:
        expected["classes"] = list(expect_classes)
    check_meta(path, meta, expected, "pass a checkpoint of a run with that model and class list")
    model = build_model(meta["model_name"], len(meta["classes"]), image_size=meta["image_size"], **meta["model_kwargs"])
    check_weights_fit(path, model, state["model"], meta)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), meta

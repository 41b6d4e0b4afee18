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

import math
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


def restart_fold_hint(ckpt_path: Path) -> str:
    """The fix for a fold checkpoint that cannot be resumed: delete it, and the fold trains again from epoch 1."""
    fold = ckpt_path.parent.name
    return f"delete {ckpt_path} to train fold {fold} again from its first epoch, then {_resume_hint(ckpt_path)}"


#: What a resumable fold checkpoint holds beside ``model`` and ``meta`` (:meth:`ussf_lib.training.loop._Fold.checkpoint`).
RESUME_KEYS: tuple[str, ...] = ("optimizer", "scaler", "shuffle_rng", "torch_rng", "history", "epoch")


def check_resumable(path: str | Path, state: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless ``state`` (a fold checkpoint) holds what resuming its fold needs."""
    missing = [k for k in RESUME_KEYS if k not in state]
    epoch = state.get("epoch")
    if not missing and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
        missing = ["a whole epoch count"]
    if missing:
        raise UserError(f"{path}: damaged checkpoint (lacks {', '.join(missing)}); {restart_fold_hint(Path(path))}")


def load_fold_state(fold: Any, ckpt_path: Path, device: torch.device) -> tuple[list[dict[str, float]], int]:
    """Resume a fold: load ``ckpt_path`` into ``fold``'s model, optimizer, GradScaler, scheduler and shuffle generator, restore
    the random-number states, and return the history so far and the number of epochs done.

    Read on the host: the random-number states must stay CPU byte tensors, and ``load_state_dict`` moves the
    weights and Adam's moments to the model's device itself. A checkpoint that cannot be loaded is a
    :class:`UserError` that says deleting it restarts the fold.
    """
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        check_resumable(ckpt_path, state)
        fold.model.load_state_dict(state["model"])
        fold.optimizer.load_state_dict(state["optimizer"])
        fold.scaler.load_state_dict(state["scaler"])
        fold.shuffle_gen.set_state(state["shuffle_rng"])
        if fold.scheduler is not None and "scheduler" in state:
            fold.scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state, device)
        return list(state["history"]), int(state["epoch"])
    except (UserError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # torch raises several unrelated types for a damaged file or state
        why = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{ckpt_path}: damaged checkpoint, cannot resume from it ({why}); "
                        f"{restart_fold_hint(ckpt_path)}") from None


#: What a fold checkpoint's ``meta`` must hold (written by :func:`ussf_lib.training.experiment.run_cv`).
META_KEYS: tuple[str, ...] = ("model_name", "classes", "image_size", "mean", "std", "model_kwargs")


#: The bounds :func:`check_checkpoint_meta` holds a checkpoint's metadata to, before anything is built from it.
META_LIMITS = {"image_size": (8, 2048), "classes": (2, 1000)}
#: What the ``fix`` of :func:`read_checkpoint` says by default.
CHECKPOINT_FIX = "pass RUN/folds/K/checkpoint.pt of a `ussf cv` run"


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a plain keyword-argument value: None, bool, int, float, str, or a short list/tuple/dict
    of those (as ``config.json``'s ``model_kwargs`` holds)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, str) or len(value) <= 1000
    if depth < 3 and isinstance(value, (list, tuple)) and len(value) <= 100:
        return all(_plain(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict) and len(value) <= 100:
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's ``meta`` (``None`` when it is usable), checked before a model is built
    from it: a crafted ``image_size`` or class count must not make anyone allocate gigabytes."""
    from ussf_lib.models.registry import list_models

    size, classes, name, kwargs = meta["image_size"], meta["classes"], meta["model_name"], meta["model_kwargs"]
    lo, hi = META_LIMITS["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        return f"image_size={_short(size)} is not a whole number from {lo} to {hi}"
    lo, hi = META_LIMITS["classes"]
    if not isinstance(classes, (list, tuple)) or not lo <= len(classes) <= hi:
        count = len(classes) if isinstance(classes, (list, tuple)) else "no list of"
        return f"classes holds {count} names, not {lo} to {hi}"
    if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        return f"classes={_short(list(classes))} are not distinct non-empty names"
    for key in ("mean", "std"):
        values = meta[key]
        if (not isinstance(values, (list, tuple)) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values)
                or (key == "std" and not all(v > 0 for v in values))):
            return f"{key}={_short(values)} is not 3 finite numbers" + (" above 0" if key == "std" else "")
    if not isinstance(name, str) or name not in list_models():
        return f"model_name={_short(name)} is not a registered model (ussf models lists them)"
    if not isinstance(kwargs, dict) or not _plain(kwargs):
        return f"model_kwargs={_short(kwargs)} is not a dict of plain values"
    return None


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu", fix: str | None = None) -> dict[str, Any]:
    """The contents of a fold's ``checkpoint.pt`` (tensors and plain metadata only: ``weights_only=True``).

    A missing file, a file that is not a checkpoint, or one without ``model`` weights and complete, sane ``meta``
    (:func:`meta_problem`) is a :class:`UserError` ending with ``fix``.
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
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # torch raises several unrelated types for a file that is not a checkpoint
        raise UserError(f"{path}: not a ussf checkpoint ({type(exc).__name__}); "
                        f"{fix or 'pass RUN/folds/K/checkpoint.pt'}") from None
    fix = fix or CHECKPOINT_FIX
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path}: checkpoint lacks model metadata; {fix}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{path}: checkpoint metadata lacks {missing}; {fix}")
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"{path}: checkpoint metadata is not usable ({problem}); {fix}")
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

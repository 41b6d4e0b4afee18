"""One cross-validated experiment, from a data folder to a complete run folder.

``run_cv`` wires the one-way flow of the library together: data (index, decode once) -> cv (folds) ->
models (registry) -> train (one fold at a time) -> report (metrics, tables, figures). The CLI's ``ussf cv``,
``make run`` and ``notebooks/04_train_cross_validation.ipynb`` all call it, so they cannot drift apart.

The run folder (see docs/run-folder.md)::

    RUN/config.json, environment.json, splits.csv, classes.json, [skipped.csv],
        folds/K/{history.csv, predictions.csv, metrics.json, checkpoint.pt},
        summary.json, per_class.csv, results.csv, results.md, confusion_matrix.png, learning_curves.png, roc.png

Everything about the input is checked before the run folder is created: a bad path, too few images, an
unreadable image (all of them listed at once) stop the run with one :class:`UserError` and nothing is
written. By default the folds keep every exact or near-duplicate cluster (:mod:`ussf_lib.data.audit`) inside one
fold, joined with the patient groups (``dedup_folds``). A fold whose ``predictions.csv`` exists is finished
and skipped on ``resume``; an unfinished fold continues from its last checkpoint, after checking that the
checkpoint was made for the same model and class list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ussf_lib.data import folds as cv_mod
from ussf_lib.training import distributed as dist_mod
from ussf_lib.data.audit import check_hash_settings, clusters_from_hashes
from ussf_lib.data.index import (ImageIndex, decode_index, fingerprint, load_index, printable,
                                 resolve_normalization)
from ussf_lib import files, settings
from ussf_lib.errors import UserError, same_kind
from ussf_lib.settings import absolute_path
from ussf_lib.models import build_model
from ussf_lib.models.registry import check_image_size, list_models
from ussf_lib.training.checkpoints import (check_meta, check_resumable, check_weights_fit, read_checkpoint,
                                           restart_fold_hint)
from ussf_lib.training.provenance import environment_info
from ussf_lib.evaluation.metrics import fit_temperature
from ussf_lib.evaluation.report import write_report
from ussf_lib.training import recipe
from ussf_lib.training.loop import TrainConfig, evaluate, train_fold
from ussf_lib.training.runtime import DeviceImages, process_batch_size, select_device, seed_everything

#: Settings that are paths: stored absolute, so a run folder can be resumed or reported from any folder.
PATH_SETTINGS: tuple[str, ...] = settings.path_settings()
#: Settings that may differ when a run is resumed without changing its results.
RESUME_FREE_SETTINGS = settings.resume_free()


class _RunChecks:
    """Checks of :class:`CVConfig` beyond each setting's own range: paths made absolute, the image size the model
    takes, the duplicate hash, and the training settings (before any data is read)."""

    def __post_init__(self) -> None:
        for name in PATH_SETTINGS:
            if getattr(self, name):
                setattr(self, name, absolute_path(getattr(self, name)))
        if self.model in list_models():  # the model's own minimum and size multiple, named in the message
            check_image_size(self.model, self.image_size)
        elif self.image_size < 8:
            raise UserError(f"--image-size {self.image_size}: use at least 8 pixels")
        check_hash_settings(self.hash_size, self.dup_threshold, "--dup-threshold")
        settings.check_values(self.to_dict(), "run")
        self.train_config()

    def train_config(self) -> Any:
        return TrainConfig(**{k: getattr(self, k) for k in settings.names("train")})

    def to_dict(self) -> dict[str, Any]:
        return settings.config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known = set(settings.names())
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown setting(s) {unknown}; valid settings are {sorted(known)}")
        for s in settings.SETTINGS:  # a hand-edited value of the wrong kind fails here, not mid-run
            if d.get(s.name) is not None and s.default is not None and not same_kind(d[s.name], s.default):
                raise UserError(f"setting {s.name}={d[s.name]!r} should be of type {type(s.default).__name__} "
                                f"(like {s.default!r})")
        return cls(**d)


CVConfig = settings.config_class(
    "CVConfig", None, _RunChecks,
    """Every setting of a cross-validated run (:data:`ussf_lib.settings.SETTINGS`); ``config.json`` is this,
    resolved. Defaults are the paper's.

    ``skip_bad`` leaves unreadable images out (listed in ``skipped.csv``) instead of stopping; ``dedup_folds`` keeps
    exact and near-duplicate images (phash distance <= ``dup_threshold`` of ``hash_size**2`` bits) inside one fold.
    Introduced in ``notebooks/04_train_cross_validation.ipynb``.""")


def _write_atomic(path: Path, text: str, run: Path | None = None) -> None:
    """Write a file so that an interruption leaves either the old or the new content, never half of it; a refused
    write (full disk, read-only, no permission) is one line that says to resume ``run`` (default: the folder)."""
    run = run or path.parent
    resumable = (run / "config.json").is_file()  # before the first header file, a resume has nothing to go on
    files.write_text(path, text, then=f"ussf cv --resume {run}" if resumable else "run the same command again")


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, leaving out the lock and temporary files of :mod:`ussf_lib.files`."""
    return [p for p in folder.iterdir() if not files.is_ours(p.name)]


def _check_out(cfg: CVConfig, resume: bool) -> Path:
    """Check that ``cfg.out`` can take this run (new, or the same run on ``resume``); writes nothing."""
    out = Path(cfg.out)
    config_file = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; choose a new --out")
    if resume and not config_file.is_file():
        raise UserError(f"{out}: no config.json here; pass --resume a run folder written by `ussf cv`")
    if out.exists() and _entries(out):
        if not config_file.is_file():
            raise UserError(f"{out}: folder exists and is not a ussf run folder; choose a new --out")
        if not resume:
            raise UserError(f"{out}: already holds a run; pass --resume {out} to continue it, or choose a new --out")
        changed = settings.resume_changes(_read_json(config_file), cfg.to_dict())
        if changed:
            raise UserError(f"{out}: settings {changed} differ from the run being resumed; resume with the same settings")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({str(exc).splitlines()[0]}); the run folder is damaged, "
                        "start a new run with a new --out") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object; the run folder is damaged, start a new run with a new --out")
    return value


def load_config(run_dir: str | Path) -> CVConfig:
    """The resolved config of an existing run folder (for ``--resume`` and reports)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.json here; pass a run folder written by `ussf cv`")
    d = _read_json(path)
    d.setdefault("dedup_folds", False)  # runs made before duplicate-aware folds existed did not use them
    try:
        return CVConfig.from_dict(d)
    except UserError as exc:
        raise UserError(f"{path}: {exc}; the run folder is damaged or from another ussf version, start a new run "
                        "with a new --out") from None


@dataclass
class PreparedData:
    """The data of a run, checked and decoded, with its folds: everything :func:`run_cv` needs before training.

    ``index`` holds the readable images (``skipped`` lists the others when ``skip_bad``), ``images`` their uint8
    pixels, ``folds`` a fold per image, ``groups`` the group each image's fold kept whole (``splits.csv``'s
    ``group``), ``clusters`` the duplicate-cluster ids (``None`` without ``dedup_folds``).
    """

    index: ImageIndex
    images: np.ndarray | None
    folds: np.ndarray
    groups: np.ndarray
    clusters: np.ndarray | None
    skipped: pd.DataFrame
    fingerprint: str
    notes: list[str] = field(default_factory=list)

    def splits(self) -> pd.DataFrame:
        """The ``splits.csv`` table."""
        return cv_mod.splits_frame(self.index, self.folds, self.groups)


def prepare_data(cfg: CVConfig, log: Callable[[str], None] = print, splits_file: str | Path | None = None,
                 expect_fingerprint: str | None = None,
                 check_index: Callable[[ImageIndex], None] | None = None, pixels: bool = True) -> PreparedData:
    """Index, check and decode ``cfg``'s data and make its folds, as :func:`run_cv` does; writes nothing.

    ``splits_file`` (default ``cfg.splits``) takes the folds from a saved ``splits.csv``; otherwise they are
    made here, duplicate-aware with ``cfg.dedup_folds``. ``expect_fingerprint`` refuses data that changed since
    (resume); ``check_index`` runs on the index before the (slow) decoding, e.g. to build the model once.
    ``pixels=False`` still reads every file (to find unreadable ones and hash them) but keeps no pixels
    (``images`` is ``None``).
    """
    splits_file = splits_file or cfg.splits
    index = load_index(cfg.data, cfg.manifest, cfg.group_col, cfg.classes, missing_groups=cfg.missing_groups)
    log(f"data: {index.describe()}")
    if cfg.out:
        index.check_outside(cfg.out, "--out")
    if check_index is not None:
        check_index(index)
    if not splits_file:  # fail in a second on a class with too few images, not after decoding
        cv_mod.check_fold_feasible(index.frame["label"], index.frame["group"] if index.has_groups else None, cfg.folds)
    hash_size = cfg.hash_size if cfg.dedup_folds else None
    decoded = decode_index(index, cfg.image_size if pixels else None, cache_dir=cfg.cache_dir, progress=cfg.progress,
                           skip_bad=cfg.skip_bad, hash_size=hash_size)
    listed = index
    index = decoded.index
    notes: list[str] = []
    if len(decoded.skipped):
        notes.append(f"skipped {len(decoded.skipped)} unreadable image(s) (--skip-bad), "
                     f"e.g. {decoded.skipped['path'].iloc[0]}: {decoded.skipped['reason'].iloc[0]}")
    # The contents of the bytes decoded: the fingerprint is that of the pixels trained on.
    data_fp = fingerprint(index, decoded.digests)
    if expect_fingerprint and data_fp != expect_fingerprint:
        raise UserError(f"{cfg.data or cfg.manifest}: the data changed since this run started (fingerprint differs "
                        "from environment.json); restore it, or start a new run with a new --out")
    clusters = clusters_from_hashes(decoded.hashes, cfg.dup_threshold) if hash_size else None
    if clusters is not None:
        n_dup = int((np.bincount(clusters) > 1).sum())
        if n_dup:
            notes.append(f"duplicates: {n_dup} cluster(s) of exact or near-duplicate images "
                         f"(phash distance <= {cfg.dup_threshold}) are each kept inside one fold")
    with _naming_skipped(listed, decoded.skipped):
        if splits_file:
            folds, groups, file_notes = cv_mod.folds_from_file(splits_file, index, cfg.folds, clusters, cfg.group_col)
            notes += file_notes
        else:
            groups = cv_mod.index_groups(index, clusters)
            folds = cv_mod.folds_for_index(index, cfg.folds, cfg.seed, clusters=clusters)
    if not splits_file:
        if groups is None:
            groups = index.frame["group"].to_numpy()
        # Few patients of a class can leave it out of a fold's test part; say so, as for a splits file.
        notes += cv_mod.check_split_composition(index.frame["label"], folds, cfg.folds,
                                                f"the folds made with --seed {cfg.seed}", cv_mod.MADE_FOLDS_REMEDY)
    for note in notes:
        log(note)
    return PreparedData(index=index, images=decoded.images, folds=folds, groups=np.asarray(groups), clusters=clusters,
                        skipped=decoded.skipped, fingerprint=data_fp, notes=notes)


@contextlib.contextmanager
def _naming_skipped(listed: ImageIndex, skipped: pd.DataFrame) -> Any:
    """A class left with fewer images than folds after ``--skip-bad`` says how many of its images were skipped."""
    try:
        yield
    except UserError as exc:
        if not len(skipped) or "fewer than --folds" not in str(exc) and "has no images" not in str(exc):
            raise
        labels = dict(zip(map(printable, listed.frame["relpath"]), listed.frame["label"]))
        per_class = pd.Series([labels.get(p, "?") for p in skipped["path"]]).value_counts()
        counts = ", ".join(f"{n} of class {c!r}" for c, n in per_class.items())
        raise UserError(f"{exc} (--skip-bad left out {len(skipped)} unreadable image(s), {counts}; e.g. "
                        f"{skipped['path'].iloc[0]}: {skipped['reason'].iloc[0]})") from None


def compute_splits(cfg: CVConfig, log: Callable[[str], None] = print) -> pd.DataFrame:
    """The ``splits.csv`` table :func:`run_cv` would make for ``cfg`` (duplicate-aware, bad files skipped or
    refused as configured), without keeping pixels: for sharing one set of folds between several runs."""
    return prepare_data(cfg, log=log, pixels=False).splits()


def _check_before_data(cfg: CVConfig, resume: bool, folds_to_run: Sequence[int] | None) -> tuple[Path, list[int]]:
    """Everything about ``cfg`` that can be refused before any image is read; returns the run folder and folds."""
    check_image_size(cfg.model, cfg.image_size)  # also rejects an unknown model name
    resolve_normalization(cfg.normalization)
    select_device(cfg.device)  # an unknown or absent device
    out = _check_out(cfg, resume)
    if resume:  # the data's own "no such folder" error would suggest another --data, which a resume refuses
        for flag, value in (("--data", cfg.data), ("--manifest", cfg.manifest)):
            if value and not Path(value).exists():
                raise UserError(f"{out}: the run's data {flag} {value} is gone; put it back at that path to resume "
                                "(a resumed run reads the data it started with), or start a new run")
    fold_ids = [int(k) for k in (folds_to_run if folds_to_run is not None else range(cfg.folds))]
    bad_folds = [k for k in fold_ids if not 0 <= k < cfg.folds]
    if bad_folds:
        raise UserError(f"fold(s) {bad_folds} do not exist; folds are numbered 0..{cfg.folds - 1}")
    return out, fold_ids


def _build(cfg: CVConfig, n_classes: int) -> Any:
    return build_model(cfg.model, n_classes, image_size=cfg.image_size, weights_path=cfg.weights_path,
                       **cfg.model_kwargs)


def _check_fold_checkpoints(out: Path, fold_ids: Sequence[int], meta: dict[str, Any], model: Any) -> None:
    """Refuse, before anything is written, an unfinished fold's checkpoint made for another model or class list."""
    for k in fold_ids:
        ckpt = out / "folds" / str(k) / "checkpoint.pt"
        if ckpt.is_file() and not (ckpt.parent / "predictions.csv").is_file():
            state = read_checkpoint(ckpt, fix=restart_fold_hint(ckpt))
            check_resumable(ckpt, state)
            check_meta(ckpt, state["meta"], {key: meta[key] for key in ("model_name", "classes", "image_size",
                                                                        "model_kwargs")},
                       f"delete {ckpt.parent} to train this fold again, or resume with the settings it was made with")
            check_weights_fit(ckpt, model, state["model"], state["meta"])


def _write_run_header(out: Path, cfg: CVConfig, prepared: PreparedData, device: Any, world: int) -> None:
    """The run folder's description, written before any fold trains: config, environment, folds, classes."""
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    env = {**environment_info(device, prepared.fingerprint), "world_size": world}
    _write_atomic(out / "environment.json", json.dumps(env, indent=2))
    cv_mod.save_splits(prepared.index, prepared.folds, out / "splits.csv", prepared.groups,
                       then=f"ussf cv --resume {out}")
    _write_atomic(out / "classes.json", json.dumps(prepared.index.classes))
    if cfg.skip_bad:
        _write_atomic(out / "skipped.csv", prepared.skipped.to_csv(index=False))


def _log_data_parallel(cfg: CVConfig, ctx: Any, device: Any, log: Callable[[str], None]) -> None:
    backend = "NCCL" if device.type == "cuda" else "gloo"
    if ctx.world == 1:
        log(f"data-parallel over 1 process ({backend}): the distributed path with nothing to split")
        return
    _, uneven = process_batch_size(cfg.batch_size, ctx.world)
    log(f"data-parallel over {ctx.world} processes ({backend}); "
        + (uneven or f"each global batch of {cfg.batch_size} is split between them"))


def _run_fold(k: int, cfg: CVConfig, prepared: PreparedData, images: DeviceImages, out: Path, meta: dict[str, Any],
              device: Any, ctx: Any, log: Callable[[str], None]) -> None:
    """Train fold ``k`` (resuming its checkpoint) and, on rank 0, write its history and predictions."""
    fold_dir = out / "folds" / str(k)
    if ctx.is_main:  # only rank 0 writes; a folder made by another rank would race rank 0's check of a new run
        fold_dir.mkdir(parents=True, exist_ok=True)
    index, folds = prepared.index, prepared.folds
    train_idx, test_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    cal_idx = None
    if cfg.temperature_scaling:
        train_idx, cal_idx = cv_mod.calibration_split(train_idx, index.targets, prepared.groups, cfg.seed * 1000 + k)
    seed_everything(cfg.seed * 1000 + k, cfg.deterministic)  # same initial weights whatever ran before
    model = _build(cfg, len(index.classes))
    result = train_fold(model, images, index.targets, train_idx, test_idx, cfg.train_config(), meta["mean"],
                        meta["std"], device=device, fold_dir=fold_dir, fold=k,
                        checkpoint_extra={"meta": meta, "config": cfg.to_dict()}, log=log, dist_ctx=ctx)
    if not ctx.is_main:
        return
    if cal_idx is not None:
        _, cal_probs = evaluate(model, images, index.targets, cal_idx, cfg.batch_size * 2, meta["mean"], meta["std"],
                                cfg.amp, cfg.channels_last)
        temperature = fit_temperature(index.targets[cal_idx], cal_probs)
        _write_atomic(fold_dir / "temperature.json", json.dumps({"temperature": temperature,
                                                                 "calibration_images": int(len(cal_idx))}), out)
        log(f"fold {k}: temperature {temperature:.3f} fitted on {len(cal_idx)} held-out training images")
    _write_atomic(fold_dir / "history.csv", result.history.to_csv(index=False), out)
    pred = predictions_frame(index, test_idx, result.probs, k, prepared.groups)
    # predictions.csv marks the fold finished, so it is written last and atomically.
    _write_atomic(fold_dir / "predictions.csv", pred.to_csv(index=False), out)
    log(f"fold {k}: test accuracy {float((pred['pred'] == pred['label']).mean()):.3f} ({result.seconds:.1f}s)")


def run_cv(cfg: CVConfig, resume: bool = False, log: Callable[[str], None] = print,
           folds_to_run: Sequence[int] | None = None) -> Path:
    """Run (or resume) k-fold cross-validation and write the complete run folder; returns its path.

    Launched by ``torchrun --nproc_per_node N -m ussf_lib cv ...`` every process runs this with the same
    settings: all of them read the data and train data-parallel (:mod:`ussf_lib.training.distributed`), and only
    rank 0 logs and writes the run folder. Introduced in ``notebooks/04_train_cross_validation.ipynb``.
    """
    started = time.perf_counter()
    ctx = dist_mod.context_from_env()
    if not ctx.is_main:
        log = _silent
        cfg = dataclasses.replace(cfg, progress=False)
    out, fold_ids = _check_before_data(cfg, resume, folds_to_run)
    with contextlib.ExitStack() as lock:
        # One process per run folder: an existing one is locked now, before minutes of decoding; a new one when it
        # is created. Only rank 0 writes, so only rank 0 locks (torchrun stops the other ranks if it is refused).
        if ctx.is_main and out.is_dir():
            _lock_run(lock, cfg, resume)
        summary = _run_locked(cfg, out, fold_ids, resume, ctx, lock, log, folds_to_run)
    if not ctx.is_main:
        return out
    summary_line = ", ".join(f"{m} {summary[m]['mean']:.3f}" for m in ("accuracy", "f1", "auc")
                             if summary.get(m) and summary[m]["mean"] is not None)
    log(f"done in {time.perf_counter() - started:.0f}s: {summary_line}")
    log(f"results in {out.resolve()}")
    return out


def _lock_run(lock: contextlib.ExitStack, cfg: CVConfig, resume: bool) -> None:
    """Take the run folder's lock (:func:`ussf_lib.files.run_lock`), check the folder again under it (another
    process may have started a run there meanwhile) and remove what killed processes left half-written."""
    out = Path(cfg.out)
    lock.enter_context(files.run_lock(out))
    _check_out(cfg, resume)
    files.remove_temp_files(out)


def _run_locked(cfg: CVConfig, out: Path, fold_ids: list[int], resume: bool, ctx: Any, lock: contextlib.ExitStack,
                log: Callable[[str], None], folds_to_run: Sequence[int] | None) -> dict:
    """:func:`run_cv` from the data on, with the run folder locked on rank 0 (from its creation, for a new one)."""
    # On resume the folds are the run's own (splits.csv), and the data must be the data it started with.
    resume_splits = out / "splits.csv" if resume and (out / "splits.csv").is_file() else None
    previous_env = out / "environment.json"
    expect_fp = _read_json(previous_env).get("data_fingerprint") if resume and previous_env.is_file() else None
    probe: dict[str, Any] = {}
    # The model is built once before the (slow) decoding, so a bad name, size or weights file fails in a second.
    prepared = prepare_data(cfg, log=log, splits_file=resume_splits, expect_fingerprint=expect_fp,
                            check_index=lambda index: probe.setdefault("model", _build(cfg, len(index.classes))))
    mean, std = resolve_normalization(cfg.normalization)
    meta = {"model_name": cfg.model, "classes": list(prepared.index.classes), "image_size": cfg.image_size,
            "mean": list(mean), "std": list(std), "model_kwargs": dict(cfg.model_kwargs)}
    _check_fold_checkpoints(out, fold_ids, meta, probe["model"])
    device = dist_mod.device_for(ctx, select_device(cfg.device))
    # Decided by every rank before rank 0 writes anything, so that all ranks run the same folds.
    todo = [k for k in fold_ids if not (out / "folds" / str(k) / "predictions.csv").is_file()]
    dist_mod.barrier(ctx)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _lock_run(lock, cfg, resume)  # a new folder: locked from here on (re-entered if already held)
        _write_run_header(out, cfg, prepared, device, ctx.world)
    if ctx.enabled:
        _log_data_parallel(cfg, ctx, device, log)
    if recipe.describe(cfg):
        log(recipe.describe(cfg))
    images = DeviceImages(prepared.images, device)
    for k in fold_ids:
        if k in todo:
            _run_fold(k, cfg, prepared, images, out, meta, device, ctx, log)
        else:
            log(f"fold {k}: already finished, skipped")
    if not ctx.is_main:
        dist_mod.finish(ctx)
        return {}
    summary = write_report(out, partial_ok=folds_to_run is not None, log=log)
    dist_mod.finish(ctx)
    files.remove_temp_files(out)  # none should be left; a finished run holds only its results
    return summary


def _silent(_: str) -> None:
    pass


def predictions_frame(index: ImageIndex, test_idx: np.ndarray, probs: np.ndarray, fold: int,
                      groups: np.ndarray | None = None) -> pd.DataFrame:
    """``predictions.csv`` of one fold: path (relative to the data root), label, group (the patient, or what the
    folds kept whole; ``splits.csv``'s group), fold, pred, prob_<class>..."""
    classes = index.classes
    frame = pd.DataFrame({
        "path": index.frame["relpath"].to_numpy()[test_idx],
        "label": index.frame["label"].to_numpy()[test_idx],
        "group": (groups if groups is not None else index.frame["group"].to_numpy())[test_idx],
        "fold": fold,
        "pred": [classes[i] for i in probs.argmax(1)],
    })
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i]
    return frame

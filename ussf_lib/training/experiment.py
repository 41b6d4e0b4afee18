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

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ussf_lib.data import folds as cv_mod
from ussf_lib.training import distributed as dist_mod
from ussf_lib.data.audit import HASH_SIZE, THRESHOLD, check_hash_settings, clusters_from_hashes
from ussf_lib.data.index import ImageIndex, decode_index, fingerprint, load_index, resolve_normalization
from ussf_lib.errors import UserError, same_kind
from ussf_lib.paper import PAPER_PROTOCOL
from ussf_lib.models import build_model
from ussf_lib.models.registry import check_image_size, list_models
from ussf_lib.training.provenance import environment_info
from ussf_lib.evaluation.report import write_report
from ussf_lib.training.loop import DeviceImages, TrainConfig, process_batch_size, select_device, seed_everything, train_fold

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

#: Settings that are paths: stored absolute, so a run folder can be resumed or reported from any folder.
PATH_SETTINGS: tuple[str, ...] = ("out", "data", "manifest", "splits", "cache_dir", "weights_path")


def absolute_path(path: str | os.PathLike) -> str:
    """``path`` made absolute against the current folder, ``~`` expanded, symbolic links kept as written."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


@dataclass
class CVConfig:
    """Every setting of a cross-validated run; ``config.json`` is this, resolved. Defaults are the paper's.

    ``skip_bad`` leaves unreadable images out (listed in ``skipped.csv``) instead of stopping;
    ``dedup_folds`` keeps exact and near-duplicate images (phash distance <= ``dup_threshold`` of
    ``hash_size**2`` bits) inside one fold. Introduced in ``notebooks/04_train_cross_validation.ipynb``.
    """

    out: str = "runs/cv"
    data: str | None = None
    manifest: str | None = None
    group_col: str | None = None
    classes: list[str] | None = None
    model: str = "us_sfnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights_path: str | None = None
    folds: int = int(PAPER_PROTOCOL["folds"])
    image_size: int = int(PAPER_PROTOCOL["image_size"])
    normalization: str = "paper"
    splits: str | None = None
    cache_dir: str | None = None
    device: str = "auto"
    epochs: int = int(PAPER_PROTOCOL["epochs"])
    batch_size: int = int(PAPER_PROTOCOL["batch_size"])
    lr: float = float(PAPER_PROTOCOL["lr"])
    betas: tuple[float, float] = tuple(PAPER_PROTOCOL["betas"])  # type: ignore[assignment]
    weight_decay: float = float(PAPER_PROTOCOL["weight_decay"])
    seed: int = 0
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_scope: str = "model"
    compile_mode: str = "default"
    deterministic: bool = False
    progress: bool = True
    eval_every: int = 1
    checkpoint_every: int = 1
    skip_bad: bool = False
    dedup_folds: bool = True
    dup_threshold: int = THRESHOLD
    hash_size: int = HASH_SIZE

    def __post_init__(self) -> None:
        for name in PATH_SETTINGS:
            if getattr(self, name):
                setattr(self, name, absolute_path(getattr(self, name)))
        if self.model in list_models():  # the model's own minimum and size multiple, named in the message
            check_image_size(self.model, self.image_size)
        elif self.image_size < 8:
            raise UserError(f"--image-size {self.image_size}: use at least 8 pixels")
        check_hash_settings(self.hash_size, self.dup_threshold, "--dup-threshold")
        self.train_config()  # validates the optimization settings early, before any data is read

    def train_config(self) -> TrainConfig:
        return TrainConfig(**{k: getattr(self, k) for k in TRAIN_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CVConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown setting(s) {unknown}; valid settings are {sorted(known)}")
        for f in dataclasses.fields(cls):  # a hand-edited value of the wrong kind fails here, not mid-run
            default = f.default
            if d.get(f.name) is None or default is None or default is dataclasses.MISSING:
                continue
            value = d[f.name]
            if not same_kind(value, default):
                raise UserError(f"setting {f.name}={value!r} should be of type {type(default).__name__} "
                                f"(like {default!r})")
        return cls(**d)


#: Settings that may differ when a run is resumed without changing its results: where it runs, what it prints
#: and how often it saves.
RESUME_FREE_SETTINGS = frozenset({"progress", "device", "cache_dir", "out", "checkpoint_every"})


def _write_atomic(path: Path, text: str) -> None:
    """Write a file so that an interruption leaves either the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _check_out(cfg: CVConfig, resume: bool) -> Path:
    """Check that ``cfg.out`` can take this run (new, or the same run on ``resume``); writes nothing."""
    out = Path(cfg.out)
    config_file = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file, not a folder; choose a new --out")
    if resume and not config_file.is_file():
        raise UserError(f"{out}: no config.json here; pass --resume a run folder written by `ussf cv`")
    if out.exists() and any(out.iterdir()):
        if not config_file.is_file():
            raise UserError(f"{out}: folder exists and is not a ussf run folder; choose a new --out")
        if not resume:
            raise UserError(f"{out}: already holds a run; pass --resume {out} to continue it, or choose a new --out")
        previous = _read_json(config_file)
        # A run made before paths were stored absolute holds them as typed, relative to where it started.
        previous.update({k: absolute_path(previous[k]) for k in PATH_SETTINGS if previous.get(k)})
        current = cfg.to_dict()
        changed = sorted(k for k in previous if k not in RESUME_FREE_SETTINGS and previous.get(k) != current.get(k))
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
    index = load_index(cfg.data, cfg.manifest, cfg.group_col, cfg.classes)
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
    index = decoded.index
    notes: list[str] = []
    if len(decoded.skipped):
        notes.append(f"skipped {len(decoded.skipped)} unreadable image(s) (--skip-bad), "
                     f"e.g. {decoded.skipped['path'].iloc[0]}: {decoded.skipped['reason'].iloc[0]}")
    data_fp = fingerprint(index)
    if expect_fingerprint and data_fp != expect_fingerprint:
        raise UserError(f"{cfg.data or cfg.manifest}: the data changed since this run started (fingerprint differs "
                        "from environment.json); restore it, or start a new run with a new --out")
    clusters = clusters_from_hashes(decoded.hashes, cfg.dup_threshold) if hash_size else None
    if clusters is not None:
        n_dup = int((np.bincount(clusters) > 1).sum())
        if n_dup:
            notes.append(f"duplicates: {n_dup} cluster(s) of exact or near-duplicate images "
                         f"(phash distance <= {cfg.dup_threshold}) are each kept inside one fold")
    if splits_file:
        table = cv_mod.read_splits(splits_file, index)
        folds = table["fold"].to_numpy(dtype=np.int64)
        if int(folds.max()) + 1 != cfg.folds:
            raise UserError(f"{splits_file}: has {int(folds.max()) + 1} folds but --folds is {cfg.folds}; make them agree")
        cv_mod.check_fold_feasible(index.frame["label"], None, cfg.folds, classes=index.classes)
        notes += cv_mod.check_split_composition(index.frame["label"], folds, cfg.folds, str(splits_file))
        # splits.csv records what the folds keep whole: the file's groups where its folds kept them whole (a
        # resumed run's patients joined with duplicate clusters), joined with this data's patients.
        file_groups = table["group"].astype(str).to_numpy(dtype=object) if "group" in table else None
        file_whole = file_groups is not None and not cv_mod.leaking_groups(file_groups, folds)
        if index.has_groups:
            split_patients = cv_mod.leaking_groups(index.frame["group"], folds)
            if split_patients:
                raise UserError(f"{splits_file}: {len(split_patients)} {cfg.group_col!r} group(s) have images in "
                                f"more than one fold (e.g. {split_patients[0]!r}), so a patient would be tested on "
                                "images it trained on; drop --splits to make grouped folds, or pass splits made "
                                "with this group column")
            groups = (cv_mod.merge_groups(index.frame["group"], file_groups) if file_whole
                      else index.frame["group"].to_numpy())
        else:
            groups = file_groups if file_whole else index.frame["group"].to_numpy()
        if clusters is not None:
            leaks = cv_mod.leaking_groups(clusters, folds)
            if leaks:
                notes.append(f"warning: {len(leaks)} duplicate cluster(s) are split across the folds of {splits_file}; "
                             "results may be optimistic (make new splits to keep duplicates together)")
    else:
        groups = cv_mod.index_groups(index, clusters)
        folds = cv_mod.folds_for_index(index, cfg.folds, cfg.seed, clusters=clusters)
        if groups is None:
            groups = index.frame["group"].to_numpy()
        # Few patients of a class can leave it out of a fold's test part; say so, as for a splits file.
        notes += cv_mod.check_split_composition(index.frame["label"], folds, cfg.folds,
                                                f"the folds made with --seed {cfg.seed}", cv_mod.MADE_FOLDS_REMEDY)
    for note in notes:
        log(note)
    return PreparedData(index=index, images=decoded.images, folds=folds, groups=np.asarray(groups), clusters=clusters,
                        skipped=decoded.skipped, fingerprint=data_fp, notes=notes)


def compute_splits(cfg: CVConfig, log: Callable[[str], None] = print) -> pd.DataFrame:
    """The ``splits.csv`` table :func:`run_cv` would make for ``cfg`` (duplicate-aware, bad files skipped or
    refused as configured), without keeping pixels: for sharing one set of folds between several runs."""
    return prepare_data(cfg, log=log, pixels=False).splits()


def run_cv(cfg: CVConfig, resume: bool = False, log: Callable[[str], None] = print,
           folds_to_run: Sequence[int] | None = None) -> Path:
    """Run (or resume) k-fold cross-validation and write the complete run folder; returns its path.

    Launched by ``torchrun --nproc_per_node N -m ussf_lib cv ...`` every process runs this with the same
    settings: all of them read the data and train data-parallel (:mod:`ussf_lib.training.distributed`), and only rank 0
    logs and writes the run folder. Introduced in ``notebooks/04_train_cross_validation.ipynb``.
    """
    from ussf_lib.predict import check_meta, check_weights_fit, read_checkpoint

    started = time.perf_counter()
    ctx = dist_mod.context_from_env()
    if not ctx.is_main:
        log = _silent
        cfg = dataclasses.replace(cfg, progress=False)
    check_image_size(cfg.model, cfg.image_size)  # also rejects an unknown model name, before any data is read
    mean, std = resolve_normalization(cfg.normalization)
    requested_device = select_device(cfg.device)  # an unknown or absent device fails before any data is read
    out = _check_out(cfg, resume)
    if resume:  # the data's own "no such folder" error would suggest another --data, which a resume refuses
        for flag, value in (("--data", cfg.data), ("--manifest", cfg.manifest)):
            if value and not Path(value).exists():
                raise UserError(f"{out}: the run's data {flag} {value} is gone; put it back at that path to resume "
                                "(a resumed run reads the data it started with), or start a new run")
    fold_ids = list(folds_to_run if folds_to_run is not None else range(cfg.folds))
    bad_folds = [k for k in fold_ids if not 0 <= int(k) < cfg.folds]
    if bad_folds:
        raise UserError(f"fold(s) {bad_folds} do not exist; folds are numbered 0..{cfg.folds - 1}")
    # On resume the folds are the run's own (splits.csv), and the data must be the data it started with.
    resume_splits = out / "splits.csv" if resume and (out / "splits.csv").is_file() else None
    previous_env = out / "environment.json"
    expect_fp = _read_json(previous_env).get("data_fingerprint") if resume and previous_env.is_file() else None
    probe: dict[str, Any] = {}

    def _build_once(index: ImageIndex) -> None:
        # Build once before any heavy work so a bad model name, size or weights file fails in a second, not after
        # decoding, and before anything is written.
        probe["model"] = build_model(cfg.model, len(index.classes), image_size=cfg.image_size,
                                     weights_path=cfg.weights_path, **cfg.model_kwargs)

    prepared = prepare_data(cfg, log=log, splits_file=resume_splits, expect_fingerprint=expect_fp,
                            check_index=_build_once)
    index = prepared.index
    meta = {"model_name": cfg.model, "classes": list(index.classes), "image_size": cfg.image_size,
            "mean": list(mean), "std": list(std), "model_kwargs": dict(cfg.model_kwargs)}
    for k in fold_ids:  # a checkpoint from another model or class list is refused before anything is written
        ckpt = out / "folds" / str(k) / "checkpoint.pt"
        if ckpt.is_file() and not (ckpt.parent / "predictions.csv").is_file():
            state = read_checkpoint(ckpt)
            check_meta(ckpt, state["meta"], {key: meta[key] for key in ("model_name", "classes", "image_size", "model_kwargs")},
                       f"delete {ckpt.parent} to train this fold again, or resume with the settings it was made with")
            check_weights_fit(ckpt, probe["model"], state["model"], state["meta"])
    device = dist_mod.device_for(ctx, requested_device)
    # Decided by every rank before rank 0 writes anything, so that all ranks run the same folds.
    todo = [k for k in fold_ids if not (out / "folds" / str(k) / "predictions.csv").is_file()]
    dist_mod.barrier(ctx)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
        env = {**environment_info(device, prepared.fingerprint), "world_size": ctx.world}
        _write_atomic(out / "environment.json", json.dumps(env, indent=2))
        cv_mod.save_splits(index, prepared.folds, out / "splits.csv", prepared.groups)
        _write_atomic(out / "classes.json", json.dumps(index.classes))
        if cfg.skip_bad:
            _write_atomic(out / "skipped.csv", prepared.skipped.to_csv(index=False))
    if ctx.enabled:
        backend = "NCCL" if device.type == "cuda" else "gloo"
        if ctx.world == 1:
            log(f"data-parallel over 1 process ({backend}): the distributed path with nothing to split")
        else:
            _, uneven = process_batch_size(cfg.batch_size, ctx.world)
            log(f"data-parallel over {ctx.world} processes ({backend}); "
                + (uneven or f"each global batch of {cfg.batch_size} is split between them"))
    dev_images = DeviceImages(prepared.images, device)
    targets = index.targets
    folds = prepared.folds
    train_cfg = cfg.train_config()
    for k in fold_ids:
        fold_dir = out / "folds" / str(k)
        if k not in todo:
            log(f"fold {k}: already finished, skipped")
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_idx, test_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        seed_everything(cfg.seed * 1000 + k, cfg.deterministic)  # same initial weights whatever ran before
        model = build_model(cfg.model, len(index.classes), image_size=cfg.image_size,
                            weights_path=cfg.weights_path, **cfg.model_kwargs)
        result = train_fold(model, dev_images, targets, train_idx, test_idx, train_cfg, mean, std, device=device,
                            fold_dir=fold_dir, fold=k, checkpoint_extra={"meta": meta, "config": cfg.to_dict()},
                            log=log, dist_ctx=ctx)
        if not ctx.is_main:
            continue
        _write_atomic(fold_dir / "history.csv", result.history.to_csv(index=False))
        pred = predictions_frame(index, test_idx, result.probs, k)
        # predictions.csv marks the fold finished, so it is written last and atomically.
        _write_atomic(fold_dir / "predictions.csv", pred.to_csv(index=False))
        log(f"fold {k}: test accuracy {float((pred['pred'] == pred['label']).mean()):.3f} ({result.seconds:.1f}s)")
    if not ctx.is_main:
        dist_mod.finish(ctx)
        return out
    summary = write_report(out, partial_ok=folds_to_run is not None)
    dist_mod.finish(ctx)
    summary_line = ", ".join(f"{m} {summary[m]['mean']:.3f}" for m in ("accuracy", "f1", "auc")
                             if summary.get(m) and summary[m]["mean"] is not None)
    log(f"done in {time.perf_counter() - started:.0f}s: {summary_line}")
    log(f"results in {out.resolve()}")
    return out


def _silent(_: str) -> None:
    pass


def predictions_frame(index: ImageIndex, test_idx: np.ndarray, probs: np.ndarray, fold: int) -> pd.DataFrame:
    """``predictions.csv`` of one fold: path (relative to the data root), label, fold, pred, prob_<class>..."""
    classes = index.classes
    frame = pd.DataFrame({
        "path": index.frame["relpath"].to_numpy()[test_idx],
        "label": index.frame["label"].to_numpy()[test_idx],
        "fold": fold,
        "pred": [classes[i] for i in probs.argmax(1)],
    })
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i]
    return frame

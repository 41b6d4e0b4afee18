"""One cross-validated experiment, from a data folder to a complete run folder.

``run_cv`` wires the one-way flow of the library together: data (index, decode once) -> cv (folds) ->
models (registry) -> train (one fold at a time) -> report (metrics, tables, figures). The CLI's ``ussf cv``,
``make run`` and ``notebooks/04_train_cross_validation.ipynb`` all call it, so they cannot drift apart.

The run folder (see README "Run folder")::

    RUN/config.json, environment.json, splits.csv,
        folds/K/{history.csv, predictions.csv, metrics.json, checkpoint.pt},
        summary.json, per_class.csv, results.csv, results.md, confusion_matrix.png, learning_curves.png, roc.png

A fold whose ``predictions.csv`` exists is finished and skipped on ``resume``; an unfinished fold continues
from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ussf_lib import cv as cv_mod
from ussf_lib.data import decode_images, fingerprint, load_index, resolve_normalization
from ussf_lib.errors import UserError
from ussf_lib.meta import PAPER_PROTOCOL
from ussf_lib.models import build_model
from ussf_lib.models.registry import check_image_size
from ussf_lib.provenance import environment_info
from ussf_lib.report import write_report
from ussf_lib.train import DeviceImages, TrainConfig, select_device, seed_everything, train_fold

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class CVConfig:
    """Every setting of a cross-validated run; ``config.json`` is this, resolved. Defaults are the paper's."""

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
    deterministic: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise UserError(f"--image-size {self.image_size}: use at least 8 pixels")
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
        return cls(**d)


# Settings that may differ when a run is resumed without changing its results.
_RESUME_FREE = {"progress", "device", "cache_dir", "out"}


def _prepare_out(cfg: CVConfig, resume: bool) -> Path:
    out = Path(cfg.out)
    config_file = out / "config.json"
    if out.exists() and any(out.iterdir()):
        if not config_file.is_file():
            raise UserError(f"{out}: folder exists and is not a ussf run folder; choose a new --out")
        if not resume:
            raise UserError(f"{out}: already holds a run; pass --resume {out} to continue it, or choose a new --out")
        previous = json.loads(config_file.read_text())
        changed = sorted(k for k in previous if k not in _RESUME_FREE and previous.get(k) != cfg.to_dict().get(k))
        if changed:
            raise UserError(f"{out}: settings {changed} differ from the run being resumed; resume with the same settings")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_config(run_dir: str | Path) -> CVConfig:
    """The resolved config of an existing run folder (for ``--resume`` and reports)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no config.json here; pass a run folder written by `ussf cv`")
    return CVConfig.from_dict(json.loads(path.read_text()))


def run_cv(cfg: CVConfig, resume: bool = False, log: Callable[[str], None] = print,
           folds_to_run: Sequence[int] | None = None) -> Path:
    """Run (or resume) k-fold cross-validation and write the complete run folder; returns its path.

    Introduced in ``notebooks/04_train_cross_validation.ipynb``.
    """
    started = time.perf_counter()
    check_image_size(cfg.model, cfg.image_size)  # also rejects an unknown model name, before any data is read
    index = load_index(cfg.data, cfg.manifest, cfg.group_col, cfg.classes)
    log(f"data: {index.describe()}")
    if cfg.splits:
        folds = cv_mod.load_splits(cfg.splits, index)
        if int(folds.max()) + 1 != cfg.folds:
            raise UserError(f"{cfg.splits}: has {int(folds.max()) + 1} folds but --folds is {cfg.folds}; make them agree")
    else:
        folds = cv_mod.folds_for_index(index, cfg.folds, cfg.seed)
    mean, std = resolve_normalization(cfg.normalization)
    # Build once before any heavy work so a bad model name or size fails in a second, not after decoding.
    build_model(cfg.model, len(index.classes), image_size=cfg.image_size, **cfg.model_kwargs)
    out = _prepare_out(cfg, resume)
    device = select_device(cfg.device)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    data_fp = fingerprint(index)
    (out / "environment.json").write_text(json.dumps(environment_info(device, data_fp), indent=2))
    cv_mod.save_splits(index, folds, out / "splits.csv")
    (out / "classes.json").write_text(json.dumps(index.classes))
    images = decode_images(index, cfg.image_size, cache_dir=cfg.cache_dir, progress=cfg.progress)
    dev_images = DeviceImages(images, device)
    targets = index.targets
    train_cfg = cfg.train_config()
    meta = {"model_name": cfg.model, "classes": list(index.classes), "image_size": cfg.image_size,
            "mean": list(mean), "std": list(std), "model_kwargs": dict(cfg.model_kwargs)}
    for k in (folds_to_run if folds_to_run is not None else range(cfg.folds)):
        fold_dir = out / "folds" / str(k)
        if (fold_dir / "predictions.csv").is_file():
            log(f"fold {k}: already finished, skipped")
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        train_idx, test_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        seed_everything(cfg.seed * 1000 + k)  # same initial weights whatever ran before this fold
        model = build_model(cfg.model, len(index.classes), image_size=cfg.image_size,
                            weights_path=cfg.weights_path, **cfg.model_kwargs)
        result = train_fold(model, dev_images, targets, train_idx, test_idx, train_cfg, mean, std, device=device,
                            fold_dir=fold_dir, fold=k, checkpoint_extra={"meta": meta}, log=log)
        result.history.to_csv(fold_dir / "history.csv", index=False)
        pred = predictions_frame(index, test_idx, result.probs, k)
        pred.to_csv(fold_dir / "predictions.csv", index=False)
        log(f"fold {k}: test accuracy {float((pred['pred'] == pred['label']).mean()):.3f} ({result.seconds:.1f}s)")
    summary = write_report(out)
    summary_line = ", ".join(f"{m} {summary[m]['mean']:.3f}" for m in ("accuracy", "f1", "auc")
                             if summary.get(m) and summary[m]["mean"] is not None)
    log(f"done in {time.perf_counter() - started:.0f}s: {summary_line}")
    log(f"results in {out.resolve()}")
    return out


def predictions_frame(index, test_idx: np.ndarray, probs: np.ndarray, fold: int) -> pd.DataFrame:
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

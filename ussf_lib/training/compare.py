"""Cross-validate several models on identical folds, then lay the results out as the paper's Tables 1 and 2.

``ussf compare`` and ``notebooks/06_compare_baselines.ipynb`` call :func:`compare`: the folds are computed
once and saved as ``OUT/splits.csv``; every model then runs :func:`~ussf_lib.training.experiment.run_cv` into its own
run folder ``OUT/<model>/`` with ``splits=OUT/splits.csv``, so all models are trained and tested on exactly
the same images. A model whose ``summary.json`` exists is finished and skipped on a rerun; a model whose folder
exists without it was interrupted and is resumed (finished folds are kept). With ``--devices 0,1,...``
(``devices=`` here) the models' runs go at once, one per device, in worker processes pinned to their device
(:mod:`ussf_lib.training.placement`; ``cpu,cpu`` runs two at once on the CPU, ``0,0`` two on GPU 0); their log
lines come back prefixed with the model name. ``--engine ray`` (``engine="ray"``) runs them as Ray tasks on a Ray
cluster instead (:mod:`ussf_lib.training.ray_engine`), with the same folders and tables.
:func:`~ussf_lib.evaluation.tables.write_comparison` then writes the tables from the run folders::

    OUT/compare.json          the models and the shared settings
    OUT/splits.csv            path,label,group,fold: the one set of folds
    OUT/<model>/              a complete `ussf cv` run folder per model
    OUT/table1, table2, paired (.csv/.md), per_class_bars.png   see ussf_lib.evaluation.tables

Introduced in ``notebooks/06_compare_baselines.ipynb``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

from ussf_lib import files
from ussf_lib.data import folds as cv_mod
from ussf_lib.evaluation.tables import same_folds, write_comparison
from ussf_lib.errors import UserError
from ussf_lib.training.experiment import PATH_SETTINGS, CVConfig, absolute_path, prepare_data, run_cv
from ussf_lib.models.registry import check_image_size
from ussf_lib.training.engines import check_engine, run_tasks
from ussf_lib.training.placement import Placed, parse_devices, worker_log
from ussf_lib.training.runtime import select_device

# Settings that may differ between the models' configs without changing what a finished run means.
_FREE_SETTINGS = {"out", "model", "progress", "device", "cache_dir", "splits"}


def parse_models(models: str | Sequence[str]) -> list[str]:
    """A model list from ``"a,b,c"`` or a sequence; empty, duplicated or unknown names are a :class:`UserError`.

    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    names = [m.strip() for m in (models.split(",") if isinstance(models, str) else models) if m and m.strip()]
    if not names:
        raise UserError("no models to compare; pass --models us_sfnet,densenet121,...")
    duplicated = sorted({m for m in names if names.count(m) > 1})
    if duplicated:
        raise UserError(f"--models lists {duplicated} more than once; name each model once")
    return names


def make_splits(cfg: CVConfig, path: str | Path, log: Callable[[str], None] = print) -> Path:
    """Make the folds of ``cfg``'s data once, exactly as ``run_cv`` would, and save them as ``splits.csv``.

    The folds come from :func:`~ussf_lib.training.experiment.prepare_data`, so they follow ``run_cv``'s fold policy
    (patient groups, and duplicate clusters kept inside one fold with ``dedup_folds``); with ``cfg.splits`` set,
    that file's folds are checked against the data and used instead.
    """
    path = Path(path)
    prepared = prepare_data(dataclasses.replace(cfg, out=str(path.parent)), log=log)
    return cv_mod.save_splits(prepared.index, prepared.folds, path, prepared.groups)


def _shared_settings(cfg: CVConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in _FREE_SETTINGS}


def compare(models: str | Sequence[str], base_cfg: CVConfig, out: str | Path,
            log: Callable[[str], None] = print, replace_changed: bool = False,
            devices: str | Sequence[str] | None = None, engine: str = "local") -> Path:
    """Cross-validate each of ``models`` with ``base_cfg``'s settings on one shared set of folds; return ``out``.

    ``base_cfg.model`` and ``base_cfg.out`` are ignored (each model gets ``out/<model>``). Rerunning with the same
    settings skips finished models and resumes an interrupted one; different settings in an existing ``out``
    are a :class:`UserError`, or, with ``replace_changed`` (notebooks, which own their folder), delete the
    old comparison first. Finishes with :func:`write_comparison`.

    ``devices`` (``"0,1"``, ``["cpu", "cpu"]``, see :func:`~ussf_lib.training.placement.parse_devices`) runs the models
    concurrently, one per entry at a time, each in a worker pinned to its device (``base_cfg.device`` must then be
    ``auto``, which in the worker is its device; progress bars are off there). The folds are still made here first.
    A model that stops with a :class:`UserError` does not stop the others: the tables are written for those that
    finished and the failures are raised as one :class:`UserError` at the end. Without ``devices`` the models run
    one after the other in this process. ``engine="ray"`` runs them as Ray tasks, each asking for the share of a
    device that ``devices`` describes (:mod:`ussf_lib.training.ray_engine`), with the same outcome.
    Introduced in ``notebooks/06_compare_baselines.ipynb``.
    """
    names = parse_models(models)
    check_engine(engine)
    placed = parse_devices(devices, check_cuda=engine == "local") if devices is not None else None
    _check_before_training(names, base_cfg, placed, engine)
    out = Path(out)
    names = _open_comparison(out, names, base_cfg, replace_changed, log)
    with contextlib.ExitStack() as lock:
        # One process per comparison folder: an existing one is locked now, a new one once its splits.csv made it.
        if out.is_dir():
            lock.enter_context(files.run_lock(out))
            names = _open_comparison(out, names, base_cfg, False, log)  # again, under the lock
            files.remove_temp_files(out, depth=0)
        _compare_locked(names, base_cfg, out, lock, log, placed, engine)
    log(f"comparison tables in {out.resolve()}: table1.md, table2.md, paired.md, per_class_bars.png")
    return out


def _compare_locked(names: list[str], base_cfg: CVConfig, out: Path, lock: contextlib.ExitStack,
                    log: Callable[[str], None], placed: list[str] | None, engine: str) -> None:
    """:func:`compare` from the folds on, with the comparison folder locked (from its creation, for a new one)."""
    splits = out / "splits.csv"
    if not splits.is_file():
        make_splits(base_cfg, splits, log=log)  # creates OUT only once the data and folds have passed every check
        lock.enter_context(files.run_lock(out))
        log(f"folds: {base_cfg.folds} folds saved to {splits} (shared by every model)")
    elif base_cfg.splits and not same_folds(Path(base_cfg.splits), splits):
        raise UserError(f"--splits {base_cfg.splits} differs from {splits} already used here; choose a new --out")
    files.write_text(out / "compare.json", json.dumps({"models": names, "settings": _shared_settings(base_cfg)},
                                                      indent=2), "run the same command again to continue")
    where = (f" (--devices {','.join(placed)})" if placed is not None else "") + (" (Ray)" if engine == "ray" else "")

    def plan(i: int, name: str) -> tuple[CVConfig, bool] | None:
        return _plan_model(i, name, names, base_cfg, out, log, where)

    if placed is None and engine == "local":
        for i, name in enumerate(names, 1):
            planned = plan(i, name)
            if planned is not None:
                run_cv(planned[0], resume=planned[1], log=log)
    else:
        _run_placed_models(names, plan, placed, out, log, engine)
    write_comparison(out, names)


def _check_before_training(names: list[str], base_cfg: CVConfig, placed: list[str] | None, engine: str) -> None:
    """Every name, size, the device and the weights are checked before hours of training start."""
    if placed is not None and base_cfg.device != "auto":
        raise UserError(f"--device {base_cfg.device} and --devices {','.join(placed)}: --devices pins each model's run "
                        "to one device, where --device auto finds it; leave --device out")
    if engine == "ray" and base_cfg.device != "auto":
        raise UserError(f"--device {base_cfg.device} and --engine ray: Ray gives each model's run its device, where "
                        "--device auto finds it; leave --device out (--devices says what share each run asks for)")
    if base_cfg.weights_path and len(names) > 1:
        raise UserError(f"--weights {base_cfg.weights_path} fits one architecture, but {len(names)} models are "
                        "compared; compare from scratch, or run `ussf cv --weights ... --splits OUT/splits.csv` per model")
    for name in names:
        check_image_size(name, base_cfg.image_size)
    if placed is None and engine == "local":
        select_device(base_cfg.device)


def _open_comparison(out: Path, names: list[str], base_cfg: CVConfig, replace_changed: bool,
                     log: Callable[[str], None]) -> list[str]:
    """Check that ``out`` can take this comparison (new, or the same settings); returns every model it holds."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; choose a folder for the comparison")
    manifest = out / "compare.json"
    if not (out.exists() and any(not files.is_ours(p.name) for p in out.iterdir())):
        return names
    if not manifest.is_file():
        raise UserError(f"{out}: folder exists and is not a `ussf compare` folder; choose a new --out")
    previous = json.loads(manifest.read_text())
    shared = _shared_settings(base_cfg)
    # A comparison made before paths were stored absolute holds them as typed.
    previous["settings"].update({k: absolute_path(v) for k, v in previous["settings"].items()
                                 if k in PATH_SETTINGS and v})
    changed = sorted(k for k in set(previous["settings"]) | set(shared)
                     if previous["settings"].get(k) != shared.get(k))
    if changed and replace_changed:
        log(f"{out}: settings changed ({', '.join(changed)}); replacing the previous comparison")
        shutil.rmtree(out)
        return names
    if changed:
        raise UserError(f"{out}: settings {changed} differ from the comparison already there; "
                        "rerun with the same settings to continue it, or choose a new --out")
    return previous["models"] + [m for m in names if m not in previous["models"]]


def _plan_model(i: int, name: str, names: list[str], base_cfg: CVConfig, out: Path, log: Callable[[str], None],
                where: str) -> tuple[CVConfig, bool] | None:
    """The config and resume flag of one model's run (None: finished), logging what happens to it."""
    run_dir, splits = out / name, out / "splits.csv"
    if (run_dir / "summary.json").is_file():
        log(f"[{i}/{len(names)}] {name}: already finished, skipped")
        return None
    cfg = dataclasses.replace(base_cfg, model=name, out=str(run_dir), splits=str(splits.resolve()))
    resume = (run_dir / "config.json").is_file()
    if resume:
        # A resumed run keeps its own splits.csv; if the comparison folder was moved since, the recorded path
        # differs while the folds are the same: keep the recorded path so that the run can be resumed.
        own = run_dir / "splits.csv"
        if own.is_file() and not same_folds(own, splits):
            raise UserError(f"{run_dir} was started on other folds than {splits}; delete {run_dir} to rerun it")
        cfg.splits = json.loads((run_dir / "config.json").read_text()).get("splits", str(splits.resolve()))
    log(f"[{i}/{len(names)}] {name}: {'resuming' if resume else 'starting'} in {run_dir}{where}")
    return cfg, resume


def _run_model(cfg: CVConfig, resume: bool) -> str:
    """One model's run in a pinned worker; its log lines go to the parent, prefixed with the model name."""
    run_cv(cfg, resume=resume, log=worker_log(f"[{cfg.model}] "))
    return cfg.model


def _run_placed_models(names: Sequence[str], plan: Callable[[int, str], tuple[CVConfig, bool] | None],
                       devices: Sequence[str] | None, out: Path, log: Callable[[str], None], engine: str) -> None:
    """Run the unfinished models concurrently on ``devices`` (with ``engine``); a UserError in one lets the others
    finish."""
    tasks = []
    for i, name in enumerate(names, 1):  # every run is checked before any starts
        planned = plan(i, name)
        if planned is not None:
            # Bars of several processes would overwrite each other on one terminal (and "progress" is not part of
            # what a finished run means, see _FREE_SETTINGS), so the workers log lines only.
            cfg = dataclasses.replace(planned[0], progress=False)
            tasks.append((name, _run_model, (cfg, planned[1])))

    def done(result: Placed) -> None:
        log(f"[{result.key}] {'finished' if result.ok else 'FAILED: ' + str(result.error)} on device {result.device}")

    if not tasks:
        return
    failed = [r for r in run_tasks(tasks, devices, engine, log=log, on_done=done) if not r.ok]
    if failed:
        finished = [m for m in names if (out / m / "summary.json").is_file()]
        if finished:
            write_comparison(out, names, log=log)
        raise UserError("; ".join(f"{r.key}: {r.error}" for r in failed)
                        + (f" (tables written for {', '.join(finished)})" if finished else "")
                        + "; fix it and rerun the same command to continue (finished models are kept)")

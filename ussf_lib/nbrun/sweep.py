"""Run one notebook over a grid of parameters with papermill, skip finished runs, collect every run's metrics.

``ussf sweep --notebook notebooks/04_train_cross_validation.ipynb --grid GRID.yaml --out DIR [--jobs N]`` calls
:func:`run_sweep`. The grid file maps notebook parameters to lists of values (the axes, swept as a cartesian
product in file order) and may hold a ``fixed`` mapping applied to every run::

    MODEL: [us_sfnet_tiny, us_sfnet]
    SEED: [0, 1]
    fixed:
      EPOCHS: 1
      IMAGE_SIZE: 32

A top-level name with a single value (not a list) is fixed too. Each run executes into
``DIR/<NAME=value,...>/`` (the axes only): the executed notebook, its outputs (the notebook's ``OUT_DIR`` is that
folder) and ``sweep.json`` (parameters, seconds). A run whose ``metrics.json`` exists is finished and skipped
when the sweep is called again (with other fixed values it is an error: use a new ``--out``); an unfinished run
starts again, and notebook 04 resumes its cross-validation fold by fold. ``--jobs N`` executes N runs at once in
separate processes, each kernel limited to ``cpu_count // N`` threads. ``--devices 0,1`` instead places the runs
on GPUs, one run per entry at a time (:mod:`ussf_lib.training.placement`): each worker is pinned to its GPU for its whole life
and the notebook kernel it starts inherits ``CUDA_VISIBLE_DEVICES``, so the notebook's device ``auto`` is that GPU;
``--devices cpu,cpu`` runs two at once on the CPU, ``--devices 0,0`` two at once on GPU 0. ``sweep.json`` records
the entry a run was placed on (``device``, null without ``--devices``). ``--engine ray`` hands the runs to a Ray
cluster instead (:mod:`ussf_lib.training.ray_engine`, docs/cluster.md), each asking for the share of a device
that ``--devices`` describes (``--jobs N`` there is ``--devices`` with N ``cpu`` entries); run folders, results and
skipping are the same.

Results: ``DIR/results.csv``, one row per finished run (its parameters, then ``<metric>_mean`` and
``<metric>_std`` for accuracy, precision, sensitivity, specificity, f1 and auc as the notebook's ``metrics.json``
reports them, fractions in [0, 1]), and ``DIR/summary.md`` (+ ``summary.csv``): the mean and std over seeds of
each metric's mean, per setting of the other axes. Introduced in ``notebooks/04_train_cross_validation.ipynb``
(whose ``metrics.json`` it reads); docs/multi-gpu-and-sweeps.md shows an example on BUSI.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ussf_lib.errors import UserError
from ussf_lib.files import write_csv, write_text
from ussf_lib.paper import METRIC_NAMES
from ussf_lib.evaluation.metrics import format_mean_std
from ussf_lib.nbrun.runner import (NotebookError, absolute_path_parameters, check_out_outside_data, check_parameters,
                                      check_values, declared_parameters, execute_notebook, notebook_paths,
                                      DEFAULT_TIMEOUT)
from ussf_lib.training.engines import check_engine, run_tasks
from ussf_lib.training.placement import Placed, parse_devices, placed_device

#: The axis averaged over in ``summary.md``.
SEED_AXIS = "SEED"
#: Parameters the sweep sets itself.
RESERVED = ("OUT_DIR",)


@dataclass
class Grid:
    """Axes (name -> values, swept as a cartesian product in order) and fixed values for every run."""

    axes: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)

    def runs(self) -> list[dict[str, Any]]:
        """The axes' values of every run, in product order (the last axis varies fastest)."""
        names = list(self.axes)
        return [dict(zip(names, values)) for values in itertools.product(*self.axes.values())]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: run names executed, skipped and failed (name -> message), and the tables."""

    out: Path
    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    results: pd.DataFrame
    summary: pd.DataFrame


def load_grid(grid: str | os.PathLike | Mapping[str, Any]) -> Grid:
    """A :class:`Grid` from a YAML file or an already loaded mapping (see the module docstring for the format)."""
    if isinstance(grid, Mapping):
        raw, where = dict(grid), "grid"
    else:
        import yaml

        path = Path(grid)
        if not path.is_file():
            raise UserError(f"{path}: no such grid file; write a YAML mapping such as 'MODEL: [us_sfnet_tiny]'")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file; a grid is YAML text such as 'SEED: [0, 1]'") from None
        where = str(path)
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: a grid is a mapping of parameter names to lists of values, e.g. 'SEED: [0, 1]'")
    fixed = raw.pop("fixed", None) or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{where}: 'fixed' must map parameter names to single values, e.g. 'fixed: {{EPOCHS: 1}}'")
    axes: dict[str, list[Any]] = {}
    for name, values in raw.items():
        if isinstance(values, (list, tuple)):
            if not values:
                raise UserError(f"{where}: {name} has an empty list of values; give at least one")
            axes[str(name)] = list(values)
        else:
            fixed[name] = values
    both = sorted(set(axes) & set(fixed))
    if both:
        raise UserError(f"{where}: {both[0]} is both an axis and fixed; keep one")
    return Grid(axes=axes, fixed={str(k): v for k, v in fixed.items()})


def _slug(value: Any) -> str:
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def run_name(values: Mapping[str, Any]) -> str:
    """Folder name of one run: ``NAME=value,...`` over its axes (``run`` when there are none)."""
    return ",".join(f"{k}={_slug(v)}" for k, v in values.items()) or "run"


def _check_grid(notebook: Path, grid: Grid) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    declared = declared_parameters(notebook)
    for name in [*grid.axes, *grid.fixed]:
        if name in RESERVED:
            raise UserError(f"{name} is set by the sweep (each run writes into its own folder); "
                            "remove it from the grid")
        if name not in declared:
            raise UserError(f"grid parameter {name!r} is not a parameter of {notebook.name}; "
                            f"its parameters are {', '.join(p for p in declared if p not in RESERVED)}")
    runs, seen = [], {}
    for values in grid.runs():
        params = absolute_path_parameters(check_parameters(notebook, {**values, **grid.fixed}, declared))
        check_values({**declared, **params}, f"run {run_name(values)}")
        name = run_name(values)
        if name in seen:
            raise UserError(f"runs {seen[name]} and {values} share the folder name {name!r}; use distinct values")
        seen[name] = values
        runs.append((name, params))
    return declared, runs


def _run_one(notebook: str, run_dir: str, params: dict[str, Any], threads: int | None,
             timeout: float | None = DEFAULT_TIMEOUT) -> tuple[str, float]:
    """Execute one run (in a worker process when ``threads`` is set); returns (status, seconds)."""
    if threads is not None:  # inherited by the kernel this process starts
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)
    started = time.perf_counter()
    run_path = Path(run_dir)
    run_path.mkdir(parents=True, exist_ok=True)
    status = "ok"
    try:
        execute_notebook(notebook, run_path / Path(notebook).name, {**params, "OUT_DIR": str(run_path)},
                         timeout=timeout)
        if not (run_path / "metrics.json").is_file():
            status = f"{Path(notebook).name} finished without writing {run_path / 'metrics.json'}"
    except NotebookError as exc:
        status = str(exc)
    seconds = time.perf_counter() - started
    write_text(run_path / "sweep.json", json.dumps({"notebook": str(notebook), "parameters": params,
                                                     "seconds": round(seconds, 2), "status": status,
                                                     "device": placed_device()}, indent=2))
    return status, seconds


def run_sweep(notebook: str | os.PathLike, grid: str | os.PathLike | Mapping[str, Any] | Grid,
              out: str | os.PathLike, jobs: int | None = None, log: Callable[[str], None] = print,
              devices: str | Sequence[str] | None = None, engine: str = "local",
              timeout: float | None = DEFAULT_TIMEOUT) -> SweepResult:
    """Execute ``notebook`` once per grid point into ``out/<run name>/`` and write ``results.csv`` and ``summary.md``.

    Finished runs (``metrics.json`` present) are skipped; ``jobs`` > 1 runs that many at once in processes
    (default 1). ``devices`` (``"0,1"``, ``["cpu", "cpu"]``, see :func:`~ussf_lib.training.placement.parse_devices`) runs
    one at a time per entry in worker processes pinned to it; ``jobs``, if given too, must equal their number.
    ``engine="ray"`` runs them as Ray tasks instead (see the module docstring). ``timeout`` limits each cell's
    seconds (a run whose cell hangs fails with one line naming it). A failing run does not stop the
    others: it is reported in ``SweepResult.failed`` and left out of the tables.
    Grid names that are not parameters of the notebook are a :class:`UserError` naming them.
    """
    notebook = notebook_paths([notebook])[0].absolute()  # Ray workers on a cluster start in another folder
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: run at least one job at a time")
    check_engine(engine)
    ray = engine == "ray"
    placed = parse_devices(devices, check_cuda=not ray) if devices is not None else None
    if placed is not None and jobs is not None and jobs != len(placed):
        raise UserError(f"--jobs {jobs} and --devices {','.join(placed)} ({len(placed)} entries) disagree; "
                        "--devices alone sets how many runs go at once, so leave --jobs out")
    if ray and placed is None and jobs is not None:
        placed = ["cpu"] * jobs
    jobs = len(placed) if placed is not None else (jobs or 1)
    _, runs = _check_grid(notebook, grid)
    out = Path(out).resolve()
    check_out_outside_data(out, [params for _, params in runs])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; choose a folder for the sweep")
    out.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], []
    for name, params in runs:
        run_dir = out / name
        if (run_dir / "metrics.json").is_file():
            _check_same_parameters(run_dir, params)
            skipped.append(name)
        else:
            todo.append((name, params))
    log(f"sweep of {notebook.name}: {len(runs)} run(s), {len(skipped)} already finished, {len(todo)} to run"
        + (f", {jobs} at a time" if jobs > 1 and len(todo) > 1 and not ray else "")
        + (f" on --devices {','.join(placed)}" if placed is not None and todo else "")
        + (" as Ray tasks" if ray and todo else ""))
    ran, failed = [], {}

    def report(name: str, status: str, seconds: float, where: str = "") -> None:
        if status == "ok":
            ran.append(name)
            log(f"  {name}: done in {seconds:.1f}s{where}")
        else:
            failed[name] = status
            log(f"  {name}: FAILED after {seconds:.1f}s{where}: {status}")

    _execute(todo, str(notebook), out, placed, engine, jobs, timeout, log, report)
    results = collect_results(out, runs)
    write_csv(results, out / "results.csv")
    summary = summarize_results(results, list(grid.axes))
    write_csv(summary, out / "summary.csv")
    write_text(out / "summary.md", summary_markdown(summary, notebook.name, grid, len(results), len(runs)))
    log(f"results: {out / 'results.csv'} ({len(results)} runs), summary: {out / 'summary.md'}")
    return SweepResult(out=out, ran=ran, skipped=skipped, failed=failed, results=results, summary=summary)


def _execute(todo: list[tuple[str, dict[str, Any]]], notebook: str, out: Path, placed: list[str] | None, engine: str,
             jobs: int, timeout: float | None, log: Callable[[str], None],
             report: Callable[..., None]) -> None:
    """Run the grid points ``todo``: pinned workers or Ray tasks, a process pool, or one after the other here."""

    def report_placed(done: Placed) -> None:
        status, seconds = done.value if done.ok else (done.error, 0.0)
        report(done.key, status, seconds, f" on device {done.device}")

    if placed is not None or engine == "ray":
        # Even a single run goes to a pinned worker: `--devices 1` means "on GPU 1", not "here".
        tasks = [(name, _run_one, (notebook, str(out / name), params, None, timeout)) for name, params in todo]
        if tasks:
            run_tasks(tasks, placed, engine, log=log, on_done=report_placed)
    elif jobs == 1 or len(todo) <= 1:
        for name, params in todo:
            report(name, *_run_one(notebook, str(out / name), params, None, timeout))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, notebook, str(out / name), params, threads, timeout): name
                       for name, params in todo}
            for future in as_completed(futures):
                report(futures[future], *future.result())


def _check_same_parameters(run_dir: Path, params: Mapping[str, Any]) -> None:
    record = run_dir / "sweep.json"
    if not record.is_file():
        return
    previous = json.loads(record.read_text()).get("parameters", {})
    changed = sorted(k for k in set(previous) | set(params) if previous.get(k) != params.get(k))
    if changed:
        k = changed[0]
        raise UserError(f"{run_dir} finished with {k}={previous.get(k)!r} but the grid now gives "
                        f"{k}={params.get(k)!r}; sweep into a new --out (or delete that run's folder)")


def _metric_columns(metrics: Mapping[str, Any]) -> dict[str, float]:
    row = {}
    for name in METRIC_NAMES:
        value = metrics.get(name)
        if isinstance(value, Mapping):
            mean, std = value.get("mean"), value.get("std")
        else:
            mean, std = value, None
        row[f"{name}_mean"] = np.nan if mean is None else float(mean)
        row[f"{name}_std"] = np.nan if std is None else float(std)
    return row


def collect_results(out: str | os.PathLike, runs: list[tuple[str, dict[str, Any]]]) -> pd.DataFrame:
    """One row per finished run of ``runs`` (name, parameters): ``run``, the parameters, the metric columns,
    ``seconds`` (of the execution that finished it)."""
    out = Path(out)
    rows = []
    for name, params in runs:
        metrics_file = out / name / "metrics.json"
        if not metrics_file.is_file():
            continue
        record = out / name / "sweep.json"
        seconds = json.loads(record.read_text()).get("seconds") if record.is_file() else None
        columns = _metric_columns(json.loads(metrics_file.read_text()))
        if all(np.isnan(v) for v in columns.values()):
            warnings.warn(f"{metrics_file}: holds none of {', '.join(METRIC_NAMES)} (as a number or a mean/std "
                          "pair), so its row in results.csv has no metrics; sweep a notebook that writes them "
                          "(04, 05, 06)")
        rows.append({"run": name, **params, **columns, "seconds": seconds})
    return pd.DataFrame(rows)


def summarize_results(results: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Mean and std (ddof=1) over seeds of each ``<metric>_mean``, per setting of the axes other than ``SEED``."""
    keys = [a for a in axes if a != SEED_AXIS]
    metric_cols = [f"{m}_mean" for m in METRIC_NAMES]
    if results.empty:
        return pd.DataFrame(columns=[*keys, "runs", *[f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std")]])
    groups = results.groupby(keys, sort=False, dropna=False) if keys else [((), results)]
    rows = []
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key))
        row["runs"] = len(part)
        if SEED_AXIS in part.columns:
            row["seeds"] = ",".join(str(s) for s in part[SEED_AXIS])
        for m, col in zip(METRIC_NAMES, metric_cols):
            values = part[col].dropna().to_numpy(dtype=float)
            row[f"{m}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def summary_markdown(summary: pd.DataFrame, notebook: str, grid: Grid, finished: int, total: int) -> str:
    """``summary.md``: what was swept and one row per setting, metrics as ``mean ± std`` over seeds in percent."""
    keys = [a for a in grid.axes if a != SEED_AXIS]
    table = summary[[c for c in [*keys, "runs", "seeds"] if c in summary.columns]].copy()
    for m in METRIC_NAMES:
        table[m] = [format_mean_std(mean, std) for mean, std in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    fixed = ", ".join(f"{k}={v!r}" for k, v in grid.fixed.items()) or "none"
    axes = ", ".join(f"{k} in {v}" for k, v in grid.axes.items()) or "none"
    return (f"# Sweep of {notebook}\n\n"
            f"- axes: {axes}\n- fixed: {fixed}\n- finished runs: {finished} of {total}\n\n"
            f"Metrics in percent: the mean over seeds of each run's mean over folds, ± their std over seeds "
            f"(a single seed shows no ±).\n\n"
            + (table.to_markdown(index=False) if len(table) else "(no finished run)") + "\n")

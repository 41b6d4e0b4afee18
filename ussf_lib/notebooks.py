"""Run the numbered notebooks headless with papermill, and the few helpers every notebook shares.

``run_notebooks(out)`` executes ``notebooks/NN_*.ipynb`` in order, each into ``OUT/NN_name.ipynb`` (the executed
copy, outputs included) with its figures, tables and ``metrics.json`` under ``OUT/NN_name/`` (the notebook's
``OUT_DIR`` parameter). ``ussf notebooks --out DIR [--param KEY=VALUE ...]`` is the same from the shell, and
:mod:`ussf_lib.sweep` runs one notebook over a grid of parameters.

Notebook conventions (``tests/test_notebooks.py`` checks them): a markdown title first, one imports cell that
prints :func:`ussf_lib.provenance.environment_line`, exactly one cell tagged ``parameters`` holding only
literals with tiny CPU defaults (the built-in phantom when ``DATA`` and ``MANIFEST`` are empty), and no
outputs in the committed file. Inside a notebook, relative paths in parameters (``DATA``, ``MANIFEST``,
``OUT_DIR``, ``RUN_DIR``) are relative to the repository root (:func:`repo_root`), whatever folder the kernel
starts in (JupyterLab and nbval start it in ``notebooks/``, papermill wherever it is told); ``ussf notebooks``
and ``ussf sweep`` take them from the folder they run in and pass them on absolute
(:func:`absolute_path_parameters`).

The kernel is ``python3`` as Jupyter resolves it: from the project's ``.venv`` that is the venv's own
ipykernel (``.venv/share/jupyter/kernels/python3``, whose ``python`` jupyter_client replaces by the running
interpreter). Used by every notebook (``notebooks/01_explore_data.ipynb`` introduces it).
"""

from __future__ import annotations

import ast
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ussf_lib.errors import UserError

#: The executed notebooks' kernel (see the module docstring for how it resolves to this interpreter).
KERNEL_NAME = "python3"
#: Which files in ``notebooks/`` are the numbered notebooks.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
#: Sub-folder of a notebook's ``OUT_DIR`` holding the cross-validation run folder it trains (04, and 05 when
#: it has no ``RUN_DIR``); :func:`run_notebooks` hands 04's to 05 as ``RUN_DIR``.
RUN_SUBDIR = "run"
#: Classes and group column of the built-in phantom.
PHANTOM_GROUP_COL = "patient"


class NotebookError(RuntimeError):
    """A notebook raised while executing; the message names the cell, the error and the executed copy."""


# --------------------------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The ussf checkout: the folder above ``ussf_lib`` when it holds ``notebooks/``, else the current folder."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "notebooks").is_dir() else Path.cwd()


def notebooks_dir() -> Path:
    """The folder of the numbered notebooks, ``<repo>/notebooks``."""
    return repo_root() / "notebooks"


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """``None`` for an empty value; a relative path is taken from the repository root (:func:`repo_root`)."""
    if path is None or str(path).strip() == "":
        return None
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else repo_root() / p


#: Parameters that name an existing path, and what it must be.
PATH_PARAMETERS: dict[str, str] = {"DATA": "folder", "MANIFEST": "file", "RUN_DIR": "folder"}


def absolute_path_parameters(parameters: Mapping[str, Any], base: str | os.PathLike | None = None) -> dict[str, Any]:
    """``parameters`` with ``DATA``, ``MANIFEST`` and ``RUN_DIR`` made absolute and checked to exist.

    ``ussf notebooks --param`` and ``ussf sweep`` grids give paths relative to the folder the command runs in
    (``base``, default the current folder), like every other path on the command line; the notebook then gets
    them absolute. A missing path is a :class:`UserError` before any kernel starts.
    """
    base_dir = Path(base) if base is not None else Path.cwd()
    out = dict(parameters)
    for key, kind in PATH_PARAMETERS.items():
        value = out.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not (path.is_dir() if kind == "folder" else path.is_file()):
            what = f"is a {'file' if kind == 'folder' else 'folder'}, not a {kind}" if path.exists() else f"no such {kind}"
            raise UserError(f"{key}={value}: {what} ({path}); relative paths start at the folder the "
                            f"command runs in ({base_dir.resolve()})")
        out[key] = os.path.abspath(path)
    return out


def check_values(values: Mapping[str, Any], where: str) -> None:
    """Refuse, before a kernel starts, the values a notebook's first cells would refuse (``where`` names it).

    ``values`` are a notebook's parameters with its defaults filled in: ``MODEL`` / ``MODELS`` must be registry
    names that take ``IMAGE_SIZE``, ``FOLDS`` at least 2, ``EPOCHS``, ``BATCH_SIZE`` and ``N_PER_CLASS`` at
    least 1, and ``SEED`` a valid seed.
    """
    from ussf_lib.models.registry import check_image_size
    from ussf_lib.train import check_seed

    size = values.get("IMAGE_SIZE", 224)
    models = [values["MODEL"]] if "MODEL" in values else []
    models += [m.strip() for m in str(values.get("MODELS", "")).split(",") if m.strip()]
    try:
        for name in models:
            check_image_size(name, size)
        if "SEED" in values:
            check_seed(values["SEED"])
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    for key, least in (("FOLDS", 2), ("EPOCHS", 1), ("BATCH_SIZE", 1), ("N_PER_CLASS", 1)):
        if key in values and values[key] < least:
            raise UserError(f"{where}: {key}={values[key]} must be at least {least}")


def resolve_out_dir(out_dir: str | os.PathLike) -> Path:
    """A notebook's ``OUT_DIR``, resolved like :func:`resolve_path` and created."""
    out = resolve_path(out_dir)
    if out is None:
        raise UserError("OUT_DIR is empty; give the folder the notebook writes its figures and tables into")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------- data


@dataclass
class NotebookData:
    """The dataset a notebook works on: its index, the matching :class:`~ussf_lib.experiment.CVConfig` keywords
    (``data`` / ``manifest`` / ``group_col`` / ``classes``) and a one-line description."""

    index: Any
    cv_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def prepare_data(data: str = "", manifest: str = "", group_col: str = "", out_dir: str | os.PathLike = ".",
                 n_per_class: int = 16, image_size: int = 32, seed: int = 0) -> NotebookData:
    """Index the notebook's data: a class-folder tree (``data``), a CSV manifest (``manifest`` + ``group_col``) or,
    when both are empty, the built-in phantom generated into ``OUT_DIR/phantom`` (reused while its settings
    ``n_per_class``, ``image_size`` and ``seed`` stay the same).
    """
    from ussf_lib.data import load_index
    from ussf_lib.meta import PAPER_CLASSES

    data_path, manifest_path = resolve_path(data), resolve_path(manifest)
    if data_path is not None or manifest_path is not None:
        if data_path is not None and manifest_path is not None:
            raise UserError("DATA and MANIFEST are both set; give one (a class-folder tree or a CSV manifest)")
        kwargs = {"data": str(data_path) if data_path else None,
                  "manifest": str(manifest_path) if manifest_path else None, "group_col": group_col or None}
        index = load_index(**kwargs)
        return NotebookData(index, kwargs, f"{data_path or manifest_path}: {index.describe()}")
    manifest_file = phantom_manifest(Path(out_dir) / "phantom", n_per_class, image_size, seed)
    kwargs = {"manifest": str(manifest_file), "group_col": PHANTOM_GROUP_COL, "classes": list(PAPER_CLASSES)}
    index = load_index(**kwargs)
    return NotebookData(index, kwargs, f"built-in phantom ({n_per_class} per class, {image_size} px, seed {seed}): "
                                       f"{index.describe()}")


def phantom_manifest(folder: str | os.PathLike, n_per_class: int, image_size: int, seed: int) -> Path:
    """The manifest of a phantom in ``folder`` with these settings, generated unless it is already there."""
    from ussf_lib.phantom import generate_phantom

    folder = Path(folder)
    settings = {"n_per_class": int(n_per_class), "image_size": int(image_size), "seed": int(seed)}
    stamp = folder.with_name(folder.name + ".json")
    manifest = folder / "manifest.csv"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return manifest
    manifest = generate_phantom(folder, **settings)
    stamp.write_text(json.dumps(settings))
    return manifest


def example_image(data: str = "", manifest: str = "", image_size: int = 32, seed: int = 0,
                  label: str = "metastatic") -> tuple[np.ndarray, str]:
    """One RGB uint8 image ``(image_size, image_size, 3)`` and its description: a phantom node of class ``label``
    when ``data`` and ``manifest`` are empty, else the first image of class ``label`` (or of the first class)."""
    from ussf_lib.data import load_index, read_image

    data_path, manifest_path = resolve_path(data), resolve_path(manifest)
    if data_path is None and manifest_path is None:
        from ussf_lib.phantom import render_node

        gray = render_node(label, np.random.default_rng(seed), image_size)
        return np.repeat(gray[..., None], 3, axis=-1), f"phantom {label} node (seed {seed})"
    index = load_index(data=str(data_path) if data_path else None,
                       manifest=str(manifest_path) if manifest_path else None)
    rows = index.frame[index.frame["label"] == label]
    row = (rows if len(rows) else index.frame).iloc[0]
    return read_image(row["path"], image_size), f"{row['relpath']} ({row['label']})"


def resume_or_replace(cfg: Any, log: Callable[[str], None] = print) -> bool:
    """Prepare ``cfg.out`` for ``run_cv`` in a notebook; True means "resume it".

    A notebook re-runs with new parameters all the time, and its run folder (``OUT_DIR/run``) belongs to it: a
    run there with the same settings is resumed (finished folds are skipped), one with other settings is
    deleted and trained again. A folder that is not a ussf run (no ``config.json``) is left to ``run_cv``'s error.
    """
    import shutil

    from ussf_lib.experiment import _RESUME_FREE

    run_dir = Path(cfg.out)
    config = run_dir / "config.json"
    if not config.is_file():
        return False
    previous, current = json.loads(config.read_text()), cfg.to_dict()
    changed = sorted(k for k in set(previous) | set(current)
                     if k not in _RESUME_FREE and previous.get(k) != current.get(k))
    if not changed:
        return True
    log(f"{run_dir}: settings changed ({', '.join(changed)}); replacing the previous run")
    shutil.rmtree(run_dir)
    return False


# --------------------------------------------------------------------------------------------- parameters


def notebook_paths(notebooks: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """The numbered notebooks in order, or those named: a path, a file name, a stem or its number (``"04"``)."""
    folder = notebooks_dir()
    available = sorted(folder.glob(NOTEBOOK_GLOB))
    if notebooks is None:
        if not available:
            raise UserError(f"{folder}: no numbered notebooks (NN_name.ipynb) found")
        return available
    chosen = []
    for item in notebooks:
        text = str(item)
        path = Path(text)
        if path.suffix == ".ipynb" and (path.is_file() or resolve_path(text).is_file()):
            chosen.append(path if path.is_file() else resolve_path(text))
            continue
        matches = [p for p in available if text in (p.name, p.stem, p.stem[:2])]
        if len(matches) != 1:
            raise UserError(f"notebook {text!r} not found; choose from {', '.join(p.stem for p in available)}")
        chosen.append(matches[0])
    return chosen


def declared_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """Name -> default value of the notebook's ``parameters`` cell, as papermill's ``inspect_notebook`` reads it."""
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise UserError(f"{notebook}: no such notebook")
    declared = {}
    for name, info in papermill.inspect_notebook(str(notebook)).items():
        try:
            declared[name] = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            declared[name] = info["default"]
    return declared


def parse_value(text: str) -> Any:
    """A ``KEY=VALUE`` value from the shell: a Python literal (``64``, ``1e-3``, ``True``, ``"a b"``), ``true`` /
    ``false`` / ``none``, else the text itself (``us_sfnet``, ``../shared/datasets/busi``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    return text


def parse_assignments(items: Sequence[str] | None) -> dict[str, Any]:
    """``["EPOCHS=2", "04:FOLDS=5"]`` -> ``{"EPOCHS": 2, "04:FOLDS": 5}`` (see :func:`parse_value`).

    A ``NN:`` prefix (a notebook's number, stem or file name) scopes the value to that notebook
    (:func:`run_notebooks` resolves it); without one every notebook that declares the name takes it.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--param {item!r}: write KEY=VALUE or NN:KEY=VALUE, e.g. --param EPOCHS=2")
        out[key.strip()] = parse_value(value.strip())
    return out


def split_scoped(parameters: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Separate ``{"EPOCHS": 1, "04:FOLDS": 5}`` into shared values and per-notebook ones (``{"04": {...}}``)."""
    shared: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for key, value in parameters.items():
        notebook, sep, name = key.rpartition(":")
        if sep:
            scoped.setdefault(notebook, {})[name] = value
        else:
            shared[key] = value
    return shared, scoped


def check_parameters(notebook: str | os.PathLike, parameters: Mapping[str, Any],
                     declared: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``parameters`` checked against the notebook's declared ones and converted to their defaults' types.

    An unknown name is a :class:`UserError` naming it and listing the notebook's parameters; an int for a float
    parameter becomes a float, a number for a text parameter its text; any other type mismatch is an error.
    """
    declared = declared_parameters(notebook) if declared is None else declared
    name = Path(notebook).name
    unknown = [k for k in parameters if k not in declared]
    if unknown:
        raise UserError(f"{name} has no parameter {unknown[0]!r}; its parameters are {', '.join(declared)}")
    out = {}
    for key, value in parameters.items():
        default = declared[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            ok = isinstance(value, str) or value is None
            value = "" if value is None else value
        else:
            ok = True
        if not ok:
            raise UserError(f"{name}: {key} takes values of type {type(default).__name__} (default {default!r}), "
                            f"got {value!r}")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- execution


def execute_notebook(notebook: str | os.PathLike, output: str | os.PathLike, parameters: Mapping[str, Any],
                     progress: bool = False, cwd: str | os.PathLike | None = None) -> Path:
    """Execute ``notebook`` with papermill into ``output`` (kernel ``python3``, started in ``cwd`` or the
    notebook's folder). A failing cell raises :class:`NotebookError`; the executed copy keeps its traceback."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook, output = Path(notebook), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The kernel's own log (not the notebook's output) warns on every start that its local TCP sockets are
        # unencrypted; only its errors reach the terminal.
        papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters), kernel_name=KERNEL_NAME,
                                   progress_bar=progress, log_output=False, cwd=str(cwd or notebook.parent),
                                   extra_arguments=["--IPKernelApp.log_level=ERROR"])
    except PapermillExecutionError as exc:
        raise NotebookError(f"{notebook.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                            f"(traceback in the executed copy {output})") from None
    return output


def run_notebooks(out: str | os.PathLike, *, parameters: Mapping[str, Any] | None = None,
                  notebooks: Iterable[str | os.PathLike] | None = None, progress: bool = False,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Execute the numbered notebooks (all, or ``notebooks``) in order; return the executed copies' paths.

    Each notebook ``NN_name`` runs with ``OUT_DIR=OUT/NN_name`` plus those of ``parameters`` it declares (a name
    no notebook declares is a :class:`UserError`) and those scoped to it as ``"NN:NAME"`` (an undeclared scoped
    name is an error too), into ``OUT/NN_name.ipynb``. When a notebook with ``RUN_DIR``
    (05) follows one that trained a cross-validation run (04, ``OUT_DIR/run``) and ``RUN_DIR`` is not given, it
    evaluates that run instead of training its own. A failing notebook does not stop the others; a
    :class:`NotebookError` listing the failures is raised at the end. ``OUT/notebooks.json`` records each
    notebook's parameters, seconds and status.
    """
    out = Path(out)
    paths = notebook_paths(notebooks)
    parameters, scoped_by_name = split_scoped(parameters or {})
    if "OUT_DIR" in parameters or any("OUT_DIR" in v for v in scoped_by_name.values()):
        raise UserError("OUT_DIR is set per notebook (OUT/NN_name); choose OUT with --out instead")
    scoped: dict[Path, dict[str, Any]] = {}
    for name, values in scoped_by_name.items():
        target = notebook_paths([name])[0]
        if target not in paths:
            raise UserError(f"parameters for {target.stem} were given, but it is not among the notebooks run "
                            f"({', '.join(p.stem[:2] for p in paths)})")
        scoped.setdefault(target, {}).update(values)
    declared = {p: declared_parameters(p) for p in paths}
    known = sorted(set().union(*(d.keys() for d in declared.values())))
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise UserError(f"no notebook has the parameter {unknown[0]!r}; the notebooks' parameters are "
                        f"{', '.join(k for k in known if k != 'OUT_DIR')}")
    chosen = {path: {**{k: v for k, v in parameters.items() if k in declared[path]}, **scoped.get(path, {})}
              for path in paths}
    checked = {path: absolute_path_parameters(check_parameters(path, chosen[path], declared[path]))
               for path in paths}  # all checked before anything is written
    for path in paths:
        check_values({**declared[path], **checked[path]}, path.stem)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; choose a folder for the executed notebooks")
    out.mkdir(parents=True, exist_ok=True)
    executed, failures, record = [], [], []
    cv_run: Path | None = None
    for path in paths:
        params = dict(checked[path])
        out_dir = (out / path.stem).resolve()
        params["OUT_DIR"] = str(out_dir)
        if "RUN_DIR" in declared[path] and "RUN_DIR" not in chosen[path] and cv_run is not None:
            params["RUN_DIR"] = str(cv_run)
        started = time.perf_counter()
        status = "ok"
        try:
            executed.append(execute_notebook(path, out / path.name, params, progress=progress))
        except NotebookError as exc:
            status = f"failed: {exc}"
            failures.append(str(exc))
        seconds = time.perf_counter() - started
        log(f"{path.stem}: {status if status != 'ok' else 'done'} in {seconds:.1f}s -> {out_dir}")
        record.append({"notebook": path.name, "parameters": params, "seconds": round(seconds, 2), "status": status})
        if status == "ok" and (out_dir / RUN_SUBDIR / "summary.json").is_file():
            cv_run = out_dir / RUN_SUBDIR
    (out / "notebooks.json").write_text(json.dumps(record, indent=2))
    if failures:
        raise NotebookError(f"{len(failures)} of {len(paths)} notebook(s) failed: " + " | ".join(failures))
    return executed

"""Run the numbered notebooks headless with papermill: choose them, check their parameters, execute them.

``run_notebooks(out)`` executes ``notebooks/NN_*.ipynb`` in order, each into ``OUT/NN_name.ipynb`` (the executed
copy, outputs included) with its figures, tables and ``metrics.json`` under ``OUT/NN_name/`` (the notebook's
``OUT_DIR`` parameter). ``ussf notebooks --out DIR [--param KEY=VALUE ...]`` is the same from the shell, and
:mod:`ussf_lib.nbrun.sweep` runs one notebook over a grid of parameters. Parameters are checked against those a
notebook declares, and the values it would refuse in its first cells are refused here, before a kernel starts.
Relative ``DATA``, ``MANIFEST`` and ``RUN_DIR`` values are taken from the folder the command runs in and passed
on absolute (:func:`absolute_path_parameters`).

The kernel is ``python3`` as Jupyter resolves it: from the project's ``.venv`` that is the venv's own
ipykernel (``.venv/share/jupyter/kernels/python3``, whose ``python`` jupyter_client replaces by the running
interpreter).

Every execution has a time limit per cell (``timeout``, :data:`DEFAULT_TIMEOUT` seconds; ``ussf notebooks
--timeout``): a cell that runs longer stops the notebook with one :class:`NotebookError` line naming the notebook
and the cell. The kernel imports the ``ussf_lib`` that runs it (its folder goes first on the kernel's ``PYTHONPATH``) and
starts with ``USSF_HEADLESS=1`` in its environment (:data:`HEADLESS_ENV`), so a notebook
run with ``INTERACTIVE=True`` draws no widgets (:func:`ussf_lib.nbrun.helpers.widgets_enabled`): with no browser
nothing renders or answers them, and papermill's client, which captures the output widgets' messages itself to
store their state, is known to block on them at times (papermill issue 723, nbclient issue 312).
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ussf_lib import settings
from ussf_lib.errors import UserError, same_kind
from ussf_lib.files import write_error, write_text
from ussf_lib.nbrun.helpers import HEADLESS_ENV, RUN_SUBDIR, notebooks_dir, resolve_path

#: The executed notebooks' kernel (see the module docstring for how it resolves to this interpreter).
KERNEL_NAME = "python3"
#: Which files in ``notebooks/`` are the numbered notebooks.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
#: Seconds one cell may run before the notebook fails (papermill's ``execution_timeout``; ``--timeout``).
DEFAULT_TIMEOUT = 600

class NotebookError(RuntimeError):
    """A notebook raised while executing; the message names the cell, the error and the executed copy."""



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


def check_out_outside_data(out: str | os.PathLike, parameter_sets: Iterable[Mapping[str, Any]],
                           flag: str = "--out") -> None:
    """Refuse an output folder inside the data the notebooks will read (``DATA``, or what ``MANIFEST`` lists),
    before anything is written: the notebooks would refuse it too, but only after a kernel had written there.
    ``parameter_sets`` (one per notebook or grid point) are absolute (:func:`absolute_path_parameters`); each
    distinct data set is checked once, since a manifest's check reads it."""
    from ussf_lib.data.index import check_outside, index_manifest

    def given(value: Any) -> str | None:
        return value if isinstance(value, str) and value.strip() else None

    for data, manifest in {(given(p.get("DATA")), given(p.get("MANIFEST"))) for p in parameter_sets}:
        if data:
            check_outside(out, data, flag)
        if manifest:
            index_manifest(manifest).check_outside(out, flag)


def check_values(values: Mapping[str, Any], where: str) -> None:
    """Refuse, before a kernel starts, the values a notebook's first cells would refuse (``where`` names it).

    ``values`` are a notebook's parameters with its defaults filled in. A parameter named after a run setting
    (``IMAGE_SIZE`` for ``image_size``) is checked as that setting is (:mod:`ussf_lib.settings`); ``MODEL`` /
    ``MODELS`` must be registry names that take ``IMAGE_SIZE``; ``N_PER_CLASS`` is at least 1, and a notebook
    that trains on the built-in phantom needs as many synthetic patients per class as ``FOLDS``.
    """
    from ussf_lib.data.phantom import min_images_per_class, patients_per_class
    from ussf_lib.models.registry import check_image_size

    declared = set(settings.names())
    for key, value in values.items():
        if key.lower() in declared and key != "OUT_DIR":
            settings.check_value(key.lower(), value, f"{where}: {key}={value!r}")
    if "N_PER_CLASS" in values and values["N_PER_CLASS"] < 1:
        raise UserError(f"{where}: N_PER_CLASS={values['N_PER_CLASS']} must be at least 1")
    size = values.get("IMAGE_SIZE", 224)
    models = [values["MODEL"]] if "MODEL" in values else []
    models += [m.strip() for m in str(values.get("MODELS", "")).split(",") if m.strip()]
    try:
        for name in models:
            check_image_size(name, size)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    trains_on_phantom = models and not values.get("DATA") and not values.get("MANIFEST") and not values.get("RUN_DIR")
    if trains_on_phantom and "N_PER_CLASS" in values and "FOLDS" in values:
        n, folds = values["N_PER_CLASS"], values["FOLDS"]
        if patients_per_class(n) < folds:
            raise UserError(f"{where}: the phantom's N_PER_CLASS={n} images per class make {patients_per_class(n)} "
                            f"patient(s), fewer than FOLDS={folds}; use N_PER_CLASS={min_images_per_class(folds)} "
                            "or more")


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
    if not declared:  # papermill would inject the values into a cell of their own, which nothing reads
        raise UserError(f"{notebook}: has no cell tagged 'parameters'; tag the cell of literal settings "
                        "(cell tags in Jupyter), as the numbered notebooks do")
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
        if isinstance(default, (bool, int, float)):
            ok = same_kind(value, default)
            if ok and isinstance(default, float):
                value = float(value)  # an int given for a float parameter
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
                     progress: bool = False, cwd: str | os.PathLike | None = None,
                     timeout: float | None = DEFAULT_TIMEOUT) -> Path:
    """Execute ``notebook`` with papermill into ``output`` (kernel ``python3``, started in ``cwd`` or the
    notebook's folder, headless: :data:`HEADLESS_ENV` set). A failing cell, a cell running longer than ``timeout``
    seconds (``None``: no limit) or a dying kernel raises :class:`NotebookError` in one line; the executed copy
    keeps what the cells printed, the traceback included."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    notebook, output = Path(notebook), Path(output)
    if timeout is not None and not timeout > 0:
        raise UserError(f"timeout={timeout}: give a positive number of seconds per cell")
    output.parent.mkdir(parents=True, exist_ok=True)
    running: dict[str, Any] = {}

    def cell_timeout(cell: Any) -> float | None:  # nbclient asks before each cell: remember which one runs
        running["cell"] = cell
        return timeout

    try:
        # The kernel's own log (not the notebook's output) warns on every start that its local TCP sockets are
        # unencrypted, and at times logs "KeyboardInterrupt caught in kernel" as an error when it is shut down
        # after the last cell; on a timeout papermill's logger adds a line of its own. None of that concerns the
        # notebook, whose failures are reported below; only a critical kernel message reaches the terminal.
        with _headless_kernel_env(), _quiet_logger("papermill"):
            papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters),
                                       kernel_name=KERNEL_NAME, progress_bar=progress, log_output=False,
                                       cwd=str(cwd or notebook.parent), timeout_func=cell_timeout,
                                       extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as exc:
        raise NotebookError(f"{notebook.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                            f"(traceback in the executed copy {output})") from None
    except CellTimeoutError:
        raise NotebookError(f"{notebook.name}: {_describe_cell(running.get('cell'))} ran longer than the {timeout:g} s "
                            f"limit per cell and was stopped (raise it with --timeout SECONDS; what it printed is "
                            f"in the executed copy {output})") from None
    except DeadKernelError as exc:
        raise NotebookError(f"{notebook.name}: the kernel died in {_describe_cell(running.get('cell'))} "
                            f"({exc}; out of memory?); executed copy {output}") from None
    except OSError as exc:
        # papermill writes the executed copy as it goes; a refused write there (full disk, read-only) is one line.
        if exc.filename is not None and Path(exc.filename) != output:
            raise
        raise write_error(output, exc) from None
    return output


def _describe_cell(cell: Any) -> str:
    """``cell In [7] (`run_dir = run_cv(...)`)``: the execution count Jupyter shows and the first line of code."""
    if cell is None:
        return "a cell"
    lines = [line.strip() for line in str(cell.get("source", "")).splitlines()
             if line.strip() and not line.strip().startswith("#")]
    first = lines[0] if lines else "(empty)"
    first = first if len(first) <= 70 else first[:67] + "..."
    count = cell.get("execution_count")
    return f"cell {'In [' + str(count) + '] ' if count else ''}(`{first}`)"


@contextlib.contextmanager
def _headless_kernel_env():
    """While a kernel starts (it copies this process's environment): :data:`HEADLESS_ENV` set, and the folder
    holding this ``ussf_lib`` first on ``PYTHONPATH``, so the notebook imports the library that runs it (not
    another checkout's installed copy). Restored afterwards."""
    library_root = str(Path(__file__).resolve().parents[2])
    previous = {name: os.environ.get(name) for name in (HEADLESS_ENV, "PYTHONPATH")}
    os.environ[HEADLESS_ENV] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join([library_root, *filter(None, [previous["PYTHONPATH"]])])
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_notebooks(out: str | os.PathLike, *, parameters: Mapping[str, Any] | None = None,
                  notebooks: Iterable[str | os.PathLike] | None = None, progress: bool = False,
                  log: Callable[[str], None] = print, timeout: float | None = DEFAULT_TIMEOUT) -> list[Path]:
    """Execute the numbered notebooks (all, or ``notebooks``) in order; return the executed copies' paths.

    Each notebook ``NN_name`` runs with ``OUT_DIR=OUT/NN_name`` plus those of ``parameters`` it declares (a name
    no notebook declares is a :class:`UserError`) and those scoped to it as ``"NN:NAME"`` (an undeclared scoped
    name is an error too), into ``OUT/NN_name.ipynb``. When a notebook with ``RUN_DIR``
    (05) follows one that trained a cross-validation run (04, ``OUT_DIR/run``) and ``RUN_DIR`` is not given, it
    evaluates that run instead of training its own. A failing notebook does not stop the others; a
    :class:`NotebookError` listing the failures is raised at the end. ``OUT/notebooks.json`` records each
    notebook's parameters, seconds and status. ``timeout`` limits each cell (seconds, see :func:`execute_notebook`).
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
    check_out_outside_data(out, checked.values())
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
            executed.append(execute_notebook(path, out / path.name, params, progress=progress, timeout=timeout))
        except NotebookError as exc:
            status = f"failed: {exc}"
            failures.append(str(exc))
        seconds = time.perf_counter() - started
        log(f"{path.stem}: {status if status != 'ok' else 'done'} in {seconds:.1f}s -> {out_dir}")
        record.append({"notebook": path.name, "parameters": params, "seconds": round(seconds, 2), "status": status})
        if status == "ok" and (out_dir / RUN_SUBDIR / "summary.json").is_file():
            cv_run = out_dir / RUN_SUBDIR
    write_text(out / "notebooks.json", json.dumps(record, indent=2))
    if failures:
        raise NotebookError(f"{len(failures)} of {len(paths)} notebook(s) failed: " + " | ".join(failures))
    return executed

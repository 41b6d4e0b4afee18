"""The helpers every numbered notebook shares: repository paths, its data, its output folder, rerun logic.

Notebook conventions (``tests/test_notebooks.py`` checks them): a markdown title first, one imports cell that
prints :func:`ussf_lib.training.provenance.environment_line`, exactly one cell tagged ``parameters`` holding only
literals with tiny CPU defaults (the built-in phantom when ``DATA`` and ``MANIFEST`` are empty), and no
outputs in the committed file. Inside a notebook, relative paths in parameters (``DATA``, ``MANIFEST``,
``OUT_DIR``, ``RUN_DIR``) are relative to the repository root (:func:`repo_root`), whatever folder the kernel
starts in (JupyterLab and nbval start it in ``notebooks/``, papermill wherever it is told). Running them
headless (``ussf notebooks``, ``ussf sweep``) is :mod:`ussf_lib.nbrun.runner`'s job.
Used by every notebook (``notebooks/01_explore_data.ipynb`` introduces it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ussf_lib import settings
from ussf_lib.errors import UserError

#: Sub-folder of a notebook's ``OUT_DIR`` holding the cross-validation run folder it trains (04, and 05 when
#: it has no ``RUN_DIR``); :func:`ussf_lib.nbrun.runner.run_notebooks` hands 04's to 05 as ``RUN_DIR``.
RUN_SUBDIR = "run"
#: Classes and group column of the built-in phantom.
PHANTOM_GROUP_COL = "patient"
#: Set to ``1`` in the kernel's environment by headless runs (:func:`ussf_lib.nbrun.runner.execute_notebook`).
HEADLESS_ENV = "USSF_HEADLESS"


# --------------------------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The ussf checkout: the folder above ``ussf_lib`` when it holds ``notebooks/``, else the current folder."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "notebooks").is_dir() else Path.cwd()


def notebooks_dir() -> Path:
    """The folder of the numbered notebooks, ``<repo>/notebooks``."""
    return repo_root() / "notebooks"


def resolve_path(path: str | os.PathLike | None) -> Path | None:
    """``None`` for an empty value; a relative path is taken from the repository root (:func:`repo_root`).

    Introduced in ``notebooks/05_evaluate_confusion_matrices.ipynb``.
    """
    if path is None or str(path).strip() == "":
        return None
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else repo_root() / p


def resolve_out_dir(out_dir: str | os.PathLike) -> Path:
    """A notebook's ``OUT_DIR``, resolved like :func:`resolve_path` and created.

    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    out = resolve_path(out_dir)
    if out is None:
        raise UserError("OUT_DIR is empty; give the folder the notebook writes its figures and tables into")
    out.mkdir(parents=True, exist_ok=True)
    return out


def widgets_enabled(interactive: bool, log: Callable[[str], None] = print) -> bool:
    """Whether a notebook should draw its ipywidgets now: ``INTERACTIVE`` is True and a browser can show them.

    Headless runs (``ussf notebooks``, ``ussf sweep``, papermill through :mod:`ussf_lib.nbrun.runner`) start the
    kernel with ``USSF_HEADLESS=1``: nobody can move a slider there, nothing renders a widget or answers its
    messages, and papermill's client, which captures output widgets' messages to store their state, can block
    on them (papermill issue 723, nbclient issue 312). There every widget cell is skipped with one line, and the
    static figures drawn before it stand in. Progress bars follow the same rule (they are widgets in a kernel).
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    if not interactive:
        return False
    if os.environ.get(HEADLESS_ENV, "") not in ("", "0"):
        log("INTERACTIVE=True, but this is a headless run: no widgets (open the notebook in JupyterLab for them)")
        return False
    return True


# --------------------------------------------------------------------------------------------- data


@dataclass
class NotebookData:
    """The dataset a notebook works on: its index, the matching :class:`~ussf_lib.training.experiment.CVConfig` keywords
    (``data`` / ``manifest`` / ``group_col`` / ``classes``) and a one-line description."""

    index: Any
    cv_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def prepare_data(data: str = "", manifest: str = "", group_col: str = "", out_dir: str | os.PathLike = ".",
                 n_per_class: int = 16, image_size: int = 32, seed: int = 0,
                 class_ratio: Any = None) -> NotebookData:
    """Index the notebook's data: a class-folder tree (``data``), a CSV manifest (``manifest`` + ``group_col``) or,
    when both are empty, the built-in phantom generated into ``OUT_DIR/phantom`` (reused while its settings
    ``n_per_class``, ``image_size``, ``seed`` and ``class_ratio`` stay the same; ``class_ratio`` ``None`` or ``""``
    is balanced, ``"paper"`` the paper's class proportions, see :func:`ussf_lib.data.phantom.class_counts`).
    Introduced in ``notebooks/01_explore_data.ipynb``.
    """
    from ussf_lib.data.index import load_index
    from ussf_lib.paper import PAPER_CLASSES

    data_path, manifest_path = resolve_path(data), resolve_path(manifest)
    if data_path is not None or manifest_path is not None:
        if data_path is not None and manifest_path is not None:
            raise UserError("DATA and MANIFEST are both set; give one (a class-folder tree or a CSV manifest)")
        kwargs = {"data": str(data_path) if data_path else None,
                  "manifest": str(manifest_path) if manifest_path else None, "group_col": group_col or None}
        index = load_index(**kwargs)
        return NotebookData(index, kwargs, f"{data_path or manifest_path}: {index.describe()}")
    ratio = class_ratio if class_ratio not in (None, "") else None
    manifest_file = phantom_manifest(Path(out_dir) / "phantom", n_per_class, image_size, seed, ratio)
    kwargs = {"manifest": str(manifest_file), "group_col": PHANTOM_GROUP_COL, "classes": list(PAPER_CLASSES)}
    index = load_index(**kwargs)
    size = f"{n_per_class} per class" if ratio is None else f"class ratio {ratio!s}, largest class {n_per_class}"
    return NotebookData(index, kwargs, f"built-in phantom ({size}, {image_size} px, seed {seed}): {index.describe()}")


def phantom_manifest(folder: str | os.PathLike, n_per_class: int, image_size: int, seed: int,
                     class_ratio: Any = None) -> Path:
    """The manifest of a phantom in ``folder`` with these settings, generated unless it is already there."""
    from ussf_lib.data.phantom import generate_phantom

    folder = Path(folder)
    settings: dict[str, Any] = {"n_per_class": int(n_per_class), "image_size": int(image_size), "seed": int(seed)}
    if class_ratio is not None:  # balanced phantoms keep the stamp they always had
        settings["class_ratio"] = class_ratio if isinstance(class_ratio, (str, dict)) else list(class_ratio)
    stamp = folder.with_name(folder.name + ".json")
    manifest = folder / "manifest.csv"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return manifest
    manifest = generate_phantom(folder, n_per_class=int(n_per_class), image_size=int(image_size), seed=int(seed),
                                class_ratio=class_ratio)
    stamp.write_text(json.dumps(settings))
    return manifest


def example_image(data: str = "", manifest: str = "", image_size: int = 32, seed: int = 0,
                  label: str = "metastatic") -> tuple[np.ndarray, str]:
    """One RGB uint8 image ``(image_size, image_size, 3)`` and its description: a phantom node of class ``label``
    when ``data`` and ``manifest`` are empty, else the first image of class ``label`` (or of the first class).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``."""
    from ussf_lib.data.index import load_index, read_image

    data_path, manifest_path = resolve_path(data), resolve_path(manifest)
    if data_path is None and manifest_path is None:
        from ussf_lib.data.phantom import render_node

        gray = render_node(label, np.random.default_rng(seed), image_size)
        return np.repeat(gray[..., None], 3, axis=-1), f"phantom {label} node (seed {seed})"
    index = load_index(data=str(data_path) if data_path else None,
                       manifest=str(manifest_path) if manifest_path else None)
    rows = index.frame[index.frame["label"] == label]
    row = (rows if len(rows) else index.frame).iloc[0]
    return read_image(row["path"], image_size), f"{row['relpath']} ({row['label']})"


#: Settings a configuration summary leaves out: where things are, and what does not change results.
_SUMMARY_SKIPS = ("out", "data", "manifest", "group_col", "classes", "progress", "device")


def config_summary(cfg: Any) -> Any:
    """The settings of ``cfg`` (a :class:`~ussf_lib.training.experiment.CVConfig`) that differ from their defaults,
    which are the paper's protocol, one row each beside the default; paths and output settings are left out
    (the run folder's ``config.json`` holds every setting). Introduced in
    ``notebooks/04_train_cross_validation.ipynb``."""
    import pandas as pd

    values = settings.config_to_dict(cfg)
    rows = [(s.name, values[s.name], s.default) for s in settings.SETTINGS
            if s.name in values and s.name not in _SUMMARY_SKIPS
            and values[s.name] != (list(s.default) if isinstance(s.default, tuple) else s.default)]
    return pd.DataFrame(rows, columns=["setting", "this run", "default (the paper's protocol)"]).set_index("setting")


def resume_or_replace(cfg: Any, log: Callable[[str], None] = print) -> bool:
    """Prepare ``cfg.out`` for ``run_cv`` in a notebook; True means "resume it".

    A notebook re-runs with new parameters all the time, and its run folder (``OUT_DIR/run``) belongs to it: a
    run there with the same settings is resumed (finished folds are skipped), one with other settings is
    deleted and trained again. A folder that is not a ussf run (no ``config.json``) is left to ``run_cv``'s error.
    Introduced in ``notebooks/04_train_cross_validation.ipynb``.
    """
    import shutil

    run_dir = Path(cfg.out)
    config = run_dir / "config.json"
    if not config.is_file():
        return False
    changed = settings.resume_changes(json.loads(config.read_text()), cfg.to_dict())
    if not changed:
        return True
    log(f"{run_dir}: settings changed ({', '.join(changed)}); replacing the previous run")
    shutil.rmtree(run_dir)
    return False

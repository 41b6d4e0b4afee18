"""The numbered notebooks: structure and committed state (fast), then one headless run of all of them.

The structure tests read the .ipynb files only. ``executed`` runs every notebook once with its defaults through
``ussf_lib.nbrun.helpers.run_notebooks`` (papermill) into a temporary folder, for the whole module.
"""

from __future__ import annotations

import ast
import importlib
import math
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from PIL import Image

from ussf_lib.nbrun import runner
from ussf_lib.nbrun import helpers as nbs
from ussf_lib.errors import UserError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
EXPECTED = ["01_explore_data", "02_image_spectra", "03_build_conv_fft_block", "04_train_cross_validation",
            "05_evaluate_confusion_matrices", "06_compare_baselines"]
#: Every numbered notebook in the folder (later notebooks follow the same rules).
ALL = sorted(p.stem for p in NOTEBOOK_DIR.glob(runner.NOTEBOOK_GLOB))
#: Every notebook parameter, and the CLI flag that means the same (None: notebook-only).
VOCABULARY = {
    "DATA": "--data", "MANIFEST": "--manifest", "GROUP_COL": "--group-col", "N_PER_CLASS": "--n-per-class",
    "IMAGE_SIZE": "--image-size", "MODEL": "--model", "EPOCHS": "--epochs", "FOLDS": "--folds",
    "BATCH_SIZE": "--batch-size", "SEED": "--seed", "OUT_DIR": "--out", "RUN_DIR": None, "CUTOFF": None,
    "INTERACTIVE": None, "MODELS": "--models", "AMP": "--amp", "CHANNELS_LAST": "--channels-last",
    "COMPILE": "--compile", "EVAL_EVERY": "--eval-every", "CLASS_RATIO": "--class-ratio",
    "AUGMENT": "--augment", "LR_SCHEDULE": "--lr-schedule", "WARMUP_EPOCHS": "--warmup-epochs",
    "IMBALANCE": "--imbalance",
}
#: CI-safe defaults every notebook that declares the name must use (how much each one trains is its own choice:
#: enough to show its point in about a minute on 2 CPU cores).
SHARED_DEFAULTS = {"DATA": "", "MANIFEST": "", "GROUP_COL": "", "MODEL": "us_sfnet_tiny", "SEED": 0,
                   "INTERACTIVE": False, "RUN_DIR": "", "AMP": "off", "CHANNELS_LAST": False, "COMPILE": False,
                   "EVAL_EVERY": 1}
#: Settings with which 05, given no RUN_DIR, trains the run 04 trains.
TRAINING = ("N_PER_CLASS", "IMAGE_SIZE", "MODEL", "EPOCHS", "FOLDS", "BATCH_SIZE", "SEED")
PAPER_URL = "https://arxiv.org/abs/2308.16738"
CHECK_TAG = "nbval-check-output"
#: Files each notebook must leave in its OUT_DIR (a notebook not listed: metrics.json).
EXPECTED_FILES = {
    "01_explore_data": ["metrics.json", "class_counts.csv", "class_counts.png", "samples.png", "sizes_modes.csv",
                        "intensity_histograms.png", "images_per_patient.png", "audit_clusters.csv",
                        "audit_summary.json"],
    "02_image_spectra": ["metrics.json", "mean_log_spectra.png", "radial_spectra.png", "radial_spectra.csv",
                         "magnitude_phase_swap.png", "speckle_spectra.png", "high_frequency_fraction.csv"],
    "03_build_conv_fft_block": ["metrics.json", "branches.png", "complexity.csv", "stage_shapes.csv",
                                "receptive_fields.png", "trained_branches.png", "ablation/table1.csv",
                                "ablation/paired.csv", "ablation/us_sfnet_tiny_nofft/summary.json"],
    "04_train_cross_validation": ["metrics.json", "per_fold.csv", "run/summary.json", "run/learning_curves.png",
                                  "run/results.md"],
    "05_evaluate_confusion_matrices": ["metrics.json", "confusion_per_fold.png", "confusion_pooled.png",
                                       "table2.md", "roc.png", "pooled_vs_per_fold.csv"],
    "06_compare_baselines": ["metrics.json", "compare/table1.md", "compare/table2.md", "compare/paired.md",
                             "compare/per_class_bars.png", "compare/us_sfnet_tiny/summary.json",
                             "compare/densenet121/summary.json", "per_class_percent.png"],
}


def read(stem: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)


def parameters_cell(nb) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{len(cells)} cells tagged 'parameters'; exactly one is needed"
    return cells[0]


def literal_parameters(nb) -> dict:
    """Name -> value of the parameters cell, which must hold only ``NAME = literal`` statements."""
    tree = ast.parse(parameters_cell(nb).source)
    values = {}
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), \
            f"not a plain assignment: {ast.unparse(stmt)}"
        values[stmt.targets[0].id] = ast.literal_eval(stmt.value)  # raises unless a literal
    return values


def code_trees(nb) -> list[ast.Module]:
    """Every code cell parsed, with its ``%`` magic and ``!`` shell lines blanked out."""
    return [ast.parse("\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in c.source.splitlines()))
            for c in nb.cells if c.cell_type == "code"]


def library_objects_used(nb) -> list:
    """The ussf_lib objects a notebook imports by name or reaches as ``module.name`` through an imported module."""
    modules: dict[str, ModuleType] = {}  # a name the notebook binds -> the ussf_lib module it stands for
    used = []

    def module_of(node: ast.expr) -> ModuleType | None:
        if isinstance(node, ast.Name):
            return modules.get(node.id)
        if isinstance(node, ast.Attribute) and (outer := module_of(node.value)) is not None:
            inner = getattr(outer, node.attr, None)
            return inner if isinstance(inner, ModuleType) else None
        return None

    def bind(name: str, obj) -> None:
        if isinstance(obj, ModuleType):
            modules[name] = obj
        else:
            used.append(obj)

    for tree in code_trees(nb):
        for node in ast.walk(tree):  # breadth first: top-level imports bind names before any use is reached
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ussf_lib":
                module = importlib.import_module(node.module)
                for alias in node.names:  # as Python does: an attribute of the module, else its submodule
                    bind(alias.asname or alias.name, getattr(module, alias.name) if hasattr(module, alias.name)
                         else importlib.import_module(f"{node.module}.{alias.name}"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "ussf_lib":  # binds the module, or without "as" the package
                        module = importlib.import_module(alias.name)
                        bind(alias.asname or "ussf_lib", module if alias.asname else sys.modules["ussf_lib"])
            elif isinstance(node, ast.Attribute) and (module := module_of(node.value)) is not None:
                used.append(getattr(module, node.attr))
    return [obj for obj in used if (inspect.isfunction(obj) or inspect.isclass(obj))
            and obj.__module__.split(".")[0] == "ussf_lib"]


def checked(cell) -> bool:
    return CHECK_TAG in cell.get("metadata", {}).get("tags", [])


def logic_lines(source: str) -> int:
    return sum(1 for line in source.splitlines() if line.strip() and not line.strip().startswith("#"))


# --------------------------------------------------------------------------------------------- structure


def test_the_numbered_notebooks_are_found_in_order():
    assert [p.stem for p in runner.notebook_paths()] == ALL and ALL[:len(EXPECTED)] == EXPECTED
    assert [p.stem for p in runner.notebook_paths(["03", "01_explore_data"])] == [EXPECTED[2], EXPECTED[0]]
    with pytest.raises(UserError, match="not found"):
        runner.notebook_paths(["99"])


@pytest.mark.parametrize("stem", ALL)
def test_notebook_structure(stem):
    nb = read(stem)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), "a markdown title comes first"
    code = [c for c in nb.cells if c.cell_type == "code"]
    imports = code[0]
    assert "environment_line()" in imports.source, "the first code cell is the imports cell printing the environment"
    body = ast.parse(imports.source).body
    assert all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in body[:-1]), "the imports cell only imports"
    late = [c.source.splitlines()[0] for c in code[1:]
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(ast.parse(c.source)))]
    assert late == [], f"imports belong in the imports cell, not in the cells starting {late}"
    assert code[1] is parameters_cell(nb), "the parameters cell follows the imports cell"
    assert any(checked(c) for c in code), f"deterministic cells carry the cell tag {CHECK_TAG!r}"
    assert not [c for c in code if "NBVAL_" in c.source], "nbval's cell tags, not comments in the code"
    assert PAPER_URL in first.source, "the title cell links the paper"
    # The parameters cell holds literals only (test_parameters_are_literals_with_ci_safe_defaults) and the imports
    # cell only imports (above): neither has logic.
    longest = max(code[2:], key=lambda c: logic_lines(c.source))
    assert logic_lines(longest.source) <= 15, f"a cell with {logic_lines(longest.source)} lines belongs in the library"


@pytest.mark.parametrize("stem", ALL)
def test_notebook_ends_with_what_you_learned_and_exercises_naming_what_to_change(stem):
    nb = read(stem)
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and "## What you learned" in last.source
    exercises = last.source.split("**Exercises**", 1)[1].split("**Next:**")[0]
    items = [line for line in exercises.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. ")]
    assert 2 <= len(items) <= 3, f"{len(items)} exercises; give 2 or 3"
    names = set(literal_parameters(nb))
    blocks = exercises.split("\n\n")
    for item in items:  # each names a parameter to set or a line of code (in backticks) to change
        text = next(b for b in blocks if item in b)
        assert any(f"`{n}" in text for n in names) or "in section" in text.lower(), text


@pytest.mark.parametrize("stem", ALL)
def test_widgets_are_drawn_only_where_a_browser_shows_them(stem):
    """INTERACTIVE goes through widgets_enabled(), which skips widgets in headless kernels (they can block
    papermill); no cell branches on INTERACTIVE itself or hands it to a progress bar."""
    sources = [c.source for c in read(stem).cells if c.cell_type == "code" and "parameters" not in
               c.get("metadata", {}).get("tags", [])]
    uses = [line.strip() for src in sources for line in src.splitlines() if "INTERACTIVE" in line]
    assert uses and all("widgets_enabled(INTERACTIVE)" in u for u in uses), uses


def test_05_trains_what_04_trains_and_training_notebooks_show_learning():
    v04, v05 = literal_parameters(read(EXPECTED[3])), literal_parameters(read(EXPECTED[4]))
    assert {k: v04[k] for k in TRAINING} == {k: v05[k] for k in TRAINING}
    for stem in EXPECTED:
        values = literal_parameters(read(stem))
        if "EPOCHS" in values:  # learning curves with several epochs; folds enough for a paired test's spread
            assert values["EPOCHS"] >= 3 and values["FOLDS"] >= 3, stem


@pytest.mark.parametrize("stem", ALL)
def test_notebook_is_committed_clean(stem):
    raw = json.loads((NOTEBOOK_DIR / f"{stem}.ipynb").read_text())
    assert "widgets" not in raw["metadata"], "widget state is saved in the notebook: clear it"
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], "outputs are saved in the notebook: clear them"
            assert cell["execution_count"] is None, "execution counts are saved in the notebook: clear them"
        assert "widgets" not in cell.get("metadata", {})


def test_library_names_used_by_notebooks_name_the_notebook_that_introduces_them():
    """d2l's habit: each function or class a notebook uses says, in its own docstring (not its module's), which
    notebook introduces it, i.e. the first that uses it."""
    first: dict[str, tuple[object, str]] = {}  # qualified name -> (object, the notebook that first uses it)
    for stem in ALL:
        for obj in library_objects_used(read(stem)):
            first.setdefault(f"{obj.__module__}.{obj.__qualname__}", (obj, f"{stem}.ipynb"))
    missing = [f"{name}: its docstring should say 'Introduced in ``notebooks/{notebook}``.'"
               for name, (obj, notebook) in sorted(first.items())
               # only its own docstring: getdoc never reads the module's, and would read a base class's
               if f"notebooks/{notebook}" not in ((inspect.getdoc(obj) if obj.__doc__ else None) or "")]
    assert first, "no notebook uses a function or class of ussf_lib"
    assert not missing, "\n".join(["docstrings not naming the notebook that introduces them:", *missing])


@pytest.mark.parametrize("stem", ALL)
def test_parameters_are_literals_with_ci_safe_defaults(stem):
    values = literal_parameters(read(stem))
    assert set(values) <= set(VOCABULARY), f"unknown parameter names {set(values) - set(VOCABULARY)}"
    assert {"SEED", "OUT_DIR", "INTERACTIVE"} <= set(values)
    assert values.get("CLASS_RATIO", "") in ("", "paper")
    assert values["OUT_DIR"] == f"runs/notebooks/{stem}"
    assert values["INTERACTIVE"] is False
    assert 32 <= values.get("IMAGE_SIZE", 32) <= 64
    for name, default in SHARED_DEFAULTS.items():
        if name in values:
            assert values[name] == default and type(values[name]) is type(default), f"{name} = {values[name]!r}"
    # papermill reads the same names (comments with quotes or '=' can make it skip a line silently)
    assert list(runner.declared_parameters(NOTEBOOK_DIR / f"{stem}.ipynb")) == list(values)


def test_parameter_names_match_the_cli_flags():
    from ussf_lib.cli import build_parser

    parser = build_parser()
    flags = set()
    for action in parser._subparsers._group_actions:  # noqa: SLF001 - argparse keeps sub-parsers here
        for sub in action.choices.values():
            flags.update(opt for a in sub._actions for opt in a.option_strings)  # noqa: SLF001
    used = set().union(*(literal_parameters(read(s)) for s in ALL))
    for name in used:
        if VOCABULARY[name] is not None:
            assert VOCABULARY[name] in flags, f"notebook parameter {name} has no CLI flag {VOCABULARY[name]}"


# --------------------------------------------------------------------------------------------- runner helpers


def test_parse_assignments_and_type_checks():
    assert runner.parse_assignments(["EPOCHS=2", "MODEL=us_sfnet", "CUTOFF=1e-1", "INTERACTIVE=true",
                                  "DATA=../shared/datasets/busi", "RUN_DIR="]) == {
        "EPOCHS": 2, "MODEL": "us_sfnet", "CUTOFF": 0.1, "INTERACTIVE": True,
        "DATA": "../shared/datasets/busi", "RUN_DIR": ""}
    with pytest.raises(UserError, match="KEY=VALUE"):
        runner.parse_assignments(["EPOCHS"])
    nb = NOTEBOOK_DIR / "02_image_spectra.ipynb"
    assert runner.check_parameters(nb, {"CUTOFF": 1, "DATA": 5}) == {"CUTOFF": 1.0, "DATA": "5"}
    with pytest.raises(UserError, match="IMAGE_SIZE takes values of type int"):
        runner.check_parameters(nb, {"IMAGE_SIZE": "big"})
    with pytest.raises(UserError, match="has no parameter 'EPOCHS'; its parameters are DATA"):
        runner.check_parameters(nb, {"EPOCHS": 1})


def test_run_notebooks_rejects_bad_parameters_before_running(tmp_path):
    with pytest.raises(UserError, match="no notebook has the parameter 'EPOCS'"):
        runner.run_notebooks(tmp_path / "a", parameters={"EPOCS": 1})
    with pytest.raises(UserError, match="OUT_DIR is set per notebook"):
        runner.run_notebooks(tmp_path / "b", parameters={"OUT_DIR": "x"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_notebooks_reports_a_bad_parameter_in_one_line(tmp_path, capsys):
    from ussf_lib.cli import main

    assert main(["notebooks", "--out", str(tmp_path / "nb"), "--param", "BOGUS=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ussf notebooks: error: no notebook has the parameter 'BOGUS'") and "\n" not in err


def test_paths_resolve_from_the_repository_root(tmp_path):
    assert nbs.repo_root() == REPO
    assert nbs.resolve_path("") is None and nbs.resolve_path(None) is None
    assert nbs.resolve_path("runs/x") == REPO / "runs" / "x"
    assert nbs.resolve_path(tmp_path) == tmp_path
    assert nbs.resolve_out_dir(tmp_path / "o").is_dir()


def test_command_line_paths_start_at_the_current_folder(tmp_path, monkeypatch, capsys):
    from ussf_lib.cli import main

    (tmp_path / "tree").mkdir()
    (tmp_path / "m.csv").write_text("path,label\n")
    monkeypatch.chdir(tmp_path)
    resolved = runner.absolute_path_parameters({"DATA": "tree", "MANIFEST": "m.csv", "RUN_DIR": "", "EPOCHS": 2})
    assert resolved == {"DATA": str(tmp_path / "tree"), "MANIFEST": str(tmp_path / "m.csv"), "RUN_DIR": "", "EPOCHS": 2}
    for key, value, what in (("DATA", "m.csv", "is a file, not a folder"), ("MANIFEST", "tree", "is a folder, not a file"),
                             ("RUN_DIR", "nope", "no such folder")):
        with pytest.raises(UserError, match=rf"{key}={value}: {what} \({tmp_path / value}\)"):
            runner.absolute_path_parameters({key: value})
    # refused before any kernel starts or anything is written
    assert main(["notebooks", "--out", "nb", "--only", "04", "--param", "DATA=missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ussf notebooks: error: DATA=missing: no such folder") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "tree"]


def test_phantom_is_generated_once_per_setting(tmp_path):
    first = nbs.prepare_data(out_dir=tmp_path, n_per_class=8, image_size=16, seed=0)
    assert len(first.index) == 32 and first.cv_kwargs["group_col"] == "patient"
    stamp = (tmp_path / "phantom" / "manifest.csv").stat().st_mtime_ns
    nbs.prepare_data(out_dir=tmp_path, n_per_class=8, image_size=16, seed=0)
    assert (tmp_path / "phantom" / "manifest.csv").stat().st_mtime_ns == stamp  # reused
    assert len(nbs.prepare_data(out_dir=tmp_path, n_per_class=9, image_size=16, seed=0).index) == 36
    with pytest.raises(UserError, match="both set"):
        nbs.prepare_data(data="a", manifest="b")
    unbalanced = nbs.prepare_data(out_dir=tmp_path, n_per_class=9, image_size=16, seed=0, class_ratio="paper")
    assert unbalanced.index.frame["label"].value_counts().to_dict() == {"metastatic": 9, "normal": 8, "benign": 4,
                                                                         "primary": 2}
    assert len(nbs.prepare_data(out_dir=tmp_path, n_per_class=9, image_size=16, seed=0, class_ratio="").index) == 36
    image, about = nbs.example_image(image_size=24, seed=1)
    assert image.shape == (24, 24, 3) and image.dtype.name == "uint8" and "phantom" in about


def test_config_summary_lists_what_differs_from_the_papers_protocol():
    from ussf_lib.training.experiment import CVConfig

    cfg = CVConfig(out="runs/x", data="d", model="us_sfnet_tiny", epochs=4, folds=3, image_size=32, batch_size=16,
                   progress=False)
    summary = nbs.config_summary(cfg)
    assert list(summary.index) == ["image_size", "folds", "model", "epochs", "batch_size"]
    assert summary.loc["epochs"].tolist() == [4, 150] and len(cfg.to_dict()) > 3 * len(summary)


def test_resume_or_replace_keeps_a_matching_run_and_replaces_another(tmp_path):
    from ussf_lib.training.experiment import CVConfig

    cfg = CVConfig(out=str(tmp_path / "run"), data="d", model="us_sfnet_tiny", epochs=1, folds=2, image_size=32)
    assert nbs.resume_or_replace(cfg) is False  # nothing there yet
    (tmp_path / "run" / "folds").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    cfg.progress = not cfg.progress  # settings that do not change results may differ
    assert nbs.resume_or_replace(cfg) is True
    cfg.epochs = 2
    assert nbs.resume_or_replace(cfg, log=lambda line: None) is False
    assert not (tmp_path / "run").exists()


def _tiny_notebook(path: Path, *code: str) -> Path:
    """A notebook with a parameters cell (``OUT_DIR``, ``SECONDS``) and the given code cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('OUT_DIR = ""\nSECONDS = 30')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_code_cell("import time"), params, *map(nbformat.v4.new_code_cell, code)]
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_a_cell_running_past_the_timeout_fails_in_one_line_naming_notebook_and_cell(tmp_path, capfd):
    from ussf_lib.cli import main

    nb = _tiny_notebook(tmp_path / "99_sleepy.ipynb", "x = 1", "# waits\ntime.sleep(SECONDS)", "print('never')")
    with pytest.raises(runner.NotebookError) as caught:
        runner.execute_notebook(nb, tmp_path / "out" / nb.name, {"SECONDS": 60}, timeout=3)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("99_sleepy.ipynb: cell In [")
    assert "(`time.sleep(SECONDS)`) ran longer than the 3 s limit per cell" in message and "--timeout" in message
    capfd.readouterr()
    started = time.perf_counter()
    assert main(["notebooks", "--out", str(tmp_path / "nb"), "--only", str(nb), "--timeout", "3"]) == 1
    assert time.perf_counter() - started < 60  # not the 30 s sleep plus the default 600 s limit
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "99_sleepy.ipynb: cell In [" in lines[0] and "time.sleep(SECONDS)" in lines[0], err
    record = json.loads((tmp_path / "nb" / "notebooks.json").read_text())
    assert record[0]["status"].startswith("failed") and "3 s limit" in record[0]["status"]
    # a short enough cell passes
    runner.execute_notebook(nb, tmp_path / "ok" / nb.name, {"SECONDS": 0}, timeout=30)


def test_timeout_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="timeout=0"):
        runner.execute_notebook(NOTEBOOK_DIR / "01_explore_data.ipynb", tmp_path / "x.ipynb", {}, timeout=0)
    assert inspect.signature(runner.run_notebooks).parameters["timeout"].default == runner.DEFAULT_TIMEOUT == 600


@pytest.mark.slow
def test_headless_runs_draw_no_widgets(tmp_path, monkeypatch):
    """INTERACTIVE=True in a headless kernel skips the widgets (they could block papermill) with one line."""
    nb = _tiny_notebook(tmp_path / "98_widgets.ipynb",
                        "from ussf_lib.nbrun.helpers import widgets_enabled\nprint('enabled:', widgets_enabled(True))")
    executed = nbformat.read(runner.execute_notebook(nb, tmp_path / "out.ipynb", {}, cwd=REPO), as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "headless run: no widgets" in text and "enabled: False" in text
    assert nbs.HEADLESS_ENV not in __import__("os").environ  # set for the kernel only
    monkeypatch.delenv(nbs.HEADLESS_ENV, raising=False)
    assert nbs.widgets_enabled(True, log=lambda line: None) is True and nbs.widgets_enabled(False) is False
    monkeypatch.setenv(nbs.HEADLESS_ENV, "1")
    assert nbs.widgets_enabled(True, log=lambda line: None) is False


# --------------------------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("notebooks")
    paths = runner.run_notebooks(out, log=lambda line: None)
    return out, paths


@pytest.mark.slow
def test_run_notebooks_executes_every_notebook_with_its_outputs(executed):
    out, paths = executed
    assert [p.name for p in paths] == [f"{s}.ipynb" for s in ALL]
    for stem in ALL:
        nb = nbformat.read(out / f"{stem}.ipynb", as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{stem} shows no figure"
        for name in EXPECTED_FILES.get(stem, ["metrics.json"]):
            assert (out / stem / name).is_file(), f"{stem} did not write {name}"
    record = {r["notebook"]: r for r in json.loads((out / "notebooks.json").read_text())}
    assert all(r["status"] == "ok" for r in record.values())
    # 05 evaluated 04's run instead of training its own
    run_04 = out / "04_train_cross_validation" / "run"
    assert record["05_evaluate_confusion_matrices.ipynb"]["parameters"]["RUN_DIR"] == str(run_04)
    assert not (out / "05_evaluate_confusion_matrices" / "run").exists()


@pytest.mark.slow
def test_notebook_metrics_hold_the_expected_numbers(executed):
    from ussf_lib.models.complexity import count_parameters
    from ussf_lib.models import build_model

    out, _ = executed
    from ussf_lib.data.phantom import class_counts

    m01 = json.loads((out / "01_explore_data" / "metrics.json").read_text())
    assert m01["class_counts"] == class_counts(60, "paper") and m01["imbalance_max"] > 5  # the paper's proportions
    assert m01["duplicates"]["exact_clusters"] == 0 and "is possible" in m01["fold_check"]
    m02 = json.loads((out / "02_image_spectra" / "metrics.json").read_text())
    assert m02["low_plus_high_equals_image"] and m02["swap_keeps_magnitude"]
    m03 = json.loads((out / "03_build_conv_fft_block" / "metrics.json").read_text())
    assert m03["round_trip_max_error"] < 1e-5 and m03["hand_vs_library_max_difference"] < 1e-5
    assert m03["receptive_field_pixels"] == {"spatial(x)": 9, "freq(x)": 32 * 32, "whole block": 32 * 32}
    away = {b: e["relative error, 1 px from border and seam"] for b, e in m03["shift_error"].items()}
    assert away["spatial(x)"] < 1e-5 < 0.1 < away["freq(x)"]
    assert set(m03["ablation_accuracy"]) == {"us_sfnet_tiny", "us_sfnet_tiny_nofreq", "us_sfnet_tiny_nofft"}
    params = {r["model"]: r["parameters"] for r in m03["complexity"]}
    assert params["densenet121"] == count_parameters(build_model("densenet121", 4, image_size=32))
    assert params["us_sfnet_tiny"] == count_parameters(build_model("us_sfnet_tiny", 4, image_size=32))
    m04 = json.loads((out / "04_train_cross_validation" / "metrics.json").read_text())
    assert m04["accuracy"]["mean"] >= 0.4 and len(m04["per_fold"]) == 3  # clearly above chance (0.25)
    assert m04["parameters"]["MODEL"] == "us_sfnet_tiny"
    histories = sorted((out / "04_train_cross_validation" / "run" / "folds").glob("*/history.csv"))
    assert len(histories) == 3 and all(len(h.read_text().strip().splitlines()) == 1 + 4 for h in histories)
    m05 = json.loads((out / "05_evaluate_confusion_matrices" / "metrics.json").read_text())
    assert sum(map(sum, m05["confusion_pooled"])) == 400
    assert {r["class"] for r in m05["pooled_vs_per_fold"]} == {"normal", "benign", "primary", "metastatic"}
    assert m05["accuracy"] == m04["accuracy"]
    m06 = json.loads((out / "06_compare_baselines" / "metrics.json").read_text())
    assert m06["reference_model"] == "us_sfnet_tiny"  # us_sfnet is not compared: the first model
    summary = json.loads((out / "06_compare_baselines" / "compare" / "us_sfnet_tiny" / "summary.json").read_text())
    for m in ("accuracy", "f1", "auc"):  # what a sweep of 06 collects: the reference model's summary
        assert m06[m]["mean"] == pytest.approx(summary[m]["mean"]) and m06[m]["std"] == pytest.approx(summary[m]["std"])
    assert set(m06["accuracy_by_model"]) == {"us_sfnet_tiny", "densenet121"}
    assert min(m06["accuracy_by_model"].values()) >= 0.3  # both learned: chance is 0.25
    assert all(math.isfinite(r["p_value"]) for r in m06["paired"]), m06["paired"]  # 3 folds: a spread to judge


def _nbval(notebooks: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(cwd), "--nbval-lax",
         "--nbval-current-env", "--nbval-sanitize-with", str(REPO / "tests" / "nbval_sanitize.cfg"),
         *map(str, notebooks)],
        cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_checked_cells_are_deterministic_under_nbval(executed):
    """The committed notebooks have no outputs, so `make test`'s nbval pass can only check that they run.
    Here nbval re-runs every executed copy and compares each cell tagged 'nbval-check-output' with the first run's
    output (sanitized by tests/nbval_sanitize.cfg); 04's second run resumes its finished folds."""
    out, paths = executed
    result = _nbval(paths, out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.mark.slow
def test_nbval_fails_when_a_checked_output_changes(executed, tmp_path):
    out, _ = executed
    nb = nbformat.read(out / "01_explore_data.ipynb", as_version=4)
    checked_cells = [c for c in nb.cells if c.cell_type == "code" and checked(c) and c.outputs]
    first = checked_cells[0].outputs[0]
    if first.output_type == "stream":
        first.text = "a different result\n"
    else:
        first.data = {"text/plain": "a different result"}
    nbformat.write(nb, tmp_path / "01_tampered.ipynb")
    result = _nbval([tmp_path / "01_tampered.ipynb"], tmp_path)
    assert result.returncode != 0 and "a different result" in result.stdout


@pytest.mark.slow
def test_a_failing_notebook_is_reported_with_its_executed_copy(tmp_path, capsys):
    from ussf_lib.cli import main

    one_class = tmp_path / "one" / "a"  # exists, so only the notebook itself finds out that it cannot be used
    one_class.mkdir(parents=True)
    Image.new("L", (16, 16)).save(one_class / "x.png")
    out = tmp_path / "nb"
    assert main(["notebooks", "--out", str(out), "--only", "04", "--param", f"DATA={one_class.parent}"]) == 1
    err = capsys.readouterr().err
    assert "04_train_cross_validation.ipynb failed in cell" in err and "only one class" in err
    assert (out / "04_train_cross_validation.ipynb").is_file()  # the executed copy keeps the traceback
    record = json.loads((out / "notebooks.json").read_text())
    assert record[0]["status"].startswith("failed") and record[0]["parameters"]["DATA"] == str(one_class.parent)


@pytest.mark.slow
def test_a_notebook_run_prints_only_its_own_lines(tmp_path, capfd):
    from ussf_lib.cli import main

    assert main(["notebooks", "--out", str(tmp_path / "nb"), "--only", "03"]) == 0
    out, err = capfd.readouterr()  # file descriptors: the kernel is another process
    assert err == "" and out.splitlines()[-1] == f"1 notebook(s) executed into {tmp_path / 'nb'}", (out, err)


def test_values_a_notebook_would_refuse_are_refused_before_a_kernel_starts(tmp_path, capsys):
    from ussf_lib.cli import main

    for params, match in ((["MODEL=no_such_model"], "04_train_cross_validation: unknown model 'no_such_model'"),
                          (["FOLDS=1"], "04_train_cross_validation: FOLDS=1 must be at least 2"),
                          (["04:FOLDS=5", "04:N_PER_CLASS=16"], "04_train_cross_validation: the phantom's N_PER_CLASS=16 "
                                           "images per class make 2 patient(s), fewer than FOLDS=5; use N_PER_CLASS=41 or more"),
                          (["04:MODEL=vit_b_16", "IMAGE_SIZE=40"], "04_train_cross_validation: image_size=40 is not a "
                                                                   "multiple of 16")):
        argv = ["notebooks", "--out", str(tmp_path / "nb"), "--only", "04"]
        assert main([*argv, *(a for p in params for a in ("--param", p))]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ussf notebooks: error: {match}") and "\n" not in err, err
    assert not (tmp_path / "nb").exists()

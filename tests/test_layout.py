"""The package's shape: imports run one way along the pipeline, and adding a setting is a one-place change."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import REPO

#: Each part of ussf_lib and its place in the pipeline; a module may import only from its own place or earlier.
LAYERS = {
    "errors": 0, "paper": 0, "settings": 0, "files": 0,
    "data": 1,
    "models": 2,
    "evaluation": 3,  # reads run folders, never a model
    "training": 4,    # writes run folders, then calls evaluation's report
    "analysis": 5, "predict": 5, "explain": 5,
    "bench": 6, "export": 6,
    "nbrun": 7,
    "cli": 8, "__main__": 8,
}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports() -> dict[str, set[str]]:
    """Every ussf_lib module and the ussf_lib modules it imports (at the top or inside functions)."""
    graph = {}
    for path in (REPO / "ussf_lib").rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ussf_lib"):
                found |= {f"{node.module}.{a.name}" if node.module == "ussf_lib" else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ussf_lib")}
        graph[name] = found
    return graph


def test_imports_never_run_back_up_the_pipeline():
    graph = _imports()
    upward = [f"{m} imports {dep}" for m, deps in graph.items() if m != "ussf_lib"
              for dep in deps if LAYERS.get(_part(dep), 0) > LAYERS[_part(m)]]
    assert not upward, upward
    assert {_part(m) for m in graph} - {"__init__"} <= set(LAYERS), "a new part of ussf_lib needs a place in LAYERS"


def test_import_graph_has_no_cycles():
    graph = _imports()
    modules = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in modules[m]:
            assert state.get(d) != 1, " -> ".join(path + [m, d])
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [])


def test_a_setting_declared_once_becomes_a_flag_a_notebook_check_and_a_config_key(monkeypatch, tmp_path):
    from ussf_lib import cli, settings
    from ussf_lib.errors import UserError
    from ussf_lib.nbrun.runner import check_values
    from ussf_lib.training import experiment

    new = settings.Setting("mixup_alpha", 0.0, "mixup's Beta(alpha, alpha); 0 turns it off", "training",
                           scope="train", minimum=0)
    monkeypatch.setattr(settings, "SETTINGS", [*settings.SETTINGS, new])
    monkeypatch.setattr(experiment, "CVConfig", settings.config_class("CVConfig", None, experiment._RunChecks, ""))
    from ussf_lib.training import loop
    monkeypatch.setattr(loop, "TrainConfig", settings.config_class("TrainConfig", "train", loop._TrainChecks, ""))
    monkeypatch.setattr(experiment, "TrainConfig", loop.TrainConfig)

    args = cli.build_parser().parse_args(["cv", "--data", "d", "--mixup-alpha", "0.4"])  # a flag of cv ...
    assert args.mixup_alpha == 0.4
    cfg = cli.cv_config_from_args(args, out=str(tmp_path / "run"), model="us_sfnet_tiny", image_size=32)
    assert json.loads(json.dumps(cfg.to_dict()))["mixup_alpha"] == 0.4  # ... a config.json key ...
    assert cfg.train_config().mixup_alpha == 0.4  # ... that training reads
    assert cli.build_parser().parse_args(["compare", "--mixup-alpha", "0.1"]).mixup_alpha == 0.1
    with pytest.raises(SystemExit):  # the range checked on the command line
        cli.build_parser().parse_args(["cv", "--data", "d", "--mixup-alpha", "-1"])
    with pytest.raises(UserError, match="04: MIXUP_ALPHA=-1.0 must be 0 or more"):  # and as a notebook parameter
        check_values({"MIXUP_ALPHA": -1.0}, "04")
    assert "mixup_alpha" not in settings.resume_free()


def test_every_setting_has_a_help_line_a_group_and_a_valid_default():
    from ussf_lib import settings

    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    for s in settings.SETTINGS:
        assert s.help and s.group and s.scope in ("run", "train")
        assert settings.problem(s, s.default) is None, s.name

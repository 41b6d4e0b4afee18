"""Setup files agree with each other: pyproject is the single source, environment.yml mirrors it."""

from __future__ import annotations

import tomllib

import pytest
import yaml

from conftest import REPO, require_shared


def _pyproject_deps() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]).union(*project["optional-dependencies"].values())


def _conda_pip_deps() -> set[str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    return set(pip_sections[0])


def test_environment_yml_mirrors_pyproject():
    assert _conda_pip_deps() == _pyproject_deps()


def test_torch_pins():
    deps = _pyproject_deps()
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_ci_runs_exactly_make_test():
    lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()
             if l.strip() and not l.strip().startswith("#")]
    assert lines[-1] == "make test"
    assert "make test" in (REPO / "README.md").read_text() and "make run" in (REPO / "README.md").read_text()


def test_outputs_are_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().split()
    assert "runs/" in ignored and ".venv/" in ignored


def test_jupyterlab_is_in_the_environment_the_readme_opens():
    """README: `.venv/bin/jupyter lab` opens the notebooks, with the widgets of INTERACTIVE = True."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("jupyterlab") and importlib.util.find_spec("ipywidgets")
    version = subprocess.run([sys.executable, "-m", "jupyterlab", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.strip()[0].isdigit(), version.stderr


@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("1", "fail"), ("TRUE", "fail"), ("", "skip"),
                                         ("false", "skip"), ("0", "skip")])
def test_missing_shared_material_skips_for_users_and_fails_on_ci(tmp_path, monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="not beside this clone"):
        require_shared(tmp_path / "absent")
    assert require_shared(tmp_path) == tmp_path

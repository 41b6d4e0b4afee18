"""--engine ray (ussf_lib.training.ray_engine) on one local Ray instance: a sweep and a comparison give what the local
engine gives for the same seeds, a GPU id listed twice puts two runs on one GPU at once, a UserError in one run
leaves the others. Skipped where Ray (the `cluster` extra) is not installed."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from ussf_lib.errors import UserError  # noqa: E402
from ussf_lib.nbrun.sweep import run_sweep  # noqa: E402
from ussf_lib.training.compare import compare  # noqa: E402
from ussf_lib.training.experiment import CVConfig  # noqa: E402
from ussf_lib.training.placement import PLACED_ENV, worker_log  # noqa: E402
from ussf_lib.training.ray_engine import run_on_ray  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_train_cross_validation.ipynb"
SWEEP_FIXED = {"MODEL": "us_sfnet_tiny", "N_PER_CLASS": 16, "IMAGE_SIZE": 16, "EPOCHS": 1, "FOLDS": 2, "BATCH_SIZE": 32}
MODELS = ["us_sfnet_tiny", "us_sfnet_tiny_nofft"]  # the two cheapest registered models


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """One Ray instance for the module (starting one takes seconds): 2 CPUs and one logical GPU, which only the
    tasks that read their environment ask for."""
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test file
    yield
    ray.cloudpickle.unregister_pickle_by_value(module)
    ray.shutdown()


@pytest.fixture
def two_cpu_slots(monkeypatch):
    """cpu,cpu gives each run one thread (cores / slots) whatever the machine: both engines, the same numbers."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


def _meet(tag: str, folder: str) -> dict:
    """A trivial run: it waits (up to a minute) until two runs have started, and says what it saw."""
    worker_log(f"[{tag}] ")("hello")
    Path(folder, tag).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    if tag == "bad":
        raise UserError("bad input, fix it")
    if tag == "bug":
        raise ValueError("a bug, not a user error")
    return {"met": len(os.listdir(folder)), "placed": os.environ.get(PLACED_ENV),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_a_gpu_listed_twice_runs_two_at_once_and_a_user_error_leaves_the_others(tmp_path):
    lines: list[str] = []
    finished: list[str] = []
    tasks = [(tag, _meet, (tag, str(tmp_path))) for tag in ("a", "bad", "b")]
    results = run_on_ray(tasks, ["0", "0"], log=lines.append, on_done=lambda r: finished.append(r.key))
    assert [r.key for r in results] == ["a", "bad", "b"] and sorted(finished) == ["a", "b", "bad"]
    assert results[1].error == "bad input, fix it" and results[1].value is None
    first = results[0].value  # half a GPU each: the first two ran at once on GPU 0, which Ray gave them
    assert first["met"] >= 2 and (first["placed"], first["cuda"], results[0].device) == ("0", "0", "0")
    assert results[2].ok and sorted(lines) == ["[a] hello", "[b] hello", "[bad] hello"]  # the lines reach log


def test_an_unexpected_exception_is_raised(tmp_path, two_cpu_slots):
    with pytest.raises(ValueError, match="a bug, not a user error"):
        run_on_ray([("bug", _meet, ("bug", str(tmp_path))), ("a", _meet, ("a", str(tmp_path)))], ["cpu", "cpu"],
                   log=lambda _: None)


@pytest.mark.slow
def test_sweep_on_ray_matches_the_local_engine(tmp_path, two_cpu_slots):
    grid = {"SEED": [0, 1], "fixed": SWEEP_FIXED}
    local = run_sweep(NOTEBOOK, grid, tmp_path / "local", devices="cpu,cpu", log=lambda _: None)
    lines: list[str] = []
    on_ray = run_sweep(NOTEBOOK, grid, tmp_path / "ray", devices="cpu,cpu", engine="ray", log=lines.append)
    assert local.failed == on_ray.failed == {} and sorted(on_ray.ran) == ["SEED=0", "SEED=1"]
    assert "2 to run on --devices cpu,cpu as Ray tasks" in lines[0]
    ours, theirs = (pd.read_csv(tmp_path / d / "results.csv").drop(columns="seconds") for d in ("ray", "local"))
    pd.testing.assert_frame_equal(ours, theirs, rtol=0, atol=1e-6)
    assert (tmp_path / "ray" / "summary.md").read_text() == (tmp_path / "local" / "summary.md").read_text()
    for name in ("SEED=0", "SEED=1"):
        assert json.loads((tmp_path / "ray" / name / "sweep.json").read_text())["device"] == "cpu"
        env = json.loads((tmp_path / "ray" / name / "run" / "environment.json").read_text())
        assert (env["placed_device"], env["visible_devices"], env["device"]) == ("cpu", "", "cpu")

    again = run_sweep(NOTEBOOK, grid, tmp_path / "ray", devices="cpu,cpu", engine="ray", log=lambda _: None)
    assert again.ran == [] and sorted(again.skipped) == ["SEED=0", "SEED=1"]  # finished runs are skipped


@pytest.mark.slow
def test_compare_on_ray_matches_the_local_engine(phantom_dir, tmp_path, two_cpu_slots):
    cfg = CVConfig(manifest=str(phantom_dir / "manifest.csv"), group_col="patient", folds=2, epochs=1, image_size=32,
                   batch_size=16, seed=0, progress=False)
    compare(MODELS, cfg, tmp_path / "local", log=lambda _: None, devices="cpu,cpu")
    lines: list[str] = []
    compare(MODELS, cfg, tmp_path / "ray", log=lines.append, devices="cpu,cpu", engine="ray")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert pd.read_csv(on_ray / "splits.csv").equals(pd.read_csv(local / "splits.csv"))
    for m in MODELS:
        assert any(line.startswith(f"[{m}] fold 1: test accuracy") for line in lines)
        assert f"[{m}] finished on device cpu" in lines
        assert json.loads((on_ray / m / "environment.json").read_text())["placed_device"] == "cpu"
        for k in (0, 1):
            ours, theirs = (pd.read_csv(d / m / "folds" / str(k) / "predictions.csv") for d in (on_ray, local))
            pd.testing.assert_frame_equal(ours, theirs, rtol=0, atol=1e-6)
    for table in ("table1.csv", "table2.csv", "paired.csv"):
        ours, theirs = (pd.read_csv(d / table) for d in (on_ray, local))
        pd.testing.assert_frame_equal(ours.drop(columns="train_seconds", errors="ignore"),
                                      theirs.drop(columns="train_seconds", errors="ignore"), rtol=0, atol=1e-6)

    lines.clear()  # a rerun on Ray skips the finished models
    compare(MODELS, cfg, on_ray, log=lines.append, devices="cpu,cpu", engine="ray")
    assert sum("already finished, skipped" in line for line in lines) == 2

"""Data-parallel cross-validation: torchrun with 2 CPU processes (gloo), and the sharding it relies on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ussf_lib.training.distributed import DistContext, all_reduce_sum, epoch_order, gather_rows, shard

REPO = Path(__file__).resolve().parents[1]


def test_epoch_orders_of_the_ranks_cover_the_training_set_with_equal_shares():
    train_idx = np.arange(100, 123)  # 23 images: not divisible by 2, so one is repeated for equal shares
    shares = [epoch_order(train_idx, DistContext(rank=r, world=2), seed=5, epoch=0) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 12
    assert set(np.concatenate(shares)) == set(train_idx)
    assert not set(shares[0]) & set(shares[1][:-1])  # disjoint except the padding repeat
    again = epoch_order(train_idx, DistContext(rank=0, world=2), seed=5, epoch=0)
    other_epoch = epoch_order(train_idx, DistContext(rank=0, world=2), seed=5, epoch=1)
    np.testing.assert_array_equal(shares[0], again)
    assert not np.array_equal(shares[0], other_epoch)


def test_single_process_helpers_are_identities():
    ctx = DistContext()
    rows = np.arange(12.0).reshape(6, 2)
    assert not ctx.enabled and ctx.is_main
    np.testing.assert_array_equal(shard(np.arange(5), ctx), np.arange(5))
    np.testing.assert_array_equal(gather_rows(rows, ctx), rows)
    assert all_reduce_sum([1.0, 2.0], ctx) == [1.0, 2.0]
    # the strided shares reassemble in the original order
    world = DistContext(rank=0, world=3)
    parts = [shard(rows, DistContext(rank=r, world=3)) for r in range(3)]
    out = np.empty_like(rows)
    for r, part in enumerate(parts):
        out[r::world.world] = part
    np.testing.assert_array_equal(out, rows)


def test_only_a_torchrun_launch_turns_the_distributed_path_on(monkeypatch):
    from ussf_lib.training.distributed import context_from_env

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")  # left over in a shell, no torchrun: stay single-process
    assert context_from_env() == DistContext()
    assert DistContext(world=1, launched=True).enabled  # torchrun --nproc_per_node 1 still goes through DDP


def _torchrun(nproc: int, data: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "ussf_lib", "cv", "--data", str(data), "--model", "us_sfnet_tiny", "--folds", "2",
           "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--no-progress", "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_one_process_runs_the_distributed_path(phantom_dir, tmp_path):
    out = tmp_path / "ddp1"
    proc = _torchrun(1, phantom_dir, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data-parallel over 1 process (gloo)" in proc.stdout
    assert json.loads((out / "environment.json").read_text())["world_size"] == 1
    for k in range(2):
        state = torch.load(out / "folds" / str(k) / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert not any(key.startswith("module.") for key in state["model"])  # saved unwrapped from DDP
    assert (out / "summary.json").exists()


def test_torchrun_two_cpu_processes_write_one_complete_run_folder(phantom_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun(2, phantom_dir, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # only rank 0 logs and writes
    assert proc.stdout.count("results in") == 1, proc.stdout
    assert "data-parallel over 2 processes (gloo)" in proc.stdout
    assert json.loads((out / "environment.json").read_text())["world_size"] == 2
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"
    splits = pd.read_csv(out / "splits.csv")
    for k in range(2):
        pred = pd.read_csv(out / "folds" / str(k) / "predictions.csv")
        expected = set(splits.loc[splits["fold"] == k, "path"])
        assert len(pred) == len(expected) and set(pred["path"]) == expected  # each test image once, gathered
        probs = pred.filter(like="prob_").to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        history = pd.read_csv(out / "folds" / str(k) / "history.csv")
        assert list(history["epoch"]) == [1, 2] and history["train_loss"].notna().all()
        state = torch.load(out / "folds" / str(k) / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert state["epoch"] == 2 and not any(key.startswith("module.") for key in state["model"])
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"]["mean"] <= 1.0
    # Rank 1's half of the test images was scored with the same weights: the checkpoint rank 0 saved
    # reproduces every gathered probability.
    from ussf_lib.predict import predict_images

    pred = pd.read_csv(out / "folds" / "0" / "predictions.csv")
    again = predict_images(out / "folds" / "0" / "checkpoint.pt", [phantom_dir / p for p in pred["path"]], device="cpu")
    np.testing.assert_allclose(again.filter(like="prob_").to_numpy(), pred.filter(like="prob_").to_numpy(), atol=1e-4)

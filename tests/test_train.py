"""ussf_lib.training.loop: one fold learns, checkpoints, resumes exactly, and stops on a non-finite loss."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from ussf_lib.errors import UserError
from ussf_lib.training.loop import NonFiniteLossError, TrainConfig, batch_bounds, evaluate, train_fold
from ussf_lib.training.runtime import DeviceImages, process_batch_size, seed_everything, select_device

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _toy(n: int = 64, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 images are bright, class 0 dark: separable, so a working loop must learn it."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 100, (n, size, size, 3)) + 120 * y[:, None, None, None]
    return x.astype(np.uint8), y


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_fold_learns_a_separable_problem_and_writes_checkpoint(tmp_path):
    x, y = _toy()
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.05, progress=False)
    res = train_fold(_net(), x, y, np.arange(48), np.arange(48, 64), cfg, MEAN, STD, torch.device("cpu"),
                     fold_dir=tmp_path, log=lambda _: None)
    assert list(res.history.columns[:5]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert res.history["epoch"].tolist() == list(range(1, 7))
    assert res.history["train_loss"].iloc[-1] < res.history["train_loss"].iloc[0]
    assert res.probs.shape == (16, 2) and np.allclose(res.probs.sum(1), 1)
    assert (res.probs.argmax(1) == y[48:]).mean() == 1.0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 6 and state["fold"] == 0


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    x, y = _toy()
    run = lambda epochs, d: train_fold(_net(), x, y, np.arange(48), np.arange(48, 64),
                                       TrainConfig(epochs=epochs, batch_size=16, lr=0.01, progress=False),
                                       MEAN, STD, torch.device("cpu"), fold_dir=d, log=lambda _: None)
    full = run(4, tmp_path / "full")
    run(2, tmp_path / "cut")  # "interrupted" after epoch 2
    stale = tmp_path / "cut" / ".checkpoint.pt.tmp12345"  # left by a process killed while saving
    stale.write_bytes(b"half a checkpoint")
    resumed = run(4, tmp_path / "cut")
    assert not stale.exists()
    timing = ["seconds", "train_seconds"]
    pd.testing.assert_frame_equal(full.history.drop(columns=timing), resumed.history.drop(columns=timing))
    np.testing.assert_array_equal(full.probs, resumed.probs)


def test_resume_restores_the_random_state_from_a_checkpoint_read_on_the_host(tmp_path, monkeypatch):
    """Dropout draws from torch's generator: only its restored state makes the resumed epochs equal; and the
    checkpoint is read onto the CPU (a GPU-mapped generator state cannot be set)."""
    x, y = _toy()

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 2))

    run = lambda epochs, d: train_fold(net(), x, y, np.arange(48), np.arange(48, 64),
                                       TrainConfig(epochs=epochs, batch_size=16, lr=0.01, progress=False),
                                       MEAN, STD, torch.device("cpu"), fold_dir=d, log=lambda _: None)
    full = run(3, tmp_path / "full")
    run(1, tmp_path / "cut")
    locations: list[object] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (locations.append(k.get("map_location")), real_load(*a, **k))[1])
    resumed = run(3, tmp_path / "cut")
    assert locations == ["cpu"]
    pd.testing.assert_frame_equal(full.history[["train_loss", "val_loss"]], resumed.history[["train_loss", "val_loss"]])
    np.testing.assert_array_equal(full.probs, resumed.probs)


@pytest.mark.parametrize("n, batch, expected", [
    (16, 8, [(0, 8), (8, 16)]),
    (17, 8, [(0, 8), (8, 17)]),  # a lone last image joins the batch before it
    (18, 8, [(0, 8), (8, 16), (16, 18)]),
    (1, 8, [(0, 1)]),
    (9, 8, [(0, 9)]),
])
def test_batch_bounds_cover_every_image_without_a_lone_last_one(n, batch, expected):
    assert batch_bounds(n, batch) == expected


def test_training_set_leaving_one_image_over_trains_through_batchnorm_on_a_1x1_map():
    """A lone image in training mode gives BatchNorm one value per channel on a 1x1 map, which it refuses."""
    x, y = _toy(n=21)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(),
                        nn.Linear(4, 2))
    res = train_fold(net, x, y, np.arange(17), np.arange(17, 21), TrainConfig(epochs=1, batch_size=8, progress=False),
                     MEAN, STD, torch.device("cpu"), log=lambda _: None)
    assert np.isfinite(res.history["train_loss"]).all() and res.probs.shape == (4, 2)


def test_a_global_batch_split_over_processes_says_when_it_grows():
    assert process_batch_size(64, 1) == (64, None)
    assert process_batch_size(64, 4) == (16, None)
    local, note = process_batch_size(64, 3)
    assert local == 22 and note == ("--batch-size 64 over 3 processes: each takes 22 images a step, so a global "
                                    "batch holds 66; use a multiple of 3 for exactly 64")


def test_a_batch_of_one_on_a_1x1_map_is_a_clear_error():
    x, y = _toy(n=12)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4), nn.Flatten(),
                        nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"--batch-size 1: a batch of 1 image\(s\) leaves BatchNorm one value"):
        train_fold(net, x, y, np.arange(8), np.arange(8, 12), TrainConfig(epochs=1, batch_size=1, progress=False),
                   MEAN, STD, torch.device("cpu"), log=lambda _: None)


def test_seed_everything_sets_the_deterministic_mode_both_ways(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seed_everything(1, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert torch.backends.cudnn.benchmark is False
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        seed_everything(1, deterministic=False)  # a later run in the same process is not left deterministic
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        seed_everything(0, deterministic=False)


def test_eval_every_and_checkpoint_every_skip_work_without_changing_training(tmp_path, monkeypatch):
    import ussf_lib.training.checkpoints as checkpoints_mod

    x, y = _toy()
    saved_epochs: list[int] = []
    real_save = checkpoints_mod.atomic_save
    monkeypatch.setattr(checkpoints_mod, "atomic_save", lambda obj, path: (saved_epochs.append(obj["epoch"]),
                                                                      real_save(obj, path)))
    run = lambda d, **every: train_fold(_net(), x, y, np.arange(48), np.arange(48, 64),
                                        TrainConfig(epochs=5, batch_size=16, lr=0.01, progress=False, **every),
                                        MEAN, STD, torch.device("cpu"), fold_dir=d, log=lambda _: None)
    every_epoch = run(tmp_path / "every")
    assert saved_epochs == [1, 2, 3, 4, 5]
    saved_epochs.clear()
    sparse = run(tmp_path / "sparse", eval_every=3, checkpoint_every=2)
    assert saved_epochs == [2, 4, 5]  # the last epoch is always saved
    evaluated = sparse.history.dropna(subset=["val_loss", "val_acc"])["epoch"].tolist()
    assert evaluated == [3, 5]  # ... and always evaluated
    pd.testing.assert_frame_equal(every_epoch.history[["epoch", "train_loss", "train_acc"]],
                                  sparse.history[["epoch", "train_loss", "train_acc"]])
    pd.testing.assert_frame_equal(every_epoch.history.loc[[2, 4], ["val_loss", "val_acc"]],
                                  sparse.history.loc[[2, 4], ["val_loss", "val_acc"]])
    np.testing.assert_array_equal(every_epoch.probs, sparse.probs)
    with pytest.raises(UserError, match="--eval-every 0"):
        TrainConfig(eval_every=0)
    with pytest.raises(UserError, match="--checkpoint-every 0"):
        TrainConfig(checkpoint_every=0)


def test_non_finite_loss_names_epoch_and_batch(tmp_path):
    x, y = _toy()
    net = _net()
    with torch.no_grad():
        net[-1].bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 1"):
        train_fold(net, x, y, np.arange(48), np.arange(48, 64), TrainConfig(epochs=1, batch_size=16, progress=False),
                   MEAN, STD, torch.device("cpu"), fold_dir=tmp_path, log=lambda _: None)
    assert (tmp_path / "debug_nonfinite.pt").is_file()


def test_config_validation_messages():
    with pytest.raises(UserError, match="--epochs 0"):
        TrainConfig(epochs=0)
    with pytest.raises(UserError, match=r"--weight-decay -1: must be 0 or more"):
        TrainConfig(weight_decay=-1)
    with pytest.raises(UserError, match=r"--lr nan"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(UserError, match=r"betas \(0.9, 1.0\)"):
        TrainConfig(betas=(0.9, 1.0))
    with pytest.raises(UserError, match="--amp fp8"):
        TrainConfig(amp="fp8")


def test_bf16_autocast_and_channels_last_run_on_cpu():
    x, y = _toy(32)
    cfg = TrainConfig(epochs=1, batch_size=16, amp="bf16", channels_last=True, progress=False)
    net = _net()
    seen = []  # what the first convolution receives and returns, in training and in evaluation
    net[0].register_forward_hook(lambda mod, inp, out: seen.append(
        (inp[0].is_contiguous(memory_format=torch.channels_last), out.dtype, mod.weight.dtype)))
    res = train_fold(net, x, y, np.arange(16), np.arange(16, 32), cfg, MEAN, STD, torch.device("cpu"),
                     log=lambda _: None)
    assert np.isfinite(res.history["train_loss"]).all() and res.probs.dtype == np.float64
    # Inputs in channels-last, convolutions computed in bfloat16 by autocast, weights kept in float32.
    assert seen and set(seen) == {(True, torch.bfloat16, torch.float32)}


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            select_device("cuda")
    for name, match in [("gpu7", "not a device name"), ("foo", "not a device name"), ("xpu", "ussf runs on cpu, cuda or mps")]:
        with pytest.raises(UserError, match=rf"--device {name}: {match}"):
            select_device(name)
    if not torch.backends.mps.is_available():
        with pytest.raises(UserError, match="MPS is not available"):
            select_device("mps")


def test_evaluate_probabilities_follow_index_order():
    x, y = _toy(10)
    net = _net().eval()
    _, p_all = evaluate(net, DeviceImages(x, torch.device("cpu")), y, np.arange(10), 4, MEAN, STD)
    _, p_rev = evaluate(net, DeviceImages(x, torch.device("cpu")), y, np.arange(10)[::-1].copy(), 3, MEAN, STD)
    np.testing.assert_allclose(p_all[::-1], p_rev, atol=1e-6)


def test_compiled_model_matches_eager_on_the_same_batch():
    from ussf_lib.models import build_model

    torch.manual_seed(0)
    model = build_model("us_sfnet_tiny", 4, image_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        # aot_eager traces the whole model through dynamo and AOTAutograd without generating kernels,
        # which is what breaks when forward is not compilable; inductor codegen is exercised on GPU runs.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_train_fold_with_compile_and_flag_notes():
    x, y = _toy(32)
    logs: list[str] = []
    cfg = TrainConfig(epochs=1, batch_size=16, compile=True, compile_backend="aot_eager", amp="fp16",
                      progress=False)
    res = train_fold(_net(), x, y, np.arange(16), np.arange(16, 32), cfg, MEAN, STD, torch.device("cpu"),
                     log=logs.append)
    assert np.isfinite(res.history["train_loss"]).all()
    assert any("fp16 runs as bf16 on CPU" in line for line in logs)


@pytest.mark.parametrize(("scope", "graphs"), [("model", 2), ("blocks", 2)])
def test_whole_model_compile_needs_no_new_graph_for_the_last_smaller_batch(scope, graphs):
    """50 training images in batches of 32 end with a batch of 18, and evaluation has its own size; a whole-model
    compile marks the batch dynamic, so one training and one evaluation graph serve every size (unmarked, the
    batch of 18 compiles a third graph). The toy net has no repeated blocks, so "blocks" falls back to the
    whole model, which the loop also detects. (Batches stay >= 16: CPU convolution adds a guard there.)"""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x, y = _toy(70)
    logs: list[str] = []
    cfg = TrainConfig(epochs=2, batch_size=32, compile=True, compile_backend="aot_eager", compile_scope=scope,
                      progress=False)
    res = train_fold(_net(), x, y, np.arange(50), np.arange(50, 70), cfg, MEAN, STD, torch.device("cpu"),
                     log=logs.append)
    assert len(res.history) == 2 and any("whole model" in line for line in logs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_optimizer_is_fused_adam_on_cuda_only():
    from ussf_lib.training.loop import make_optimizer

    model = torch.nn.Linear(3, 2)
    cpu = make_optimizer(model, 1e-3, (0.9, 0.999), 1e-4, torch.device("cpu"))
    cuda = make_optimizer(model, 1e-3, (0.9, 0.999), 1e-4, torch.device("cuda"))  # CPU params: only the choice is checked
    assert isinstance(cpu, torch.optim.Adam) and not cpu.param_groups[0]["fused"]
    assert cuda.param_groups[0]["fused"] is True
    assert cuda.param_groups[0]["weight_decay"] == 1e-4 and cuda.param_groups[0]["betas"] == (0.9, 0.999)

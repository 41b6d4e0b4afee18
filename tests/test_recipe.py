"""The opt-in training recipe: augmentation, schedules, imbalance, label smoothing (ussf_lib.training.recipe)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ussf_lib.models import build_model
from ussf_lib.training import recipe
from ussf_lib.training.loop import TrainConfig, train_fold

MEAN, STD = [0.5] * 3, [0.25] * 3


def _data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (36, 16, 16, 3), dtype=np.uint8)
    y = np.array([0] * 20 + [1] * 10 + [2] * 6)
    return x, y


def _fold(tmp=None, log=lambda _: None, **settings):
    x, y = _data()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=settings.pop("epochs", 2), batch_size=8, progress=False, **settings)
    return train_fold(build_model("us_sfnet_tiny", 3, image_size=16), x, y, np.arange(28), np.arange(28, 36), cfg,
                      MEAN, STD, torch.device("cpu"), fold_dir=tmp, log=log)


RECIPES = [{"augment": "light"}, {"augment": "ultrasound"}, {"lr_schedule": "cosine", "warmup_epochs": 1},
           {"imbalance": "weighted_ce"}, {"imbalance": "balanced_sampler"},
           {"imbalance": "focal", "label_smoothing": 0.1}]


@pytest.mark.parametrize("settings", RECIPES, ids=lambda s: "-".join(map(str, s.values())))
def test_each_option_is_deterministic_for_a_seed_and_changes_training(settings, one_thread):
    first, again, paper = _fold(**settings), _fold(**settings), _fold()
    np.testing.assert_array_equal(first.probs, again.probs)
    assert not np.array_equal(first.history["train_loss"], paper.history["train_loss"])


def test_resume_is_exact_with_augmentation_a_schedule_and_a_sampler(tmp_path, one_thread):
    settings = {"augment": "ultrasound", "lr_schedule": "cosine", "warmup_epochs": 1,
                "imbalance": "balanced_sampler", "epochs": 4}
    full = _fold(tmp_path / "full", **dict(settings))

    def stop_in_epoch_3(line):
        if "epoch 3/4" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fold(tmp_path / "cut", log=stop_in_epoch_3, **dict(settings))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert "scheduler" in torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    resumed = _fold(tmp_path / "cut", **dict(settings))
    timing = ["seconds", "train_seconds"]
    pd.testing.assert_frame_equal(full.history.drop(columns=timing), resumed.history.drop(columns=timing))
    np.testing.assert_array_equal(full.probs, resumed.probs)


def test_warmup_then_cosine_learning_rates():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = recipe.make_scheduler(opt, "cosine", 2, 6)
    rates = []
    for _ in range(6):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert rates[3:] == pytest.approx([0.5 * (1 + np.cos(np.pi * k / 4)) for k in (1, 2, 3)])
    assert recipe.make_scheduler(opt, "constant", 0, 6) is None


def test_class_weights_come_from_the_training_fold_alone():
    lines = []
    _fold(log=lines.append, imbalance="weighted_ce")
    train_labels = _data()[1][:28]  # 20, 8, 0 images of the three classes: the fold's, not the data's 20, 10, 6
    expected = recipe.class_weights(train_labels, 3)
    assert expected == pytest.approx([28 / (2 * 20), 28 / (2 * 8), 0.0])
    (line,) = [l for l in lines if "class weights" in l]
    assert line.endswith(", ".join(f"{w:.3f}" for w in expected))


def test_focal_loss_formula_and_gamma_zero_is_cross_entropy():
    logits, y = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]]), torch.tensor([0, 2])
    ce = torch.nn.functional.cross_entropy(logits, y)
    focal0 = recipe.make_loss("focal", np.array([0, 1, 2]), 3, 0.0, 0.0, torch.device("cpu"))
    assert float(focal0(logits, y)) == pytest.approx(float(ce))
    p = torch.softmax(logits, 1)[[0, 1], [0, 2]]
    manual = (-(1 - p) ** 2 * torch.log(p)).mean()
    focal2 = recipe.make_loss("focal", np.array([0, 1, 2]), 3, 0.0, 2.0, torch.device("cpu"))
    assert float(focal2(logits, y)) == pytest.approx(float(manual))


def test_balanced_sampler_draws_each_class_equally_often():
    train_idx = np.arange(1000)
    targets = np.array([0] * 900 + [1] * 90 + [2] * 10)
    order = recipe.balanced_order(train_idx, targets, torch.Generator().manual_seed(0))
    shares = np.bincount(targets[order], minlength=3) / len(order)
    assert len(order) == 1000 and shares == pytest.approx([1 / 3] * 3, abs=0.05)


@pytest.mark.parametrize("name", ["light", "ultrasound"])
def test_augmentation_keeps_shape_is_seeded_and_leaves_the_global_random_state_alone(name):
    batch = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    aug = recipe.make_augment(name, 32)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    before = torch.get_rng_state()
    a = recipe.augment_batch(aug, batch, mean, std, False, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = recipe.augment_batch(aug, batch, mean, std, False, seed=1)
    c = recipe.augment_batch(aug, batch, mean, std, False, seed=2)
    plain = (batch.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    assert float(a.min()) >= -2.0 - 1e-6 and float(a.max()) <= 2.0 + 1e-6  # [0, 1] before standardizing


def test_ultrasound_augmentation_never_flips_depth():
    """A bright top row (near the probe) stays at the top under every draw: no vertical flip, only mild crops
    and rotations."""
    batch = torch.zeros((16, 32, 32, 3), dtype=torch.uint8)
    batch[:, :10] = 255  # more than a crop of scale 0.8 can cut off
    aug = recipe.make_augment("ultrasound", 32)
    for seed in range(5):
        x = recipe.augment_batch(aug, batch, torch.zeros(3), torch.ones(3), False, seed=seed)
        rows = x.mean(dim=(1, 3))
        assert bool((rows[:, :6].mean(1) > rows[:, -6:].mean(1)).all())


def test_speckle_is_multiplicative_with_mean_one():
    torch.manual_seed(0)
    x = torch.full((4, 3, 64, 64), 0.5)
    out = recipe.Speckle(p=1.0)(x)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.01) and float(out.std()) > 0.05
    assert torch.equal(out[:, 0], out[:, 1])  # one noise field for the grey image's three channels
    assert torch.equal(recipe.Speckle(p=1.0)(torch.zeros(2, 3, 8, 8)), torch.zeros(2, 3, 8, 8))


def test_recipe_flags_reach_config_json(tmp_path, phantom_dir, capsys):
    from ussf_lib.cli import main

    out = tmp_path / "run"
    code = main(["cv", "--manifest", str(phantom_dir / "manifest.csv"), "--group-col", "patient",
                 "--model", "us_sfnet_tiny", "--epochs", "1", "--folds", "2", "--image-size", "32",
                 "--batch-size", "16", "--out", str(out), "--no-progress", "--augment", "light",
                 "--lr-schedule", "cosine", "--warmup-epochs", "1", "--imbalance", "focal", "--focal-gamma", "1.5",
                 "--label-smoothing", "0.05"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert (config["augment"], config["lr_schedule"], config["warmup_epochs"], config["imbalance"],
            config["focal_gamma"], config["label_smoothing"]) == ("light", "cosine", 1, "focal", 1.5, 0.05)
    assert "recipe: augment light, lr cosine after 1 warm-up epoch(s), imbalance focal (gamma 1.5), " \
           "label smoothing 0.05" in capsys.readouterr().out
    assert main(["cv", "--resume", str(out), "--augment", "none"]) == 2
    assert "--augment none (the run has light)" in capsys.readouterr().err


def test_notebook_04_takes_the_recipe_as_parameters_checked_as_the_settings():
    from ussf_lib.errors import UserError
    from ussf_lib.nbrun.helpers import notebooks_dir
    from ussf_lib.nbrun.runner import check_parameters, check_values, declared_parameters

    nb = notebooks_dir() / "04_train_cross_validation.ipynb"
    declared = declared_parameters(nb)
    assert {k: declared[k] for k in ("AUGMENT", "LR_SCHEDULE", "WARMUP_EPOCHS", "IMBALANCE")} == {
        "AUGMENT": "none", "LR_SCHEDULE": "constant", "WARMUP_EPOCHS": 0, "IMBALANCE": "none"}
    given = check_parameters(nb, {"AUGMENT": "ultrasound", "LR_SCHEDULE": "cosine", "WARMUP_EPOCHS": 2,
                                  "IMBALANCE": "balanced_sampler"})
    check_values({**declared, **given}, "04")  # what a sweep grid point or --param goes through
    with pytest.raises(UserError, match="04: IMBALANCE='oversample' must be one of none, weighted_ce"):
        check_values({**declared, "IMBALANCE": "oversample"}, "04")

"""ussf_lib.training.checkpoints: snapshots are taken at save time, written whole, in the background, errors surface."""

from __future__ import annotations

import re
import threading

import pytest
import torch

import ussf_lib.training.checkpoints as checkpoints
from ussf_lib.training.checkpoints import CheckpointWriter, atomic_save, host_snapshot
from ussf_lib.errors import UserError


def _state() -> dict:
    return {"model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1, "loss": 0.5}], "pair": (torch.ones(2), "x"),
            "epoch": 1}


def test_host_snapshot_is_unchanged_when_training_goes_on():
    state = _state()
    snap = host_snapshot(state)
    state["model"]["w"].add_(10)  # the optimizer's in-place update
    state["history"].append({"epoch": 2, "loss": 0.4})
    state["history"][0]["loss"] = 99.0
    assert snap["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert snap["history"] == [{"epoch": 1, "loss": 0.5}]
    assert isinstance(snap["pair"], tuple) and snap["pair"][1] == "x" and snap["epoch"] == 1
    assert snap["model"]["w"].device.type == "cpu"


def test_background_write_lets_the_caller_go_on_and_writes_the_state_of_save_time(tmp_path, monkeypatch):
    release, started = threading.Event(), threading.Event()

    def slow_save(obj, path):
        started.set()
        assert release.wait(timeout=30)
        atomic_save(obj, path)

    monkeypatch.setattr(checkpoints, "atomic_save", slow_save)
    state = _state()
    path = tmp_path / "checkpoint.pt"
    with CheckpointWriter(background=True) as writer:
        writer.save(state, path)
        assert started.wait(timeout=30)
        assert not path.exists()  # save() returned while the file is still being written
        state["model"]["w"].add_(10)
        release.set()
        writer.wait()
        assert path.is_file()
    loaded = torch.load(path, weights_only=True)
    assert loaded["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0] and loaded["history"] == [{"epoch": 1, "loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_writes_are_in_order_and_the_last_one_wins(tmp_path):
    path = tmp_path / "checkpoint.pt"
    written = []  # the epochs in the order the thread wrote them
    real_save = checkpoints.torch.save

    def recording_save(obj, f):
        written.append(obj["epoch"])
        real_save(obj, f)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints.torch, "save", recording_save)
        with CheckpointWriter(background=True) as writer:
            for epoch in range(1, 6):
                writer.save({"epoch": epoch, "w": torch.full((1000,), float(epoch))}, path)
    assert written == [1, 2, 3, 4, 5]
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 5 and loaded["w"].eq(5.0).all()


def test_a_failed_write_is_one_clear_error_at_the_next_save_or_wait(tmp_path, monkeypatch):
    def full_disk(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    path = tmp_path / "checkpoint.pt"
    expected = re.escape(str(path)) + r": could not write \(No space left on device\); free space on that disk"
    writer = CheckpointWriter(background=True)
    writer.save(_state(), path)  # returns: the error happens in the thread
    with pytest.raises(UserError, match=expected):
        writer.save(_state(), path)  # refused: the write before it failed
    writer.save(_state(), path)
    with pytest.raises(UserError, match=expected):
        writer.close()  # the end of a fold waits for its last write
    assert list(tmp_path.iterdir()) == []  # the half-written temporary file is removed


def test_foreground_writer_writes_before_returning(tmp_path):
    path = tmp_path / "checkpoint.pt"
    writer = CheckpointWriter(background=False)
    writer.save(_state(), path)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    writer.close()

"""Reliability: one process per run folder, content-keyed caches, refused writes, odd file systems, ambiguous
labels and groups, crafted checkpoints, SIGTERM.

Every failure here must end in one line on stderr (``ussf CMD: error: ...``), exit code 2 (143 for SIGTERM), no
traceback, no temporary file left behind, and nothing written into the data.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ussf_lib import files, settings
from ussf_lib.cli import main
from ussf_lib.data.index import decode_index, fingerprint, index_folder, load_index, read_image
from ussf_lib.errors import UserError
from ussf_lib.training.checkpoints import atomic_save, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
FAST = ["--model", "us_sfnet_tiny", "--folds", "2", "--epochs", "1", "--image-size", "16", "--batch-size", "8",
        "--no-progress"]


def _pattern(seed: int, size: int = 12) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, (6, 6)).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)


def _tree(root: Path, counts: dict[str, int] | None = None, ext: str = "png") -> Path:
    for c, (cls, n) in enumerate((counts or {"a": 3, "b": 3}).items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _pattern(100 * c + i).convert("RGB").save(root / cls / f"{i}.{ext}")
    return root


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if files.is_ours(p.name)]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 2-fold, 1-epoch run on a 12-per-class phantom at 32 px (grouped by patient)."""
    from ussf_lib.data.phantom import generate_phantom

    base = tmp_path_factory.mktemp("reliability")
    generate_phantom(base / "ph", n_per_class=12, image_size=32, seed=0)
    out = base / "run"
    assert main(["cv", "--manifest", str(base / "ph" / "manifest.csv"), "--group-col", "patient", "--model",
                 "us_sfnet_tiny", "--epochs", "1", "--folds", "2", "--image-size", "32", "--batch-size", "16",
                 "--no-progress", "--out", str(out)]) == 0
    return out


# ----------------------------------------------------------------------------------- 1. the run-folder lock

_HOLD = """
import sys, time
from ussf_lib.files import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()


def test_a_run_folder_in_use_refuses_a_second_process_naming_it(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    proc = _holder(copy)
    try:
        assert (copy / files.LOCK_NAME).read_text().strip() == f"{proc.pid}@{socket.gethostname()}"
        for argv in (["report", str(copy)], ["cv", "--resume", str(copy), "--no-progress"]):
            capsys.readouterr()
            assert main(argv) == 2
            err = _one_line(capsys)
            assert f"{copy}: in use by process {proc.pid} on {socket.gethostname()}" in err, err
            assert "wait for it to finish" in err
    finally:
        _stop(proc)
    # the holder was killed: the system released its lock, and the file it left is not obeyed
    assert (copy / files.LOCK_NAME).is_file()
    assert main(["report", str(copy)]) == 0
    assert not (copy / files.LOCK_NAME).exists()


def test_a_comparison_folder_in_use_is_refused(tmp_path, capsys):
    from ussf_lib.training.compare import _shared_settings
    from ussf_lib.training.experiment import CVConfig

    data = _tree(tmp_path / "d")
    out = tmp_path / "cmp"
    out.mkdir()
    cfg = CVConfig(out=str(out), data=str(data), model="us_sfnet_tiny", folds=2, epochs=1, image_size=16,
                   batch_size=8, progress=False)
    (out / "compare.json").write_text(json.dumps({"models": ["us_sfnet_tiny"], "settings": _shared_settings(cfg)}))
    proc = _holder(out)
    try:
        assert main(["compare", "--data", str(data), "--models", "us_sfnet_tiny", "--out", str(out), *FAST[2:]]) == 2
        assert f"in use by process {proc.pid}" in _one_line(capsys)
    finally:
        _stop(proc)


def test_the_lock_is_reentrant_in_one_process_and_cleared_on_release(tmp_path):
    with files.run_lock(tmp_path):
        with files.run_lock(tmp_path):  # `ussf cv` writes its report under its own lock
            assert (tmp_path / files.LOCK_NAME).is_file()
        assert (tmp_path / files.LOCK_NAME).is_file()
    assert not (tmp_path / files.LOCK_NAME).exists()


def test_temporary_names_are_unique_per_process_and_thread(tmp_path):
    names = {files.temp_path(tmp_path / "x.csv").name for _ in range(20)}
    other: list[str] = []
    thread = threading.Thread(target=lambda: other.append(files.temp_path(tmp_path / "x.csv").name))
    thread.start()
    thread.join()
    assert len(names) == 20 and other[0] not in names
    assert all(n.startswith(f".x.csv.tmp{os.getpid()}-") for n in names | set(other))


def test_a_finished_run_leaves_no_temporary_file_and_a_resume_removes_stale_ones(run, tmp_path, capsys):
    assert _temps(run) == []
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    stale = [copy / ".config.json.tmp999999-1-abc", copy / "folds" / "0" / ".checkpoint.pt.tmp999999-2-def",
             copy / "folds" / "1" / ".predictions.csv.tmp1"]
    for path in stale:
        path.write_text("half")
    assert main(["cv", "--resume", str(copy), "--no-progress"]) == 0  # every fold finished: the report again
    assert _temps(copy) == []


# --------------------------------------------------------------------------- 2. caches keyed by content


def test_an_image_rewritten_with_the_same_size_and_mtime_is_decoded_again(tmp_path):
    data = _tree(tmp_path / "d", ext="bmp")  # a BMP's size depends only on its dimensions
    cache = tmp_path / "cache"
    index = index_folder(data)
    first = decode_index(index, 12, cache_dir=cache, progress=False)
    target = data / "a" / "0.bmp"
    st = target.stat()
    _pattern(999).convert("RGB").save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = decode_index(index_folder(data), 12, cache_dir=cache, progress=False)
    row = list(index.frame["relpath"]).index("a/0.bmp")
    assert not np.array_equal(first.images[row], second.images[row])
    assert np.array_equal(second.images[row], read_image(target, 12))
    assert len(list(cache.glob("images_*.npy"))) == 2  # one entry per content
    # The fingerprint is that of the bytes decoded: the first decoding's, though the file has changed since.
    assert fingerprint(first.index, first.digests) != fingerprint(index)
    assert fingerprint(second.index, second.digests) == fingerprint(index)


def test_an_unchanged_data_set_is_served_from_the_cache(tmp_path, monkeypatch):
    from ussf_lib.data import index as index_mod

    data = _tree(tmp_path / "d")
    cache = tmp_path / "cache"
    decode_index(index_folder(data), 12, cache_dir=cache, progress=False)
    monkeypatch.setattr(index_mod, "_open_rgb", lambda *_: pytest.fail("decoded again"))
    again = decode_index(index_folder(data), 12, cache_dir=cache, progress=False)
    assert again.images.shape == (6, 12, 12, 3)


# ------------------------------------------------------------------------------------- 3. refused writes


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; CI runs as root), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    with open(disk / "filler", "wb") as fh:
        try:
            while shutil.disk_usage(disk).free > leave:
                fh.write(b"\0" * max(1, min(65536, shutil.disk_usage(disk).free - leave)))
                fh.flush()
        except OSError:
            pass


def test_a_checkpoint_on_a_full_disk_is_one_line_leaves_no_temp_and_the_run_resumable(tiny_disk):
    run_dir = tiny_disk / "run"
    (run_dir / "folds" / "0").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    ckpt = run_dir / "folds" / "0" / "checkpoint.pt"
    atomic_save({"w": torch.zeros(10)}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(UserError) as caught:
        atomic_save({"w": torch.zeros(1_000_000)}, ckpt)  # 4 MB on a 1 MiB disk
    message = str(caught.value)
    assert message.startswith(f"{ckpt}: could not write (No space left on device); free space on that disk")
    assert message.endswith(f"then ussf cv --resume {run_dir}") and "\n" not in message
    assert ckpt.read_bytes() == before and _temps(tiny_disk) == []


@pytest.mark.parametrize("writer", ["text", "csv", "figure"])
def test_csv_json_and_figures_on_a_full_disk_are_one_line_without_temp(tiny_disk, writer):
    import matplotlib.pyplot as plt

    from ussf_lib.evaluation.plots import save_figure

    _fill(tiny_disk)
    target = tiny_disk / {"text": "summary.json", "csv": "splits.csv", "figure": "roc.png"}[writer]
    with pytest.raises(UserError, match=r"could not write \(No space left on device\); free space on that disk"):
        if writer == "text":
            files.write_text(target, json.dumps({"x": "y" * 100_000}))
        elif writer == "csv":
            files.write_csv(pd.DataFrame({"a": np.arange(100_000)}), target)
        else:
            fig = plt.figure(figsize=(8, 8))
            plt.imshow(np.random.default_rng(0).random((400, 400)))
            try:
                save_figure(fig, target)
            finally:
                plt.close(fig)
    assert not target.exists() and _temps(tiny_disk) == []


def test_report_on_a_full_disk_is_one_line_and_a_read_only_disk_says_so(run, tiny_disk, capsys):
    copy = tiny_disk / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.pt", "*.png"))
    _fill(tiny_disk, leave=4096)
    assert main(["report", str(copy)]) == 2
    err = _one_line(capsys)
    assert "could not write (No space left on device); free space on that disk, then ussf report" in err, err
    assert _temps(copy) == []
    (tiny_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    assert main(["report", str(copy)]) == 2
    assert "Read-only file system" in _one_line(capsys)


def test_no_permission_and_unnamed_write_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from ussf_lib import cli

    def refused(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", refused)
    with pytest.raises(UserError, match="could not write .Permission denied.; you may not write there"):
        atomic_save({}, tmp_path / "c.pt")
    assert _temps(tmp_path) == []

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write() names no file

    monkeypatch.setattr(cli, "cmd_models", full)
    assert main(["models"]) == 2
    assert "a write failed: No space left on device" in _one_line(capsys)


def test_an_executed_notebook_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    import papermill

    from ussf_lib.nbrun.runner import execute_notebook

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(papermill, "execute_notebook", full)
    out = tmp_path / "01.ipynb"
    with pytest.raises(UserError, match=f"{out}: could not write .No space left on device."):
        execute_notebook(tmp_path / "in.ipynb", out, {})


# ------------------------------------------------------------------------------ 4. file-system oddities


@pytest.fixture
def odd_tree(tmp_path) -> Path:
    data = _tree(tmp_path / "d", {"a": 3, "b": 3})
    os.symlink("missing.png", data / "a" / "dangling.png")
    os.symlink("loop.png", data / "b" / "loop.png")
    os.mkfifo(data / "a" / "pipe.png")
    here = os.getcwd()
    os.chdir(data / "b")  # a socket's path must be short: bind it relative
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind("sock.png")
        sock.close()
    finally:
        os.chdir(here)
    with open(os.fsencode(data / "b") + b"/caf\xe9.png", "wb") as fh:  # Latin-1, not UTF-8
        _pattern(7).save(fh, format="PNG")
    return data


@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
def test_links_special_files_and_undecodable_names_are_named_skipped_or_counted(odd_tree, tmp_path, capsys):
    index = load_index(str(odd_tree))
    assert index.ignored["special"] == 2  # the FIFO and the socket: counted, never opened
    assert "2 special" in index.describe()
    with pytest.raises(UserError) as caught:
        decode_index(index, 12, progress=False)
    message = str(caught.value)
    assert message.startswith("3 unreadable image(s): ")
    assert f"{odd_tree / 'a' / 'dangling.png'}: broken symbolic link (its target does not exist)" in message
    assert f"{odd_tree / 'b' / 'loop.png'}: symbolic link loop" in message
    assert f"{odd_tree / 'b'}/caf\\xe9.png: file name is not valid UTF-8 (rename it)" in message
    assert "missing.png" not in message  # the link in the data is named, not its target
    decoded = decode_index(index, 12, progress=False, skip_bad=True)
    assert sorted(decoded.skipped["path"]) == ["a/dangling.png", "b/caf\\xe9.png", "b/loop.png"]
    assert len(decoded.index) == 6
    # the same through the commands that read a folder
    for argv in (["audit", str(odd_tree), "--no-progress"], ["cv", "--data", str(odd_tree), "--out",
                                                             str(tmp_path / "run"), *FAST]):
        capsys.readouterr()
        assert main(argv) == 2
        err = _one_line(capsys)
        assert "3 unreadable image(s)" in err and "dangling.png: broken symbolic link" in err, err
    assert main(["audit", str(odd_tree), "--skip-bad", "--no-progress", "--out", str(tmp_path / "audit")]) == 0
    skipped = pd.read_csv(tmp_path / "audit" / "skipped.csv")
    assert len(skipped) == 3


def test_the_fingerprint_hashes_a_name_that_is_not_utf8(tmp_path):
    data = _tree(tmp_path / "d")
    before = fingerprint(index_folder(data))
    os.rename(data / "a" / "0.png", os.fsencode(data / "a") + b"/\xff.png")
    index = index_folder(data)
    assert "a/\udcff.png" in set(index.frame["relpath"])
    assert fingerprint(index) != before


def test_a_file_that_vanishes_before_decoding_is_named(tmp_path):
    data = _tree(tmp_path / "d")
    index = index_folder(data)
    (data / "a" / "1.png").unlink()
    with pytest.raises(UserError, match=r"a/1.png: vanished \(the file no longer exists\)"):
        decode_index(index, 12, progress=False)
    assert list(decode_index(index, 12, progress=False, skip_bad=True).skipped["path"]) == ["a/1.png"]


def test_a_manifest_listing_a_fifo_or_a_broken_link_is_one_line(tmp_path):
    data = _tree(tmp_path / "d")
    os.mkfifo(data / "a" / "pipe.png")
    os.symlink("gone.png", data / "a" / "link.png")
    for listed, match in (("a/pipe.png", "'a/pipe.png' is not a regular file (a FIFO, socket or device)"),
                          ("a/link.png", "'a/link.png' is a broken symbolic link")):
        pd.DataFrame({"path": ["a/0.png", "b/0.png", listed], "label": ["a", "b", "a"]}).to_csv(data / "m.csv",
                                                                                              index=False)
        with pytest.raises(UserError, match=re.escape(match)):
            load_index(manifest=str(data / "m.csv"))


# --------------------------------------------------------------------------------- 5. labels and groups


@pytest.mark.parametrize("names", [("Benign", "benign"), ("benign", "\uff42enign")])  # case; full-width b (NFKC)
def test_class_names_that_differ_only_in_case_or_unicode_form_are_refused(tmp_path, names):
    data = _tree(tmp_path / "d", {names[0]: 2, names[1]: 2, "malignant": 2})
    with pytest.raises(UserError, match="differ only in case or Unicode form") as caught:
        load_index(str(data))
    assert all(repr(n) in str(caught.value) for n in names)


def test_missing_group_values_are_refused_or_made_groups_of_their_own(tmp_path, capsys):
    data = _tree(tmp_path / "d", {"a": 4, "b": 4})
    paths = [f"{c}/{i}.png" for c in "ab" for i in range(4)]
    groups = ["p1", "NaN", "p2", "p2", "q1", "null", " None ", ""]
    pd.DataFrame({"path": paths, "label": [p[0] for p in paths], "patient": groups}).to_csv(data / "m.csv",
                                                                                          index=False)
    with pytest.raises(UserError) as caught:
        load_index(manifest=str(data / "m.csv"), group_col="patient")
    message = str(caught.value)
    assert "4 row(s) have an empty patient or one that means missing" in message
    assert "line 3: 'a/1.png' with patient 'NaN'" in message and "--missing-groups own" in message
    index = load_index(manifest=str(data / "m.csv"), group_col="patient", missing_groups="own")
    by_path = dict(zip(index.frame["relpath"], index.frame["group"]))
    assert by_path["a/1.png"] == "a/1.png" and by_path["b/3.png"] == "b/3.png" and by_path["a/2.png"] == "p2"
    # declared once in settings.py: a flag of cv and compare, a config.json key, a notebook parameter check
    assert settings.get("missing_groups").choices == ("refuse", "own")
    assert main(["cv", "--manifest", str(data / "m.csv"), "--group-col", "patient", "--out",
                 str(tmp_path / "run"), *FAST]) == 2
    assert "row(s) have an empty patient" in _one_line(capsys)
    with pytest.raises(SystemExit) as stopped:  # argparse exits itself
        main(["cv", "--manifest", str(data / "m.csv"), "--missing-groups", "sometimes", *FAST])
    assert stopped.value.code == 2
    assert "argument --missing-groups: invalid choice: 'sometimes'" in _one_line(capsys)
    with pytest.raises(UserError, match="MISSING_GROUPS='x' must be one of refuse, own"):
        settings.check_value("missing_groups", "x", "04: MISSING_GROUPS='x'")


# ------------------------------------------------------------------------------ 6. crafted checkpoints


@pytest.mark.parametrize("meta, match", [
    ({"image_size": 10**9}, "image_size=1000000000 is not a whole number from 8 to 2048"),
    ({"image_size": True}, "image_size=True"),
    ({"classes": [f"c{i}" for i in range(100_000)]}, "classes holds 100000 names, not 2 to 1000"),
    ({"classes": ["a", "a"]}, "are not distinct non-empty names"),
    ({"classes": ["a", 3]}, "are not distinct non-empty names"),
    ({"std": [0.2, 0.0, 0.2]}, "std=[0.2, 0.0, 0.2] is not 3 finite numbers above 0"),
    ({"mean": [float("nan"), 0.5, 0.5]}, "mean=[nan, 0.5, 0.5] is not 3 finite numbers"),
    ({"mean": [0.5, 0.5]}, "is not 3 finite numbers"),
    ({"model_name": "os.system"}, "model_name='os.system' is not a registered model"),
    ({"model_kwargs": {"depth": torch.zeros(3)}}, "model_kwargs="),
    ({"model_kwargs": [1, 2]}, "is not a dict of plain values"),
])
def test_crafted_checkpoint_metadata_is_refused_in_one_line(tmp_path, capsys, meta, match):
    good = {"model_name": "us_sfnet_tiny", "classes": ["a", "b"], "image_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "model_kwargs": {}}
    ckpt = tmp_path / "c.pt"
    torch.save({"model": {}, "meta": {**good, **meta}}, ckpt)
    with pytest.raises(UserError, match="checkpoint metadata is not usable") as caught:
        read_checkpoint(ckpt)
    assert match in str(caught.value) and len(str(caught.value)) < 400
    image = tmp_path / "x.png"
    _pattern(0).save(image)
    assert main(["predict", "--checkpoint", str(ckpt), str(image)]) == 2
    assert "checkpoint metadata is not usable" in _one_line(capsys)


def test_sane_checkpoint_metadata_passes(run):
    state = read_checkpoint(run / "folds" / "0" / "checkpoint.pt")
    assert state["meta"]["image_size"] == 32


# -------------------------------------------------------------- 7. SIGTERM, damaged checkpoints, --skip-bad


def test_sigterm_stops_with_the_resume_hint_and_exit_143(tmp_path, monkeypatch, capsys):
    from ussf_lib import cli

    marker = tmp_path / "config.json"
    marker.write_text("{}")

    def long_run(args):
        args.continue_hint = (marker, f"continue with: ussf cv --resume {tmp_path}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return 0

    monkeypatch.setattr(cli, "cmd_models", long_run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["models"]) == 143
    assert capsys.readouterr().err.strip() == (f"ussf models: terminated (SIGTERM); continue with: ussf cv --resume "
                                               f"{tmp_path}")
    assert signal.getsignal(signal.SIGTERM) == before  # restored

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_models", ctrl_c)
    assert main(["models"]) == 130
    assert capsys.readouterr().err.strip() == "ussf models: interrupted"


def test_a_damaged_checkpoint_on_resume_says_deleting_it_restarts_the_fold(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "folds" / "1" / "predictions.csv").unlink()
    ckpt = copy / "folds" / "1" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    restart = f"delete {ckpt} to train fold 1 again from its first epoch, then ussf cv --resume {copy}"
    torch.save({"model": state["model"], "meta": state["meta"]}, ckpt)  # the resumable part is gone
    assert main(["cv", "--resume", str(copy), "--no-progress"]) == 2
    err = _one_line(capsys)
    assert "damaged checkpoint (lacks optimizer, scaler" in err and err.endswith(restart), err
    ckpt.write_bytes(b"garbage")
    assert main(["cv", "--resume", str(copy), "--no-progress"]) == 2
    err = _one_line(capsys)
    assert "not a ussf checkpoint" in err and err.endswith(restart), err


def test_too_few_images_after_skip_bad_names_the_skipped_ones(tmp_path, capsys):
    data = _tree(tmp_path / "d", {"a": 3, "b": 1})
    (data / "b" / "x.png").write_text("x")
    (data / "b" / "y.png").write_text("y")
    assert main(["cv", "--data", str(data), "--out", str(tmp_path / "run"), "--skip-bad", *FAST]) == 2
    err = _one_line(capsys)
    assert "class 'b' has 1 images, fewer than --folds 2" in err
    assert "--skip-bad left out 2 unreadable image(s), 2 of class 'b'; e.g. b/x.png: not an image" in err, err
    assert not (tmp_path / "run").exists()

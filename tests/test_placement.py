"""ussf_lib.training.placement: --devices parsing and its messages, pinned workers, the CLI on a machine without CUDA,
and what --engine ray asks Ray for (no Ray needed: tests/test_ray_engine.py runs it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ussf_lib.training import placement
from ussf_lib.cli import main
from ussf_lib.errors import UserError
from ussf_lib.training.placement import PLACED_ENV, cpu_threads, parse_devices, run_placed, worker_log


def test_parse_devices_values():
    assert parse_devices("0,1", cuda_count=2) == ["0", "1"]
    assert parse_devices("cpu,cpu", cuda_count=0) == ["cpu", "cpu"]
    assert parse_devices(" 1 , CPU ", cuda_count=2) == ["1", "cpu"]  # mixed, spaces and case do not matter
    assert parse_devices(["cpu", "0"], cuda_count=1) == ["cpu", "0"]  # a list, as a notebook would pass it
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]  # cpu slots alone never ask torch about CUDA
    assert parse_devices("0,0,1,1", cuda_count=2) == ["0", "0", "1", "1"]  # two runs at once on each GPU
    assert parse_devices("0,5", cuda_count=0, check_cuda=False) == ["0", "5"]  # a Ray cluster's GPUs are elsewhere


@pytest.mark.parametrize("spec,cuda_count,message", [
    ("", 2, "--devices is empty; list GPU ids such as --devices 0,1, or cpu slots such as --devices cpu,cpu"),
    ("0,,1", 2, "--devices 0,,1: an entry is empty; separate GPU ids or cpu by single commas"),
    ("gpu0", 2, "--devices gpu0: 'gpu0' is neither a GPU id (0, 1, ...) nor cpu"),
    ("1.5", 2, "--devices 1.5: '1.5' is neither a GPU id"),
    ("-1", 2, "--devices -1: GPU ids start at 0, -1 is negative"),
    ("0,2", 2, "--devices 0,2: there is no GPU 2; this machine sees 2 GPU(s), ids 0 to 1"),
    ("0,1", 0, "--devices 0,1: CUDA is not available on this machine; use --devices cpu,cpu to run 2 at once "
               "on the CPU, or leave --devices out"),
    ("cpu,0", 0, "use --devices cpu,cpu to run 2 at once on the CPU"),
    ("0", 0, "--devices 0: CUDA is not available on this machine; use --devices cpu to run on the CPU"),
])
def test_parse_devices_errors_name_the_value_and_the_fix(spec, cuda_count, message):
    with pytest.raises(UserError) as info:
        parse_devices(spec, cuda_count=cuda_count)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pin_sets_the_environment_of_its_worker(monkeypatch):
    """The initializer, called here as a worker would: one entry taken, CUDA and threads set, lines queued."""
    import queue
    from types import SimpleNamespace

    for var in ("CUDA_VISIBLE_DEVICES", PLACED_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "unset")  # recorded, so that teardown restores this process's environment
        monkeypatch.delenv(var)
    monkeypatch.setattr(placement, "_LOG_QUEUE", None)
    threads_set: list[int] = []  # torch is loaded here: its pool is resized too (a fake, to leave ours alone)
    fake_torch = SimpleNamespace(set_num_threads=threads_set.append)
    monkeypatch.setattr(placement, "sys", SimpleNamespace(modules={"torch": fake_torch}))
    slots, logs = queue.Queue(), queue.Queue()
    slots.put(("1", "1"))
    placement._pin(slots, logs, 3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and os.environ[PLACED_ENV] == "1"
    assert "OMP_NUM_THREADS" not in os.environ  # a GPU worker's threads are left alone
    assert placement.placed_device() == "1" and slots.empty()
    worker_log("[m] ")("fold 0: done")
    assert logs.get_nowait() == "[m] fold 0: done"

    assert threads_set == []
    slots.put(("cpu", ""))
    placement._pin(slots, logs, 3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and os.environ[PLACED_ENV] == "cpu"  # "": CUDA sees no GPU
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3" and threads_set == [3]


def test_gpu_ids_count_the_gpus_this_process_sees(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [placement._visible_value(e) for e in ("0", "1", "cpu")] == ["2", "3", ""]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert placement._visible_value("1") == "1"
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cpu_threads(["cpu", "cpu"]) == 8 and cpu_threads(["cpu", "0", "1"]) == 16 and cpu_threads(["0"]) == 16


def _where(tag: str, meet: str) -> dict:
    """A trivial task: what the worker it ran in sees. The first two wait for each other, so both workers work."""
    worker_log(f"[{tag}] ")("hello")
    Path(meet, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(meet)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    if tag == "bad":
        raise UserError("bad input, fix it")
    return {"pid": os.getpid(), "placed": os.environ.get(PLACED_ENV), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "omp": os.environ.get("OMP_NUM_THREADS")}


def test_run_placed_pins_one_worker_per_entry_and_reports_user_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # read by the parent, which sets the workers' threads
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines: list[str] = []
    finished: list[str] = []
    # "0" works without a GPU here: the tasks only read the environment, they never start CUDA.
    tasks = [(tag, _where, (tag, str(tmp_path))) for tag in ("a", "b", "bad", "c", "d")]
    results = run_placed(tasks, ["cpu", "0"], log=lines.append, on_done=lambda r: finished.append(r.key))
    assert [r.key for r in results] == ["a", "b", "bad", "c", "d"] and sorted(finished) == ["a", "b", "bad", "c", "d"]
    bad = results[2]
    assert not bad.ok and bad.error == "bad input, fix it" and bad.device in ("cpu", "0")  # reported, others ran
    seen = [r.value for r in results if r.ok]
    assert len(seen) == 4 and all(r.device == r.value["placed"] for r in results if r.ok)
    by_pid = {}
    for s in seen:  # pinned for life: a worker process always has the same entry and environment
        assert by_pid.setdefault(s["pid"], (s["placed"], s["cuda"], s["omp"])) == (s["placed"], s["cuda"], s["omp"])
    assert sorted(by_pid.values()) == [("0", "0", None), ("cpu", "", "4")]  # two workers, one per entry
    assert os.getpid() not in by_pid
    assert sorted(lines) == ["[a] hello", "[b] hello", "[bad] hello", "[c] hello", "[d] hello"]  # lines reach log


def test_a_gpu_listed_twice_gets_two_workers_pinned_to_it(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # The tasks only read the environment (no CUDA here); each waits for the other, so both run at once.
    results = run_placed([(tag, _where, (tag, str(tmp_path))) for tag in ("a", "b")], ["0", "0"], log=lambda _: None)
    assert [(r.device, r.value["cuda"]) for r in results] == [("0", "0"), ("0", "0")]
    assert len({r.value["pid"] for r in results}) == 2


def test_ray_resources_follow_the_devices():
    """What each run asks Ray for: a GPU, a share of one when its id repeats, or a node's CPUs shared by the slots."""
    from ussf_lib.training.ray_engine import run_resources

    assert run_resources(["0", "1"], node_cpus=8, has_gpus=True) == {"num_gpus": 1.0, "num_cpus": 1}
    assert run_resources(["0", "0", "1", "1"], node_cpus=8, has_gpus=True) == {"num_gpus": 0.5, "num_cpus": 1}
    assert run_resources(["cpu", "cpu"], node_cpus=8, has_gpus=True) == {"num_cpus": 4}
    assert run_resources(["cpu"] * 3, node_cpus=2, has_gpus=False) == {"num_cpus": 1}  # at least one
    assert run_resources(None, node_cpus=8, has_gpus=True) == {"num_gpus": 1.0, "num_cpus": 1}
    assert run_resources(None, node_cpus=8, has_gpus=False) == {"num_cpus": 8}
    for devices, message in ((["0", "cpu"], "list GPU ids or cpu slots, not both"),
                             (["0", "0", "1"], r"list each GPU id the same number of times \(e.g. 0,0,1,1")):
        with pytest.raises(UserError, match=message):
            run_resources(devices, node_cpus=8, has_gpus=True)


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_engine_ray_without_ray_installed_is_one_line_exit_2(command, phantom_dir, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    (tmp_path / "grid.yaml").write_text("SEED: [0, 1]\n")
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "04_train_cross_validation.ipynb"
    args = {"compare": ["compare", "--data", str(phantom_dir), "--models", "us_sfnet_tiny"],
            "sweep": ["sweep", "--notebook", str(notebook), "--grid", str(tmp_path / "grid.yaml")]}[command]
    assert main([*args, "--out", str(tmp_path / "out"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err
    assert err == (f"ussf {command}: error: --engine ray needs Ray, which is not installed here; install it with "
                   "pip install -e '.[cluster]'\n")
    assert not (tmp_path / "out").exists()


def _fails(tag: str) -> str:
    if tag == "bug":
        raise ValueError("a bug, not a user error")
    return tag


def test_an_unexpected_exception_is_raised_after_the_running_tasks():
    with pytest.raises(ValueError, match="a bug"):
        run_placed([("bug", _fails, ("bug",)), ("ok", _fails, ("ok",))], ["cpu"], log=lambda line: None)


@pytest.mark.parametrize("command", [
    ["compare", "--data", "{data}", "--models", "us_sfnet_tiny,densenet121", "--out", "{out}"],
    ["sweep", "--notebook", "notebooks/04_train_cross_validation.ipynb", "--grid", "{grid}", "--out", "{out}"],
])
def test_cli_gpu_devices_without_cuda_is_one_line_exit_2(command, phantom_dir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the same answer on a machine with GPUs
    (tmp_path / "grid.yaml").write_text("SEED: [0, 1]\n")
    repo = Path(__file__).resolve().parents[1]
    args = [a.format(data=phantom_dir, out=tmp_path / "out", grid=tmp_path / "grid.yaml") for a in command]
    args = [str(repo / a) if a.startswith("notebooks/") else a for a in args]
    assert main([*args, "--devices", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"ussf {command[0]}: error: --devices 0: CUDA is not available on this machine; use --devices cpu" in err
    assert not (tmp_path / "out").exists()


def test_cli_sweep_jobs_and_devices_must_agree(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("SEED: [0, 1]\n")
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "04_train_cross_validation.ipynb"
    assert main(["sweep", "--notebook", str(notebook), "--grid", str(grid), "--out", str(tmp_path / "out"),
                 "--jobs", "3", "--devices", "cpu,cpu"]) == 2
    err = capsys.readouterr().err
    assert "--jobs 3 and --devices cpu,cpu (2 entries) disagree" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

"""ussf_lib.bench and `ussf bench`: every documented figure is produced and positive (no timing assertions)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from ussf_lib import bench
from ussf_lib.bench import BenchConfig, bench_config_from, format_bench, run_bench
from ussf_lib.cli import main
from ussf_lib.errors import UserError

TINY = dict(models=("us_sfnet_tiny",), image_size=32, batch_size=2, warmup=0, iters=1, scale_model="us_sfnet_tiny",
            scale_sizes=(32, 48), fft_model="us_sfnet_tiny", profile_iters=1, pipeline_images=8, pipeline_iters=2)


def _check(result: dict) -> None:
    m = result["models"]["us_sfnet_tiny"]
    for key in ("train_img_s", "infer_img_s", "gmacs", "train_gmac_s", "infer_gmac_s", "peak_mem_mb", "params_m"):
        assert math.isfinite(m[key]) and m[key] > 0, key
    assert 0 < result["fft_share"] < 1 and set(result["fft"]["fft_ms_per_op"]) >= {"aten::_fft_r2c", "aten::_fft_c2r"}
    assert result["pipeline_img_s"] > 0 and result["pipeline_ratio"] > 0 and result["pipeline_target_ratio"] == 20
    assert [r["image_size"] for r in result["scaling"]] == [32, 48]
    assert result["scaling"][0]["time_ratio"] == 1.0 and result["scaling"][1]["mac_ratio"] > 1.5
    assert result["device"] == "cpu" and result["peak_mem_mb"] > 0 and result["seconds"] > 0
    top = result["fft"]["top_ops_ms_per_step"]
    assert 0 < len(top) <= 8 and all(t["ms"] > 0 for t in top)
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    assert sum(t["ms"] for t in top) <= result["fft"]["profiled_op_ms_per_step"] + 1e-6
    loop = result["loop"]
    assert loop["model"] == "us_sfnet_tiny" and loop["loop_images"] == 8 * 2 and loop["loop_img_s"] > 0
    assert loop["ratio_to_step"] == pytest.approx(loop["loop_img_s"] / m["train_img_s"])
    proto = result["protocol"]
    assert proto["train_rate"] == "loop"
    assert proto["model"] == "us_sfnet_tiny" and proto["checkpoint_s"] > 0 and proto["snapshot_s"] > 0
    assert 1.0 < proto["checkpoint_mb"] < 10.0  # 0.48 M float32 weights + Adam's two moments: about 6 MB
    assert [(r["eval_every"], r["checkpoint_every"]) for r in proto["rows"]] == [(1, 1), (10, 10), (150, 150)]
    minutes = [r["minutes"] for r in proto["rows"]]
    assert minutes[0] > minutes[1] > minutes[2] > 0


def test_run_bench_tiny_gives_every_figure():
    result = run_bench(BenchConfig(device="cpu", **TINY), log=lambda _: None)
    _check(result)
    json.dumps(result)  # JSON-ready
    text = format_bench(result)
    assert "us_sfnet_tiny" in text and "FFT share" in text and "Data pipeline" in text
    assert "Paper protocol estimate (us_sfnet_tiny: 5 folds x 150 epochs on 3,392 images" in text
    assert "Where the step's time goes" in text and result["fft"]["top_ops_ms_per_step"][0]["op"] in text


def test_protocol_estimate_counts_training_evaluations_and_checkpoints():
    rows = bench.protocol_estimate(train_img_s=100.0, infer_img_s=1000.0, checkpoint_s=1.0, images=1000, folds=5,
                                   epochs=10, intervals=((1, 1), (3, 10)))
    # per fold: 800 training images every epoch (8 s), 200 test images per evaluation (0.2 s), 1 s per checkpoint
    assert rows[0] == {"eval_every": 1, "checkpoint_every": 1, "evaluations": 10, "checkpoints": 10,
                       "minutes": pytest.approx(5 * (80 + 2 + 10) / 60)}
    assert rows[1] == {"eval_every": 3, "checkpoint_every": 10, "evaluations": 4, "checkpoints": 1,
                       "minutes": pytest.approx(5 * (80 + 0.8 + 1) / 60)}  # epochs 3, 6, 9 and the last
    # written in the background: training waits for the 0.1 s host copy, and for the part of a 10 s write
    # that an 8 s epoch (one checkpoint per epoch) does not hide, but not for a 5 s write
    slow, hidden = (bench.protocol_estimate(100.0, 1000.0, write, snapshot_s=0.1, images=1000, folds=5, epochs=10,
                                            intervals=((1, 1),))[0]["minutes"] for write in (10.0, 5.0))
    assert slow == pytest.approx(5 * (80 + 2 + 10 * (0.1 + 2.0)) / 60)
    assert hidden == pytest.approx(5 * (80 + 2 + 10 * 0.1) / 60)


def test_checkpoint_iters_zero_skips_the_protocol_estimate():
    result = run_bench(BenchConfig(device="cpu", checkpoint_iters=0, **{**TINY, "fft_model": None, "scale_model": None}),
                       log=lambda _: None)
    assert "protocol" not in result and "Paper protocol" not in format_bench(result)
    with pytest.raises(UserError, match="checkpoint_iters=-1"):
        BenchConfig(checkpoint_iters=-1)


def test_training_loop_figure_uses_train_fold_and_can_be_skipped(monkeypatch):
    seen = {}
    real = bench.train_fold

    def spy(model, images, targets, train_idx, test_idx, cfg, *args, **kwargs):
        seen.update(images=images.shape, train=len(train_idx), test=len(test_idx), epochs=cfg.epochs,
                    amp=cfg.amp, channels_last=cfg.channels_last)
        return real(model, images, targets, train_idx, test_idx, cfg, *args, **kwargs)

    monkeypatch.setattr(bench, "train_fold", spy)
    tiny = {**TINY, "fft_model": None, "scale_model": None, "checkpoint_iters": 0}
    result = run_bench(BenchConfig(device="cpu", loop_batches=3, loop_epochs=2, amp="bf16", channels_last=True,
                                   **tiny), log=lambda _: None)
    assert seen == {"images": (4 * 2, 32, 32, 3), "train": 3 * 2, "test": 2, "epochs": 2, "amp": "bf16",
                    "channels_last": True}
    assert "Training loop (train_fold, 6 cached images an epoch)" in format_bench(result)
    skipped = run_bench(BenchConfig(device="cpu", loop_batches=0, **tiny), log=lambda _: None)
    assert "loop" not in skipped
    with pytest.raises(UserError, match="loop_epochs=1 must be at least 2"):
        BenchConfig(loop_epochs=1)


def test_compiled_models_are_timed_and_reported():
    torch._dynamo.reset()
    result = run_bench(BenchConfig(device="cpu", compile=True, compile_backend="aot_eager",
                                   **{**TINY, "scale_sizes": (32,), "fft_model": None}), log=lambda _: None)
    assert result["config"]["compile"] is True and result["models"]["us_sfnet_tiny"]["train_img_s"] > 0
    assert "compiled" in format_bench(result).splitlines()[0]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # torch.compile really ran


def test_cli_sizes_reach_the_sweep_and_bad_sizes_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK", {**TINY, "fft_model": None})
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--sizes", "32,40", "--json", str(path)]) == 0
    assert [r["image_size"] for r in json.loads(path.read_text())["scaling"]] == [32, 40]
    capsys.readouterr()
    assert main(["bench", "--quick", "--device", "cpu", "--sizes", "32,big"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--sizes 32,big" in err and "Traceback" not in err
    for args, match in ((["--json", str(tmp_path)], f"--json {tmp_path}: is a folder"),
                        (["--device", "gpu7"], "--device gpu7: not a device name")):
        assert main(["bench", "--quick", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ussf bench: error: {match}") and "\n" not in err, err


@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("off", False)])
def test_amp_and_channels_last_reach_the_measured_steps(monkeypatch, amp, channels_last):
    seen: list[tuple] = []  # (autocast on, input is channels-last, stem conv output dtype) per forward

    def recording_build_model(*args, **kwargs):
        model = bench_build_model(*args, **kwargs)
        stem_conv = model.stem[0]
        stem_conv.register_forward_hook(lambda mod, inp, out: seen.append(
            (torch.is_autocast_enabled("cpu"), inp[0].is_contiguous(memory_format=torch.channels_last)
             and not inp[0].is_contiguous(), out.dtype)))
        return model

    bench_build_model = bench.build_model
    monkeypatch.setattr(bench, "build_model", recording_build_model)
    result = run_bench(BenchConfig(device="cpu", amp=amp, channels_last=channels_last,
                                   **{**TINY, "scale_model": None, "fft_model": None}), log=lambda _: None)
    assert result["config"]["amp"] == amp and result["config"]["channels_last"] is channels_last
    assert "fft" not in result and "scaling" not in result
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    # The MAC count runs one plain float32 forward first; the timed train and inference steps follow it.
    assert seen[-2:] == [(amp == "bf16", channels_last, dtype)] * 2


def test_cli_bench_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK", TINY)  # the --quick preset, shrunk to seconds
    path = tmp_path / "out" / "bench.json"
    assert main(["bench", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    _check(json.loads(path.read_text()))
    assert "train img/s" in capsys.readouterr().out


def test_quick_preset_and_errors():
    quick = bench_config_from(True)
    assert quick.models == ("us_sfnet", "densenet121") and quick.image_size == 224 and quick.scale_sizes[-1] == 448
    assert bench_config_from(False).models == ("us_sfnet", "densenet121", "resnet101")
    assert bench_config_from(True, batch_size=4, iters=None).batch_size == 4
    assert quick.concurrency == (1, 2, 4) and bench_config_from(False).concurrency == ()  # full: --concurrency
    with pytest.raises(UserError, match="unknown model"):
        BenchConfig(models=("nope",))
    with pytest.raises(UserError, match="amp"):
        BenchConfig(amp="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA"):
        run_bench(BenchConfig(device="cuda", **TINY))


def test_help_states_the_quick_presets_own_numbers(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default 10; --quick {bench.QUICK['iters']})" in text
    assert f"(default 3; --quick {bench.QUICK['warmup']})" in text
    assert f"(default 64; --quick {bench.QUICK['batch_size']})" in text
    assert BenchConfig().iters == 10 and BenchConfig().warmup == 3 and BenchConfig().batch_size == 64


def test_cli_flags_reach_the_bench_settings(monkeypatch, capsys):
    seen = []

    def fake_run_bench(cfg, log):  # the settings are the subject here, not the measuring
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    argv = ["bench", "--device", "cpu", "--models", "us_sfnet_tiny,densenet121", "--image-size", "48",
            "--batch-size", "6", "--iters", "4", "--warmup", "2", "--compile", "--compile-scope", "blocks",
            "--amp", "bf16", "--channels-last", "--concurrency", "2,4"]
    assert main(argv) == 130  # Ctrl-C: one line, exit 130, no traceback
    assert capsys.readouterr().err.strip() == "ussf bench: interrupted"
    (cfg,) = seen
    assert cfg.models == ("us_sfnet_tiny", "densenet121") and cfg.image_size == 48 and cfg.batch_size == 6
    assert cfg.iters == 4 and cfg.warmup == 2 and cfg.compile and cfg.compile_scope == "blocks"
    assert cfg.amp == "bf16" and cfg.channels_last and cfg.device == "cpu" and cfg.concurrency == (2, 4)
    assert main(["bench", "--concurrency", "1,two"]) == 2
    assert capsys.readouterr().err == ("ussf bench: error: --concurrency 1,two: give positive whole numbers of runs "
                                       "at once, e.g. --concurrency 1,2,4\n")


def test_fft_share_of_a_real_profile_on_this_cpu():
    cfg = BenchConfig(models=("us_sfnet_tiny",), fft_model="us_sfnet_tiny", image_size=32, batch_size=2,
                      profile_iters=1)
    share = bench.fft_share(cfg, torch.device("cpu"))
    assert 0 < share["fft_share"] < 1
    assert share["fft_ms_per_step"] > 0 and share["profile_iters"] == 1


@pytest.mark.slow
def test_several_runs_at_once_on_one_device_are_measured_side_by_side(monkeypatch):
    """--concurrency 2: one and two training processes at once on the CPU, each with its share of the cores."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # read here, where the processes' threads are chosen
    tiny = {**TINY, "fft_model": None, "scale_model": None, "checkpoint_iters": 0, "loop_batches": 0}
    result = run_bench(BenchConfig(device="cpu", concurrency=(2,), concurrency_size=32, concurrency_steps=2, **tiny),
                       log=lambda _: None)
    conc = result["concurrency"]
    assert (conc["model"], conc["image_size"], conc["batch_size"], conc["steps"]) == ("us_sfnet_tiny", 32, 2, 2)
    assert [(r["runs"], r["threads_per_run"]) for r in conc["rows"]] == [(1, 2), (2, 1)]  # 1 is always measured
    one, two = conc["rows"]
    assert one["ratio"] == 1.0 and two["ratio"] == pytest.approx(two["img_s"] / one["img_s"])
    assert all(r["img_s"] > 0 and r["img_s_per_run"] > 0 for r in conc["rows"])
    assert two["img_s"] == pytest.approx(2 * 2 * 2 / two["seconds"])  # 2 runs x 2 steps x batch 2, to the last
    json.dumps(result)
    assert "## Several runs on one device (us_sfnet_tiny at 32 px, train batch 2, 2 timed steps" in format_bench(result)
    with pytest.raises(UserError, match="run at least one process"):
        BenchConfig(concurrency=(0,))

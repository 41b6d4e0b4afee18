"""ussf_lib.bench and `ussf bench`: every documented figure is produced and positive (no timing assertions)."""

from __future__ import annotations

import json
import math

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


def test_run_bench_tiny_gives_every_figure():
    result = run_bench(BenchConfig(device="cpu", **TINY), log=lambda _: None)
    _check(result)
    json.dumps(result)  # JSON-ready
    text = format_bench(result)
    assert "us_sfnet_tiny" in text and "FFT share" in text and "Data pipeline" in text


def test_amp_and_channels_last_are_passed_to_the_measured_steps():
    result = run_bench(BenchConfig(device="cpu", amp="bf16", channels_last=True,
                                   **{**TINY, "scale_model": None, "fft_model": None}), log=lambda _: None)
    assert result["config"]["amp"] == "bf16" and result["config"]["channels_last"] is True
    assert result["models"]["us_sfnet_tiny"]["train_img_s"] > 0 and "fft" not in result and "scaling" not in result


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
    with pytest.raises(UserError, match="unknown model"):
        BenchConfig(models=("nope",))
    with pytest.raises(UserError, match="amp"):
        BenchConfig(amp="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_user_error():
    with pytest.raises(UserError, match="CUDA"):
        run_bench(BenchConfig(device="cuda", **TINY))

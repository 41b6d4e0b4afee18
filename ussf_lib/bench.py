"""Throughput benchmark: how fast US-SFNet and its baselines train and infer here, and where the time goes.

``ussf bench`` calls :func:`run_bench` and prints :func:`format_bench`; ``docs/performance.md`` records its
figures. Measured side by side in one process, on synthetic batches already on the device (so the model is
timed, not the data loading):

* training and inference images/s of each model at one image size (training step = forward, cross-entropy,
  backward, Adam step, exactly as :func:`ussf_lib.training.loop.train_fold` does it, with ``--amp`` / ``--channels-last``),
  the forward GMACs per image (:func:`ussf_lib.models.complexity.count_macs`) and the achieved GMAC/s
  (inference: GMACs × img/s; training: 3 × GMACs × img/s, the usual forward + backward ≈ 3 × forward rule);
* the share of US-SFNet's training step spent in its FFTs: ``torch.profiler`` self time of every
  ``aten::_fft_*`` operator (``_fft_r2c``: rfft2 and the backward of irfft2; ``_fft_c2r``: irfft2 and the
  backward of rfft2) over the self time of all operators in the profiled steps (CPU time on CPU,
  device time on CUDA);
* how US-SFNet's cost grows with the image size: training time per image relative to the smallest size, next
  to the ratio of MACs;
* the data pipeline's images/s: batches gathered from the uint8 cache (:class:`ussf_lib.training.runtime.DeviceImages`)
  and normalized on the device (:func:`ussf_lib.data.index.normalize_batch`), against the model's training images/s
  (target: at least 20 × US-SFNet's training throughput, so the input never starves the model);
* peak memory: ``torch.cuda.max_memory_allocated`` per model on CUDA; on CPU the process's peak resident set
  (``resource.getrusage``), which only grows, so a model's figure includes the models measured before it;
* the training loop itself (:func:`~ussf_lib.training.loop.train_fold` on synthetic cached images, its evaluation not
  counted) against the bare training step: what gathering, normalizing and the loop's per-step work cost;
* the time to write the reference model's training checkpoint (weights and Adam's moments, written as
  :func:`~ussf_lib.training.loop.train_fold` writes it, into the system's temporary folder) and the time of the host
  copy that training waits for while the write goes on in the background, and from them and the
  measured loop an estimate of the paper's protocol (5 folds x 150 epochs on its 3,392 images) for a few
  ``--eval-every`` / ``--checkpoint-every`` settings. The estimate counts only the measured steps and writes:
  compilation, smaller last batches and per-epoch bookkeeping come on top;
* several runs on one device (``--concurrency 1,2,4``; in ``--quick``): 1, 2 and 4 training processes of
  ``us_sfnet_tiny`` at 64 px at once on the device, each taking the same fixed number of the training steps timed
  above (on a CPU each gets cores / processes threads, as ``--devices cpu,cpu`` gives a run); their images/s
  together (all their images over the time from the common start to the last finish) and its ratio to one run
  alone: what ``--devices 0,0`` (two runs per GPU) gains.

``--quick`` is the CPU-sized preset (two models, small batches, three timed steps): minutes on 2 cores. Timings on
a shared machine are noisy; compare figures only within one run.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ussf_lib.training.checkpoints import atomic_save, host_snapshot
from ussf_lib.models.complexity import count_macs, count_parameters
from ussf_lib.data.index import normalization_on, normalize_batch
from ussf_lib.errors import UserError
from ussf_lib.paper import PAPER_DATASET, PAPER_MEAN, PAPER_PROTOCOL, PAPER_STD
from ussf_lib.models import build_model, check_image_size
from ussf_lib.models.compiling import check_compile_settings, compile_model
from ussf_lib.training import recipe
from ussf_lib.training.loop import TrainConfig, make_optimizer, train_fold
from ussf_lib.training.placement import CPU, cpu_threads
from ussf_lib.training.runtime import AMP_DTYPES, DeviceImages, autocast, select_device

#: Pipeline throughput wanted, as a multiple of US-SFNet's training throughput (docs/performance.md).
PIPELINE_TARGET_RATIO = 20.0

#: (eval_every, checkpoint_every) settings of the protocol estimate: every epoch (the defaults of ``ussf cv``),
#: every 10th, and the last epoch only.
PROTOCOL_INTERVALS: tuple[tuple[int, int], ...] = ((1, 1), (10, 10), (int(PAPER_PROTOCOL["epochs"]),) * 2)


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures; the defaults are the full (GPU-sized) benchmark, :data:`QUICK` the CPU one."""

    models: tuple[str, ...] = ("us_sfnet", "densenet121", "resnet101")
    image_size: int = 224
    batch_size: int = 64  #: training batch (the paper's); inference uses twice this, as evaluation does
    warmup: int = 3
    iters: int = 10
    scale_model: str | None = "us_sfnet"  #: None skips the image-size sweep
    scale_sizes: tuple[int, ...] = (64, 128, 224, 448)
    scale_batch: int | None = None  #: default: batch_size
    fft_model: str | None = "us_sfnet"  #: None skips the profiler
    profile_iters: int = 2
    pipeline_images: int = 1024
    pipeline_iters: int = 50
    checkpoint_iters: int = 3  #: timed checkpoint writes; 0 skips them and the protocol estimate
    #: The training loop measured whole: ``loop_epochs`` epochs of ``train_fold`` over ``loop_batches`` batches
    #: (the first epoch is warm-up); 0 skips it.
    loop_batches: int = 8
    loop_epochs: int = 3
    amp: str = "off"
    channels_last: bool = False
    #: torch.compile every timed model (the warm-up steps include the compilation, which is not timed)
    compile: bool = False
    compile_backend: str = "inductor"  #: "aot_eager" only traces: a fast check of the path on CPU
    compile_scope: str = "model"  #: see :func:`ussf_lib.models.compiling.compile_model`
    compile_mode: str = "default"
    #: Numbers of training processes run at once on the device (1 is always measured, as the reference);
    #: empty skips the measurement.
    concurrency: tuple[int, ...] = ()
    concurrency_model: str = "us_sfnet_tiny"
    concurrency_size: int = 64
    concurrency_steps: int = 20  #: timed training steps each process takes (after ``warmup`` untimed ones)
    top_ops: int = 8  #: operators listed by self time in the profile of ``fft_model``
    device: str = "auto"
    num_classes: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        self.models = tuple(self.models)
        self.scale_sizes = tuple(int(s) for s in self.scale_sizes)
        self.concurrency = tuple(int(n) for n in self.concurrency)
        if any(n < 1 for n in self.concurrency):
            raise UserError(f"bench: concurrency={self.concurrency}: run at least one process at a time")
        if not self.models:
            raise UserError("bench: no models; pass --models us_sfnet,densenet121")
        if self.amp not in AMP_DTYPES:
            raise UserError(f"--amp {self.amp}: use one of {', '.join(AMP_DTYPES)}")
        check_compile_settings(self.compile_scope, self.compile_mode)
        for name in ("batch_size", "iters", "profile_iters", "pipeline_images", "pipeline_iters", "image_size",
                     "concurrency_steps"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"bench: {name}={getattr(self, name)} must be at least 1")
        for name in ("warmup", "checkpoint_iters", "loop_batches"):
            if int(getattr(self, name)) < 0:
                raise UserError(f"bench: {name}={getattr(self, name)} must be 0 or more")
        for name in self.models:
            check_image_size(name, self.image_size)
        if self.loop_batches and self.loop_epochs < 2:
            raise UserError(f"bench: loop_epochs={self.loop_epochs} must be at least 2 (the first is warm-up)")
        if self.scale_model:
            for size in self.scale_sizes:
                check_image_size(self.scale_model, size)
        if self.fft_model:
            check_image_size(self.fft_model, self.image_size)
        if self.concurrency:
            check_image_size(self.concurrency_model, self.concurrency_size)


#: ``ussf bench --quick``: the CPU-sized preset (measured at about 2-3 minutes on 2 cores, docs/performance.md).
QUICK: dict[str, Any] = dict(models=("us_sfnet", "densenet121"), batch_size=8, warmup=2, iters=3, scale_batch=4,
                             profile_iters=1, pipeline_images=256, pipeline_iters=10, checkpoint_iters=1,
                             loop_batches=2, loop_epochs=2, concurrency=(1, 2, 4), concurrency_steps=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median seconds per call of ``fn`` over ``iters`` timed calls, after ``warmup`` untimed ones.

    Each timed call is synchronized with the device and timed alone; the median keeps one call slowed by
    another process on a shared machine from setting the figure.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _prepare(model: nn.Module, device: torch.device, cfg: BenchConfig) -> nn.Module:
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not cfg.compile:
        return model
    return compile_model(model, backend=cfg.compile_backend, scope=cfg.compile_scope, mode=cfg.compile_mode)[0]


def _input(batch: int, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=device)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def train_step_fn(model: nn.Module, batch: int, size: int, device: torch.device, amp: str = "off",
                  channels_last: bool = False, num_classes: int = 4) -> Callable[[], None]:
    """One training step as :func:`~ussf_lib.training.loop.train_fold` takes it, on a fixed synthetic batch."""
    model.train()
    x = _input(batch, size, device, channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.999), 1e-4, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16" and device.type == "cuda"))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        with autocast(device, amp):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def infer_step_fn(model: nn.Module, batch: int, size: int, device: torch.device, amp: str = "off",
                  channels_last: bool = False) -> Callable[[], None]:
    """One evaluation forward pass (eval mode, inference mode, autocast) on a fixed synthetic batch."""
    x = _input(batch, size, device, channels_last)

    def step() -> None:
        model.eval()
        with torch.inference_mode(), autocast(device, amp):
            model(x)

    return step


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_model(name: str, cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Training and inference throughput, GMACs, achieved GMAC/s and peak memory of one model."""
    torch.manual_seed(cfg.seed)
    model = build_model(name, cfg.num_classes, image_size=cfg.image_size)
    gmacs = count_macs(model, cfg.image_size) / 1e9
    params = count_parameters(model)
    model = _prepare(model, device, cfg)
    _reset_peak(device)
    train_s = _timed(train_step_fn(model, cfg.batch_size, cfg.image_size, device, cfg.amp, cfg.channels_last,
                                   cfg.num_classes), cfg.warmup, cfg.iters, device)
    infer_batch = 2 * cfg.batch_size
    infer_s = _timed(infer_step_fn(model, infer_batch, cfg.image_size, device, cfg.amp, cfg.channels_last),
                     cfg.warmup, cfg.iters, device)
    train_img_s, infer_img_s = cfg.batch_size / train_s, infer_batch / infer_s
    result = {"train_img_s": train_img_s, "infer_img_s": infer_img_s, "gmacs": gmacs,
              "train_gmac_s": 3.0 * gmacs * train_img_s, "infer_gmac_s": gmacs * infer_img_s,
              "train_step_ms": 1000 * train_s, "infer_step_ms": 1000 * infer_s, "params_m": params / 1e6,
              "batch_size": cfg.batch_size, "infer_batch_size": infer_batch, "peak_mem_mb": peak_memory_mb(device)}
    del model
    return result


def _self_time(event: Any, device: torch.device) -> float:
    if device.type == "cuda":
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, attr):
                return float(getattr(event, attr))
        return 0.0
    return float(event.self_cpu_time_total)


def fft_share(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Share of ``cfg.fft_model``'s training-step time spent in FFT operators (``aten::_fft_*``), via torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(cfg.seed)
    model = _prepare(build_model(cfg.fft_model, cfg.num_classes, image_size=cfg.image_size), device, cfg)
    step = train_step_fn(model, cfg.batch_size, cfg.image_size, device, cfg.amp, cfg.channels_last, cfg.num_classes)
    step()  # warm-up outside the profile
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(cfg.profile_iters):
            step()
        _sync(device)
    wall = time.perf_counter() - started
    fft_us, total_us, per_op, all_ops = 0.0, 0.0, {}, {}
    for event in prof.key_averages():
        if getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue  # kernels: their time is already the self device time of the operator that launched them
        t = _self_time(event, device)
        total_us += t
        all_ops[event.key] = all_ops.get(event.key, 0.0) + t / 1000 / cfg.profile_iters
        if event.key.startswith("aten::_fft_"):
            fft_us += t
            per_op[event.key] = per_op.get(event.key, 0.0) + t / 1000 / cfg.profile_iters
    top = sorted(all_ops.items(), key=lambda kv: kv[1], reverse=True)[:cfg.top_ops]
    del model
    return {"fft_share": fft_us / total_us if total_us > 0 else math.nan,
            "fft_ms_per_step": fft_us / 1000 / cfg.profile_iters,
            "profiled_op_ms_per_step": total_us / 1000 / cfg.profile_iters,
            "profiled_wall_ms_per_step": 1000 * wall / cfg.profile_iters,
            "fft_ms_per_op": per_op, "model": cfg.fft_model, "profile_iters": cfg.profile_iters,
            "top_ops_ms_per_step": [{"op": k, "ms": v} for k, v in top if v > 0],
            "time_basis": "self device time of operators" if device.type == "cuda" else "self CPU time of operators"}


def size_scaling(cfg: BenchConfig, device: torch.device) -> list[dict[str, Any]]:
    """Training time per image and forward MACs of ``cfg.scale_model`` per image size, relative to the first size."""
    batch = cfg.scale_batch or cfg.batch_size
    rows = []
    for size in cfg.scale_sizes:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.scale_model, cfg.num_classes, image_size=size)
        macs = count_macs(model, size)
        model = _prepare(model, device, cfg)
        sec = _timed(train_step_fn(model, batch, size, device, cfg.amp, cfg.channels_last, cfg.num_classes),
                     cfg.warmup, cfg.iters, device)
        rows.append({"image_size": size, "ms_per_img": 1000 * sec / batch, "gmacs": macs / 1e9, "batch_size": batch})
        del model
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["ms_per_img"] / base["ms_per_img"]
        row["mac_ratio"] = row["gmacs"] / base["gmacs"]
    return rows


def _concurrent_run(cfg: BenchConfig, device: str, threads: int | None, start: Any) -> float:
    """One of several training processes on one device: warm up, wait for the others, time the fixed steps."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = _prepare(build_model(cfg.concurrency_model, cfg.num_classes, image_size=cfg.concurrency_size), dev, cfg)
    step = train_step_fn(model, cfg.batch_size, cfg.concurrency_size, dev, cfg.amp, cfg.channels_last, cfg.num_classes)
    for _ in range(cfg.warmup):
        step()
    _sync(dev)
    start.wait(timeout=600)  # every process starts its timed steps together
    began = time.perf_counter()
    for _ in range(cfg.concurrency_steps):
        step()
    _sync(dev)
    return time.perf_counter() - began


def concurrency_throughput(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    """Training images/s of 1 and of each of ``cfg.concurrency`` processes at once on ``device``, and the ratio to 1.

    Each of ``runs`` processes (``spawn``, a pool of as many as the largest count) builds the model and takes
    ``cfg.concurrency_steps`` training steps of :func:`train_step_fn` after ``cfg.warmup``; they start the timed
    steps together (a barrier, so each of them is a process of its own). ``img_s`` is all their images over the
    time to the last one's finish; ``img_s_per_run`` the mean of each process's own rate. On a CPU each process
    gets cores / processes threads (as a ``cpu`` slot of ``--devices``).
    """
    ctx = get_context("spawn")
    counts = sorted({1, *cfg.concurrency})
    images = cfg.concurrency_steps * cfg.batch_size
    rows = []
    with ctx.Manager() as manager, ProcessPoolExecutor(counts[-1], mp_context=ctx) as pool:
        for runs in counts:
            threads = cpu_threads([CPU] * runs) if device.type == "cpu" else None
            start = manager.Barrier(runs)
            seconds = [f.result() for f in [pool.submit(_concurrent_run, cfg, str(device), threads, start)
                                            for _ in range(runs)]]
            rows.append({"runs": runs, "threads_per_run": threads, "img_s": runs * images / max(seconds),
                         "img_s_per_run": float(np.mean([images / s for s in seconds])), "seconds": max(seconds)})
    for row in rows:
        row["ratio"] = row["img_s"] / rows[0]["img_s"]
    return {"model": cfg.concurrency_model, "image_size": cfg.concurrency_size, "batch_size": cfg.batch_size,
            "steps": cfg.concurrency_steps, "warmup": cfg.warmup, "rows": rows}


def pipeline_throughput(cfg: BenchConfig, device: torch.device, augment: str = "none") -> float:
    """Images/s of training batches made ready on the device from a uint8 cache (gather + normalize), augmented
    as ``--augment`` does it (:mod:`ussf_lib.training.recipe`) unless ``augment`` is ``none``."""
    rng = np.random.default_rng(cfg.seed)
    images = rng.integers(0, 256, size=(cfg.pipeline_images, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    cache = DeviceImages(images, device)
    batch = min(cfg.batch_size, cfg.pipeline_images)
    # Indices and constants placed as train_fold places them: on the device when the cache is there.
    index_device = device if cache.on_device else torch.device("cpu")
    orders = [torch.as_tensor(rng.permutation(cfg.pipeline_images)[:batch], device=index_device)
              for _ in range(cfg.pipeline_iters + cfg.warmup)]
    mean, std = normalization_on(device, PAPER_MEAN, PAPER_STD)
    it = iter(orders)
    aug = recipe.make_augment(augment, cfg.image_size)

    def step() -> None:
        raw = cache.batch(next(it))
        x = (normalize_batch(raw, mean, std, cfg.channels_last) if aug is None
             else recipe.augment_batch(aug, raw, mean, std, cfg.channels_last, seed=cfg.seed))
        x.sum()  # touch the result so lazy work is done inside the timing

    sec = _timed(step, cfg.warmup, cfg.pipeline_iters, device)
    return batch / sec


def loop_throughput(name: str, cfg: BenchConfig, device: torch.device) -> dict[str, float]:
    """Training images/s of :func:`~ussf_lib.training.loop.train_fold` itself on synthetic cached images: batches gathered
    and normalized on the device, the per-step checks, the loss bookkeeping; the median of the epochs after
    the first (``train_seconds`` of its history, so the evaluation of the test images is not counted)."""
    rng = np.random.default_rng(cfg.seed)
    n_train = cfg.loop_batches * cfg.batch_size
    images = rng.integers(0, 256, size=(n_train + cfg.batch_size, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    targets = np.arange(len(images)) % cfg.num_classes
    torch.manual_seed(cfg.seed)
    model = build_model(name, cfg.num_classes, image_size=cfg.image_size)
    train_cfg = TrainConfig(epochs=cfg.loop_epochs, batch_size=cfg.batch_size, amp=cfg.amp,
                            channels_last=cfg.channels_last, compile=cfg.compile, compile_backend=cfg.compile_backend,
                            compile_scope=cfg.compile_scope, compile_mode=cfg.compile_mode, seed=cfg.seed,
                            progress=False)
    result = train_fold(model, images, targets, np.arange(n_train), np.arange(n_train, len(images)), train_cfg,
                        PAPER_MEAN, PAPER_STD, device=device, log=lambda _: None)
    seconds = float(np.median(result.history["train_seconds"].iloc[1:]))
    del model
    return {"loop_img_s": n_train / seconds, "loop_epoch_train_s": seconds, "loop_images": n_train}


def checkpoint_write(name: str, cfg: BenchConfig, device: torch.device) -> dict[str, float]:
    """Median seconds to write one training checkpoint of ``name`` (weights and Adam's moments, from the device,
    by :func:`~ussf_lib.training.checkpoints.atomic_save` into a temporary folder, deleted afterwards), the median seconds of
    the host copy that is all training waits for when :class:`~ussf_lib.training.checkpoints.CheckpointWriter` writes in
    the background, and the file's megabytes."""
    torch.manual_seed(cfg.seed)
    model = build_model(name, cfg.num_classes, image_size=cfg.image_size).to(device)
    optimizer = make_optimizer(model, 1e-3, (0.9, 0.999), 1e-4, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates Adam's moments, which every checkpoint of a training run carries

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    warmup = min(cfg.warmup, 1)
    with tempfile.TemporaryDirectory(prefix="ussf_bench_") as folder:
        path = Path(folder) / "checkpoint.pt"
        write_s = _timed(lambda: atomic_save(state(), path), warmup, cfg.checkpoint_iters, device)
        megabytes = path.stat().st_size / 1e6
    snapshot_s = _timed(lambda: host_snapshot(state()), warmup, cfg.checkpoint_iters, device)
    del model, optimizer
    return {"seconds": write_s, "snapshot_seconds": snapshot_s, "mb": megabytes}


def protocol_estimate(train_img_s: float, infer_img_s: float, checkpoint_s: float, snapshot_s: float | None = None,
                      images: int = int(PAPER_DATASET["images"]),  # type: ignore[call-overload]
                      folds: int = int(PAPER_PROTOCOL["folds"]), epochs: int = int(PAPER_PROTOCOL["epochs"]),
                      intervals: Sequence[tuple[int, int]] = PROTOCOL_INTERVALS) -> list[dict[str, Any]]:
    """Minutes of a ``folds`` x ``epochs`` cross-validation on ``images`` images at the measured rates, per
    ``(eval_every, checkpoint_every)``: training on (k-1)/k of the images every epoch, evaluation of the other
    1/k every ``eval_every`` epochs and a checkpoint every ``checkpoint_every`` epochs (both also after the last).

    A checkpoint costs ``checkpoint_s`` (the write) when written in the training loop; with ``snapshot_s`` it is
    written in the background, so training waits for the host copy and for whatever part of the write is not
    done by the next checkpoint.
    """
    test = images / folds
    train = images - test
    epoch_s = train / train_img_s
    rows = []
    for eval_every, checkpoint_every in intervals:
        evals, writes = math.ceil(epochs / eval_every), math.ceil(epochs / checkpoint_every)
        wait_s = checkpoint_s if snapshot_s is None else snapshot_s + max(0.0, checkpoint_s - checkpoint_every * epoch_s)
        seconds = folds * (epochs * epoch_s + evals * test / infer_img_s + writes * wait_s)
        rows.append({"eval_every": eval_every, "checkpoint_every": checkpoint_every, "evaluations": evals,
                     "checkpoints": writes, "minutes": seconds / 60})
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_avg() -> list[float] | None:
    """1/5/15-minute load averages (how busy a shared machine was), None where unavailable."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_avg_start": _load_avg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run_bench(cfg: BenchConfig | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure everything the module docstring lists; returns the JSON-ready result (see ``docs/performance.md``)."""
    cfg = cfg or BenchConfig()
    device = select_device(cfg.device)
    started = time.perf_counter()
    result: dict[str, Any] = {**machine_info(device), "config": dataclasses.asdict(cfg), "models": {}}
    for name in cfg.models:
        log(f"bench: {name} at {cfg.image_size} px, batch {cfg.batch_size} ...")
        result["models"][name] = bench_model(name, cfg, device)
    if cfg.fft_model:
        log(f"bench: profiling the FFT share of {cfg.fft_model} ...")
        fft = fft_share(cfg, device)
        result["fft"] = fft
        result["fft_share"] = fft["fft_share"]
    if cfg.scale_model:
        log(f"bench: {cfg.scale_model} at {', '.join(map(str, cfg.scale_sizes))} px ...")
        result["scaling"] = size_scaling(cfg, device)
    log("bench: data pipeline ...")
    result["pipeline_img_s"] = pipeline_throughput(cfg, device)
    ref = "us_sfnet" if "us_sfnet" in result["models"] else cfg.models[0]
    result["pipeline_reference_model"] = ref
    result["pipeline_ratio"] = result["pipeline_img_s"] / result["models"][ref]["train_img_s"]
    result["pipeline_target_ratio"] = PIPELINE_TARGET_RATIO
    log("bench: data pipeline with --augment ultrasound ...")
    result["pipeline_augmented_img_s"] = pipeline_throughput(cfg, device, augment="ultrasound")
    result["pipeline_augmented_ratio"] = result["pipeline_augmented_img_s"] / result["models"][ref]["train_img_s"]
    train_rate = result["models"][ref]["train_img_s"]
    if cfg.loop_batches:
        log(f"bench: {ref}'s training loop, {cfg.loop_epochs} epochs of {cfg.loop_batches} batches ...")
        result["loop"] = {"model": ref, **loop_throughput(ref, cfg, device)}
        result["loop"]["ratio_to_step"] = result["loop"]["loop_img_s"] / train_rate
        train_rate = result["loop"]["loop_img_s"]
    if cfg.checkpoint_iters:
        log(f"bench: writing {ref}'s checkpoint ...")
        ckpt = checkpoint_write(ref, cfg, device)
        m = result["models"][ref]
        result["protocol"] = {"model": ref, "checkpoint_s": ckpt["seconds"], "snapshot_s": ckpt["snapshot_seconds"],
                              "checkpoint_mb": ckpt["mb"],
                              "images": int(PAPER_DATASET["images"]),  # type: ignore[call-overload]
                              "folds": int(PAPER_PROTOCOL["folds"]), "epochs": int(PAPER_PROTOCOL["epochs"]),
                              "train_rate": "loop" if "loop" in result else "step",
                              "rows": protocol_estimate(train_rate, m["infer_img_s"], ckpt["seconds"],
                                                        ckpt["snapshot_seconds"])}
    if cfg.concurrency:
        log(f"bench: {', '.join(map(str, sorted({1, *cfg.concurrency})))} {cfg.concurrency_model} training "
            f"processes at once at {cfg.concurrency_size} px ...")
        result["concurrency"] = concurrency_throughput(cfg, device)
    result["peak_mem_mb"] = peak_memory_mb(device)
    result["peak_mem_kind"] = ("torch.cuda.max_memory_allocated (per model: since that model started)"
                               if device.type == "cuda" else "process peak RSS (resource.getrusage ru_maxrss)")
    result["seconds"] = time.perf_counter() - started
    result["load_avg_end"] = _load_avg()
    return result


def format_bench(result: dict[str, Any]) -> str:
    """The result as markdown tables (what ``ussf bench`` prints)."""
    cfg = result["config"]
    flags = f"amp {cfg['amp']}, channels_last {cfg['channels_last']}"
    if cfg.get("compile"):  # JSON files written before --compile-scope existed compiled the whole model
        flags += f", compiled ({cfg.get('compile_scope', 'model')}, mode {cfg.get('compile_mode', 'default')})"
    head = (f"device {result['device']}" + (f" ({result['gpu']})" if result.get("gpu") else f" ({result['cpu']}, "
            f"{result['torch_threads']} threads)") + f", torch {result['torch']}, {flags}, {result['date']}"
            + (f", load average {result['load_avg_start'][0]} at start" if result.get("load_avg_start") else ""))
    rows = [{"model": name, "train img/s": f"{m['train_img_s']:.1f}", "infer img/s": f"{m['infer_img_s']:.1f}",
             "GMACs/img": f"{m['gmacs']:.3f}", "train GMAC/s": f"{m['train_gmac_s']:.1f}",
             "infer GMAC/s": f"{m['infer_gmac_s']:.1f}", "params (M)": f"{m['params_m']:.1f}",
             "peak mem (MB)": f"{m['peak_mem_mb']:.0f}"} for name, m in result["models"].items()]
    parts = [head, "", f"## Throughput at {cfg['image_size']} px (train batch {cfg['batch_size']}, "
             f"median of {cfg['iters']} timed steps after {cfg['warmup']} warm-up)", "", pd.DataFrame(rows).to_markdown(index=False)]
    if "fft" in result:
        fft = result["fft"]
        parts += ["", f"FFT share of {fft['model']}'s training step: {100 * fft['fft_share']:.1f}% "
                  f"({fft['fft_ms_per_step']:.1f} of {fft['profiled_op_ms_per_step']:.1f} ms, {fft['time_basis']}; "
                  f"{fft['profiled_wall_ms_per_step']:.1f} ms wall per step under the profiler)"]
        top = fft.get("top_ops_ms_per_step") or []
        if top:
            parts += ["", f"Where the step's time goes (top {len(top)} operators by {fft['time_basis']}, ms per step):",
                      "", pd.DataFrame([{"operator": t["op"], "ms": f"{t['ms']:.2f}",
                                         "share": f"{100 * t['ms'] / fft['profiled_op_ms_per_step']:.1f}%"}
                                        for t in top]).to_markdown(index=False)]
    if "scaling" in result:
        srows = [{"image size": r["image_size"], "ms/img (train)": f"{r['ms_per_img']:.2f}",
                  "time ratio": f"{r['time_ratio']:.2f}", "GMACs/img": f"{r['gmacs']:.3f}",
                  "MAC ratio": f"{r['mac_ratio']:.2f}"} for r in result["scaling"]]
        parts += ["", f"## Cost growth with image size ({cfg['scale_model']}, batch {result['scaling'][0]['batch_size']})",
                  "", pd.DataFrame(srows).to_markdown(index=False)]
    if "loop" in result:
        loop = result["loop"]
        parts += ["", f"Training loop (train_fold, {loop['loop_images']} cached images an epoch): "
                  f"{loop['loop_img_s']:.1f} img/s = {loop['ratio_to_step']:.2f} × {loop['model']}'s training step alone"]
    if "protocol" in result:
        proto = result["protocol"]
        prows = [{"--eval-every": r["eval_every"], "--checkpoint-every": r["checkpoint_every"],
                  "minutes": f"{r['minutes']:,.1f}"} for r in proto["rows"]]
        rate = "the training loop's" if proto.get("train_rate") == "loop" else "the training step's"
        parts += ["", f"## Paper protocol estimate ({proto['model']}: {proto['folds']} folds x {proto['epochs']} epochs "
                  f"on {proto['images']:,} images at {rate} and inference rates above; compilation not included)", "",
                  pd.DataFrame(prows).to_markdown(index=False), "",
                  f"One checkpoint (weights + Adam's moments, {proto['checkpoint_mb']:.0f} MB) takes "
                  f"{proto['checkpoint_s']:.2f} s to write to the temporary folder; training waits "
                  f"{proto['snapshot_s']:.2f} s for its copy to the host, and the write goes on in the background."]
    if "concurrency" in result:
        conc = result["concurrency"]
        crows = [{"runs at once": r["runs"], "threads/run": r["threads_per_run"] or "-",
                  "img/s (all runs)": f"{r['img_s']:.1f}", "img/s per run": f"{r['img_s_per_run']:.1f}",
                  "× 1 run": f"{r['ratio']:.2f}"} for r in conc["rows"]]
        parts += ["", f"## Several runs on one device ({conc['model']} at {conc['image_size']} px, train batch "
                  f"{conc['batch_size']}, {conc['steps']} timed steps per process after {conc['warmup']} warm-up)", "",
                  pd.DataFrame(crows).to_markdown(index=False)]
    ok = "meets" if result["pipeline_ratio"] >= result["pipeline_target_ratio"] else "below"
    parts += ["", f"Data pipeline: {result['pipeline_img_s']:.0f} img/s = {result['pipeline_ratio']:.1f} × "
              f"{result['pipeline_reference_model']} training ({ok} the {result['pipeline_target_ratio']:.0f}× target)",
              f"Data pipeline with --augment ultrasound: {result['pipeline_augmented_img_s']:.0f} img/s = "
              f"{result['pipeline_augmented_ratio']:.1f} × {result['pipeline_reference_model']} training ("
              + ("meets" if result["pipeline_augmented_ratio"] >= result["pipeline_target_ratio"] else "below")
              + f" the {result['pipeline_target_ratio']:.0f}× target)",
              f"Peak memory: {result['peak_mem_mb']:.0f} MB ({result['peak_mem_kind']}); total {result['seconds']:.0f} s"]
    return "\n".join(parts)


def bench_config_from(quick: bool = False, **overrides: Any) -> BenchConfig:
    """A :class:`BenchConfig`: the full defaults, or :data:`QUICK` with ``quick``; ``None`` overrides are ignored."""
    values: dict[str, Any] = dict(QUICK) if quick else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**values)


__all__: Sequence[str] = ["BenchConfig", "QUICK", "PIPELINE_TARGET_RATIO", "run_bench", "format_bench",
                          "bench_config_from", "bench_model", "fft_share", "size_scaling", "pipeline_throughput",
                          "train_step_fn", "infer_step_fn", "peak_memory_mb", "machine_info", "checkpoint_write",
                          "protocol_estimate", "PROTOCOL_INTERVALS", "loop_throughput",
                          "concurrency_throughput"]

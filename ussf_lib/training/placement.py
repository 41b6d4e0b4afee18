"""Place independent runs on devices: one worker process per ``--devices`` entry, pinned for life.

``ussf sweep --devices 0,1`` and ``ussf compare --devices 0,1,2,3`` (and ``compare(..., devices=...)`` in
``notebooks/06_compare_baselines.ipynb``) hand their runs to :func:`run_placed`. Introduced by notebook 06 and
docs/multi-gpu-and-sweeps.md.

An entry is a GPU id (``0``, ``1``, ... as this process numbers its visible GPUs) or ``cpu``: one slot that
runs one job at a time, so ``cpu,cpu`` runs two at once on the CPU and ``0,0,1,1`` two at once on each of GPUs 0
and 1. Each worker takes one entry when it starts and keeps it: it sets ``CUDA_VISIBLE_DEVICES`` to that GPU
alone (``""`` for ``cpu``) before anything in it touches CUDA, so inside the worker, and in any notebook kernel
it starts, device ``auto`` is ``cuda:0`` and that is the pinned GPU. The entry is recorded in
``USSF_PLACED_DEVICE`` (``environment.json`` keeps it).

This pool is the default ``--engine local``. ``--engine ray`` (:mod:`ussf_lib.training.ray_engine`) hands the
same tasks to a Ray cluster instead, whose scheduler places them by the resources each asks for. Both exist
because Ray is an optional extra (``pip install -e '.[cluster]'``): without it this pool is what runs several
runs at once on one machine, and it needs no cluster to be started. The two share the parsing of ``--devices``,
the environment a run sees (:func:`pin_environment`) and the outcome of a task (:class:`Placed`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

from ussf_lib.errors import UserError

#: The environment variable a pinned worker (and every process it starts) finds its ``--devices`` entry in.
PLACED_ENV = "USSF_PLACED_DEVICE"
#: Thread-pool sizes a CPU slot limits (read by torch/NumPy when they load, and by a notebook kernel it starts).
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CPU = "cpu"
#: ``--engine``: this machine's worker pool (:func:`run_placed`) or a Ray cluster (:mod:`.ray_engine`).
ENGINES = ("local", "ray")
_EMPTY = "--devices is empty; list GPU ids such as --devices 0,1, or cpu slots such as --devices cpu,cpu"

# Set in each worker by _pin: where log lines go (the parent prints them), see worker_log.
_LOG_QUEUE: Any = None


def parse_devices(spec: str | Sequence[str], cuda_count: int | None = None, check_cuda: bool = True) -> list[str]:
    """``"0,1"`` -> ``["0", "1"]`` (GPU ids), ``"cpu,cpu"`` -> ``["cpu", "cpu"]`` (two CPU slots); mixed is fine.

    A GPU listed ``k`` times runs ``k`` runs at once on it (``"0,0"``). An empty list, an entry that is neither
    ``cpu`` nor a whole number >= 0, or a GPU id this machine does not have is a :class:`UserError`.
    ``cuda_count`` is the number of visible CUDA devices (default ``torch.cuda.device_count()``, asked only when
    a GPU id is given); ``check_cuda=False`` leaves the GPU ids unchecked (a Ray cluster's GPUs are elsewhere).
    """
    tokens = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec)]
    shown = ",".join(tokens)
    if not any(tokens):
        raise UserError(_EMPTY)
    if not all(tokens):
        raise UserError(f"--devices {shown}: an entry is empty; separate GPU ids or cpu by single commas, "
                        "e.g. --devices 0,1")
    entries: list[str] = []
    for token in tokens:
        if token.lower() == CPU:
            entries.append(CPU)
            continue
        try:
            gpu = int(token)
        except ValueError:
            raise UserError(f"--devices {shown}: {token!r} is neither a GPU id (0, 1, ...) nor cpu") from None
        if gpu < 0:
            raise UserError(f"--devices {shown}: GPU ids start at 0, {token} is negative")
        entries.append(str(gpu))  # "01" and "1" are the same GPU
    gpus = sorted({e for e in entries if e != CPU}, key=int)
    if gpus and check_cuda:
        if cuda_count is None:
            import torch

            cuda_count = torch.cuda.device_count()
        if cuda_count == 0:
            slots = ",".join([CPU] * len(entries))
            how = f"to run {len(entries)} at once on the CPU" if len(entries) > 1 else "to run on the CPU"
            raise UserError(f"--devices {shown}: CUDA is not available on this machine; use --devices {slots} "
                            f"{how}, or leave --devices out")
        missing = [g for g in gpus if int(g) >= cuda_count]
        if missing:
            mask = os.environ.get("CUDA_VISIBLE_DEVICES")
            limit = f" (CUDA_VISIBLE_DEVICES={mask} limits what it sees)" if mask is not None else ""
            raise UserError(f"--devices {shown}: there is no GPU {missing[0]}; this machine sees {cuda_count} GPU(s), "
                            f"ids 0 to {cuda_count - 1}{limit}")
    return entries


def cpu_threads(devices: Sequence[str]) -> int:
    """Threads each CPU slot gets: the cores shared evenly between the ``cpu`` entries (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, sum(d == CPU for d in devices)))


def _visible_value(entry: str) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that leaves a worker only ``entry``'s GPU (``""``: no GPU).

    GPU ids count the GPUs *this* process sees; when this process is itself restricted
    (``CUDA_VISIBLE_DEVICES=2,3``), id 0 is its first visible one, "2", so the worker gets "2", not "0".
    """
    if entry == CPU:
        return ""
    mask = [m.strip() for m in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if m.strip()]
    return mask[int(entry)] if int(entry) < len(mask) else entry


def _pin(slots: Any, logs: Any, threads: int) -> None:
    """Pool initializer: take one device entry for this worker's whole life and set its environment.

    It runs before any task is unpickled, so before the task's modules import torch and before CUDA starts
    (CUDA reads ``CUDA_VISIBLE_DEVICES`` once, when it initialises).
    """
    entry, visible = slots.get()
    pin_environment(entry, visible, threads, logs)


def pin_environment(entry: str, visible: str | None, threads: int, logs: Any = None) -> None:
    """Set this process's environment for runs on ``entry``: ``CUDA_VISIBLE_DEVICES`` (left as it is when
    ``visible`` is None: Ray has set it), ``USSF_PLACED_DEVICE``, a CPU slot's ``threads``, and the queue
    (anything with ``put``) where :func:`worker_log` sends lines."""
    global _LOG_QUEUE
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    os.environ[PLACED_ENV] = entry
    if entry == CPU:
        for var in THREAD_VARS:
            os.environ[var] = str(threads)
        if "torch" in sys.modules:  # already loaded (it read OMP_NUM_THREADS then): set its pool directly
            sys.modules["torch"].set_num_threads(threads)
    _LOG_QUEUE = logs


def placed_device() -> str | None:
    """The ``--devices`` entry this process is pinned to (``"0"``, ``"cpu"``), or None outside a pinned worker."""
    return os.environ.get(PLACED_ENV)


def worker_log(prefix: str = "") -> Callable[[str], None]:
    """A ``log`` for code running in a pinned worker: each line, with ``prefix``, is printed by the parent's ``log``.

    Outside a worker it prints. (A notebook shows only its own process's output, so workers cannot print there.)
    """
    queue = _LOG_QUEUE

    def log(line: str) -> None:
        if queue is None:
            print(prefix + line, flush=True)
        else:
            queue.put(prefix + line)

    return log


@dataclass
class Placed:
    """One task's outcome: its key, the entry it ran on, its return value, or the message of its UserError."""

    key: str
    device: str | None
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _call(fn: Callable[..., Any], args: tuple) -> tuple[str | None, Any, str | None]:
    """Run one task in a worker; a UserError becomes its message so that the other tasks carry on."""
    device = placed_device()
    try:
        return device, fn(*args), None
    except UserError as exc:
        return device, None, str(exc)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel waiting tasks and end running ones (after Ctrl-C, or a notebook interrupt that reaches only us)."""
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    # No public way before 3.14; taken before shutdown(), which drops the executor's list of its processes.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)


def run_placed(tasks: Sequence[tuple[str, Callable[..., Any], tuple]], devices: Sequence[str],
               log: Callable[[str], None] = print, on_done: Callable[[Placed], None] | None = None) -> list[Placed]:
    """Run independent ``(key, fn, args)`` tasks in worker processes, one per entry of ``devices``, each pinned.

    ``fn`` and ``args`` must be picklable (a module-level function). A free worker takes the next task, so an
    entry never holds two runs at once. Lines a task logs through :func:`worker_log` reach ``log`` here;
    ``on_done`` is called with each :class:`Placed` as it finishes. A task that raises :class:`UserError` is
    reported in its ``Placed.error`` and the others go on; any other exception stops the tasks not yet started,
    waits for the running ones and is raised. Ctrl-C ends the workers (their runs can be resumed). Returns the
    outcomes in task order.
    """
    devices = list(devices)
    if not devices:
        raise UserError(_EMPTY)
    if len({key for key, _, _ in tasks}) < len(tasks):
        raise ValueError("run_placed: task keys must be unique")
    ctx = get_context("spawn")  # a fresh interpreter per worker: no CUDA state inherited from this process
    slots, logs = ctx.SimpleQueue(), ctx.SimpleQueue()  # SimpleQueue.put writes at once: no line is left behind
    for entry in devices:
        slots.put((entry, _visible_value(entry)))
    outcomes: dict[str, Placed] = {}

    def drain() -> None:
        while not logs.empty():
            log(logs.get())

    # No max_tasks_per_child: a replacement worker would find no entry left to take.
    pool = ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx, initializer=_pin,
                               initargs=(slots, logs, cpu_threads(devices)))
    try:
        pending: dict[Future, str] = {pool.submit(_call, fn, tuple(args)): key for key, fn, args in tasks}
        failure: BaseException | None = None
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                key = pending.pop(future)
                if future.cancelled():
                    continue
                if future.exception() is not None:
                    if failure is None:
                        failure = future.exception()
                        for other in pending:  # tasks not started yet are dropped; running ones finish
                            other.cancel()
                    continue
                device, value, error = future.result()
                outcomes[key] = Placed(key, device, value, error)
                if on_done is not None:
                    on_done(outcomes[key])
        drain()
        if failure is not None:
            raise failure
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    return [outcomes[key] for key, _, _ in tasks if key in outcomes]

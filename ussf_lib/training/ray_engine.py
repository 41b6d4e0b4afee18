"""``--engine ray``: the runs of ``ussf sweep`` and ``ussf compare`` as Ray tasks, placed by a Ray cluster.

:func:`run_on_ray` takes the tasks that :func:`~ussf_lib.training.placement.run_placed` takes and returns the same
outcomes, so run folders, ``results.csv``, the comparison tables and what is skipped or resumed on a rerun do
not depend on the engine. Each run is one Ray task (``max_calls=1``: a fresh worker process, as a pinned local
worker is) asking for the share of a device that ``--devices`` describes:

* GPU ids: one GPU per run, or ``1/k`` of one when every id is listed ``k`` times (``0,0,1,1``: two runs per
  GPU). Ray chooses the GPU and sets ``CUDA_VISIBLE_DEVICES``; on a cluster the ids only say how many runs
  share a GPU, on a Ray instance started here they are also the GPUs it may use;
* ``cpu`` entries: ``num_cpus`` = the CPUs of the cluster's largest node / the number of ``cpu`` entries (and as
  many torch threads), so ``cpu,cpu`` runs two at once on each node of that size;
* no ``--devices``: one GPU per run when the cluster has GPUs, else one node's CPUs per run.

The cluster: the one Ray is already connected to in this process (a notebook that called ``ray.init``), else
the one ``RAY_ADDRESS`` names or ``ray start`` started on this machine (``ray.init(address="auto")``), else a Ray
instance started here for the duration of the call and stopped afterwards. Ray is an optional extra
(``pip install -e '.[cluster]'``); docs/cluster.md shows a Ray cluster and SLURM.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

from ussf_lib.errors import UserError
from ussf_lib.training.placement import CPU, Placed, _call, _visible_value, parse_devices, pin_environment

INSTALL_HINT = "pip install -e '.[cluster]'"


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`UserError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--engine ray needs Ray, which is not installed here; install it with {INSTALL_HINT}") \
            from None
    return ray


def run_resources(devices: Sequence[str] | None, node_cpus: int, has_gpus: bool) -> dict[str, float]:
    """What one run asks Ray for (``num_gpus`` and ``num_cpus``), from ``--devices``, the CPUs of the cluster's
    largest node and whether the cluster has GPUs (see the module docstring)."""
    if devices is None:
        devices = ["0"] if has_gpus else [CPU]
    shown = ",".join(devices)
    cpus = sum(d == CPU for d in devices)
    if 0 < cpus < len(devices):
        raise UserError(f"--devices {shown}: with --engine ray every run asks for the same share, so list GPU ids "
                        "or cpu slots, not both")
    if cpus:
        return {"num_cpus": max(1, node_cpus // cpus)}
    repeats = set(Counter(devices).values())
    if len(repeats) > 1:
        raise UserError(f"--devices {shown}: with --engine ray every run gets the same share of a GPU, so list "
                        "each GPU id the same number of times (e.g. 0,0,1,1: two runs per GPU)")
    return {"num_gpus": 1 / repeats.pop(), "num_cpus": 1}


def _connect(ray: Any, devices: Sequence[str] | None, log: Callable[[str], None]) -> bool:
    """Connect to the cluster (see the module docstring); True when this call did, so it must disconnect."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
    try:
        ray.init(address="auto", **quiet)
        resources = ray.cluster_resources()
        log(f"ray: connected to the running cluster ({resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs)")
        return True
    except ConnectionError as exc:
        if os.environ.get("RAY_ADDRESS"):
            raise UserError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}: no Ray cluster answers there ({exc}); start "
                            "it with `ray start --head`, or unset RAY_ADDRESS to run on a Ray instance started "
                            "here") from None
    gpus = sorted({d for d in devices or [] if d != CPU}, key=int)
    if devices is not None:
        parse_devices(devices)  # the GPU ids are checked here, where they are this machine's
        quiet["num_gpus"] = len(gpus)  # cpu slots alone: no GPU
    # A Ray instance uses the GPUs that CUDA_VISIBLE_DEVICES lists when it starts.
    visible = {"CUDA_VISIBLE_DEVICES": ",".join(_visible_value(g) for g in gpus)} if gpus else {}
    with mock.patch.dict(os.environ, visible):
        ray.init(num_cpus=os.cpu_count() or 1, **quiet)
    resources = ray.cluster_resources()
    log(f"ray: started a Ray instance here ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs); "
        "it stops when the runs are done")
    return True


def _check_fits(nodes: list[dict[str, float]], resources: dict[str, float]) -> None:
    """A run that no node of the cluster can hold would wait for ever: refuse it now."""
    wanted = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0)}
    if not any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise UserError(f"each run asks Ray for {wanted['GPU']:g} GPU and {wanted['CPU']:g} CPUs, but no node of the "
                        f"cluster has that much (the largest: {largest.get('GPU', 0):g} GPUs, "
                        f"{largest.get('CPU', 0):g} CPUs); give GPU ids in --devices only where the cluster "
                        "has GPUs")


def _ray_call(fn: Callable[..., Any], args: tuple, threads: int, logs: Any) -> tuple[str | None, Any, str | None]:
    """One run in a Ray worker: the environment a pinned local worker would have, then the task."""
    import ray

    gpus = ray.get_gpu_ids()
    if gpus:  # Ray has set CUDA_VISIBLE_DEVICES to them
        pin_environment(",".join(str(g) for g in gpus), None, threads, logs)
    else:
        pin_environment(CPU, "", threads, logs)
    return _call(fn, args)


def run_on_ray(tasks: Sequence[tuple[str, Callable[..., Any], tuple]], devices: Sequence[str] | None,
               log: Callable[[str], None] = print, on_done: Callable[[Placed], None] | None = None) -> list[Placed]:
    """Run independent ``(key, fn, args)`` tasks as Ray tasks; the contract of
    :func:`~ussf_lib.training.placement.run_placed`.

    ``fn`` must be importable on every node (a module-level function of ``ussf_lib``). A task that raises
    :class:`UserError` is reported in its ``Placed.error`` and the others go on; any other exception cancels the
    tasks still pending or running (their runs can be resumed) and is raised, as is Ctrl-C.
    """
    ray = require_ray()
    from ray.util.queue import Queue

    if len({key for key, _, _ in tasks}) < len(tasks):
        raise ValueError("run_on_ray: task keys must be unique")
    connected = _connect(ray, devices, log)
    refs: dict[Any, str] = {}
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        resources = run_resources(devices, int(max(n.get("CPU", 0) for n in nodes)), any(n.get("GPU") for n in nodes))
        _check_fits(nodes, resources)
        threads = int(resources["num_cpus"])
        logs = Queue(actor_options={"num_cpus": 0})
        remote = ray.remote(max_calls=1)(_ray_call).options(**resources)
        refs = {remote.remote(fn, tuple(args), threads, logs): key for key, fn, args in tasks}
        outcomes: dict[str, Placed] = {}

        def drain() -> None:
            for line in logs.get_nowait_batch(logs.qsize()):
                log(line)

        pending, failure = list(refs), None
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=0.2)
            drain()
            for ref in done:
                try:
                    device, value, error = ray.get(ref)
                except ray.exceptions.TaskCancelledError:
                    continue
                except Exception as exc:  # a RayTaskError is also an instance of the task's own exception
                    if failure is None:
                        failure = exc
                        for other in pending:
                            ray.cancel(other)
                    continue
                outcomes[refs[ref]] = Placed(refs[ref], device, value, error)
                if on_done is not None:
                    on_done(outcomes[refs[ref]])
        drain()
        if failure is not None:
            raise failure
        return [outcomes[key] for key, _, _ in tasks if key in outcomes]
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if connected:
            ray.shutdown()

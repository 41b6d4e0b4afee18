"""Which engine runs a set of runs: this machine's worker pool (:mod:`ussf_lib.training.placement`) or a Ray
cluster (:mod:`ussf_lib.training.ray_engine`). Its own module so that neither engine imports the other."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ussf_lib.errors import UserError
from ussf_lib.training.placement import ENGINES, Placed, run_placed


def check_engine(engine: str) -> None:
    """An unknown ``--engine``, or ``ray`` without Ray installed, is a :class:`UserError` (before any run starts)."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: use one of {', '.join(ENGINES)}")
    if engine == "ray":
        from ussf_lib.training.ray_engine import require_ray

        require_ray()


def run_tasks(tasks: Sequence[tuple[str, Callable[..., Any], tuple]], devices: Sequence[str] | None,
              engine: str = "local", log: Callable[[str], None] = print,
              on_done: Callable[[Placed], None] | None = None) -> list[Placed]:
    """:func:`run_placed` (``engine="local"``, ``devices`` required) or the same on Ray
    (:func:`~ussf_lib.training.ray_engine.run_on_ray`, ``devices`` None: Ray's default share per run)."""
    check_engine(engine)
    if engine == "ray":
        from ussf_lib.training.ray_engine import run_on_ray

        return run_on_ray(tasks, devices, log=log, on_done=on_done)
    if devices is None:
        raise ValueError("run_tasks: the local engine needs devices")
    return run_placed(tasks, devices, log=log, on_done=on_done)

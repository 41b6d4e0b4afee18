"""Shared fixtures: a small phantom dataset and the read-only BUSI copy in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BUSI = SHARED / "datasets" / "busi"
PAPER = SHARED / "paper"

# Two cores: keep torch from oversubscribing when pytest and papermill kernels run side by side.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_shared(path: Path) -> Path:
    """Skip where ../shared is absent (a user's own clone); fail under CI, where it is always present."""
    if path.exists():
        return path
    reason = f"{path} not found: ../shared (the read-only project material) is not beside this clone"
    if on_ci():
        pytest.fail(f"{reason}, but CI={os.environ['CI']} and CI always has it")
    pytest.skip(reason)


def on_ci() -> bool:
    """CI services set ``CI`` to ``true`` (GitHub, GitLab) or ``1``; an unset, empty or false-like value is not CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


@pytest.fixture
def one_thread():
    """torch on one thread for this test (bit-identical results whatever the machine), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def busi_root() -> Path:
    return require_shared(BUSI)


@pytest.fixture(scope="session")
def paper_dir() -> Path:
    return require_shared(PAPER)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """20 images per class at 32 px, 2-3 synthetic patients per class (grouped 2-fold CV is possible)."""
    from ussf_lib.data.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "data"
    generate_phantom(out, n_per_class=20, image_size=32, seed=0)
    return out

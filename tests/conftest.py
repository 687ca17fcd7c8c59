"""Shared fixtures: real data from ../shared (next to the repository, as on CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data missing: expected {SHARED_DATA} (../shared/data next to the repo)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def single_thread_torch():
    """One torch thread: on two cores shared with other jobs, two OpenMP threads run far slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

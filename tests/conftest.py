"""Shared fixtures: real data from ../shared (next to the repository, as on CI).

Test tiers (markers, registered in pyproject.toml): `workflow` (runs the Snakemake chain),
`slurm` (the SLURM profile; the cluster test needs Debian's slurm-wlm and munge), `slow` (outside
the default run: `pytest -m slow`). Select with `-m`, e.g. `pytest -m "not workflow"` while editing.

A test needs ../shared when it asks for the `shared_data` fixture or its module holds a path
inside ../shared. Where ../shared is missing those tests are skipped with the reason, unless
RLDIFF_REQUIRE_SHARED is set (CI sets it: there, missing data is an error, not a skip).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import SHARED, SHARED_DATA


def pytest_configure(config):
    # Under pytest-xdist each worker gets its share of the cores as torch/OpenMP threads (and so do the
    # subprocesses it starts): two workers with two threads each on two cores run slower than one.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


def _needs_shared(item: pytest.Item) -> bool:
    if "shared_data" in getattr(item, "fixturenames", ()):
        return True
    module = getattr(item, "module", None)
    return any(isinstance(value, Path) and value.is_relative_to(SHARED) for value in vars(module).values()) \
        if module is not None else False


# The longest files (seconds on the CI machine, whole file), run first: `--dist loadfile` hands each
# worker whole files in collection order, so a long file collected last leaves the other worker
# idle at the end. Measured with `pytest -n 0 --durations=0`; the rest follow alphabetically.
LONGEST_FIRST = ("test_workflow_demo.py", "test_workflow.py", "test_tiling_mutants.py", "test_speed_paths.py",
                 "test_multiband.py", "test_slurm_cluster.py", "test_encoders.py", "test_sampling.py",
                 "test_large_image.py", "test_resume.py", "test_autoencoder.py", "test_slurm_profile.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
    missing = [str(path) for path in (SHARED_DATA, SHARED / "fixtures") if not path.is_dir()]
    if not missing:
        return
    if os.environ.get("RLDIFF_REQUIRE_SHARED"):
        raise pytest.UsageError(f"real test data missing: {', '.join(missing)} (../shared next to the repository)")
    skip = pytest.mark.skip(reason=f"real test data missing: {', '.join(missing)} (../shared next to the repository)")
    for item in items:
        if _needs_shared(item):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="module")
def single_thread_torch():
    """One torch thread: on two cores shared with other jobs, two OpenMP threads run far slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

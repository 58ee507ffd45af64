"""Fixtures for every tier: a data cache for the session, the environment of the commands under test,
and the Slurm tests kept on one xdist worker. What tests build and run is in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Threads per process: the cores shared among pytest-xdist's workers (`make test` runs two), so
# tests side by side do not oversubscribe the CPU (OpenMP's spin-waits make that several times slower).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks to group the tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The dev Slurm cluster is one per machine: under pytest-xdist (--dist loadgroup) its tests all
    # run on one worker, in order, while the other tests share both workers.
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def env(cache_dir, tmp_path) -> dict[str, str]:
    """The environment for commands under test: a shared data cache, no wandb network, CPU."""
    e = dict(os.environ)
    e.update(CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
             WANDB_DIR=str(tmp_path))
    e.pop("WANDB_API_KEY", None)
    return e

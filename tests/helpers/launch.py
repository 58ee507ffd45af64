"""One small config through every launcher (tests/e2e/test_launch.py on one machine,
tests/slurm/test_launch.py through Slurm), held against the 1-process run of the same config: equal
within the bound tests/e2e/test_distributed.py explains (2 ranks sum gradients in another order)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cifar_dist.rundir import METRICS, RunDir
from tests.helpers import PY, TINY, read_jsonl, run

ARGS = [*TINY, "train.log_every=1", "seed=1"]


def reference_run(cache_dir: Path, run_dir: Path) -> Path:
    """ARGS trained by one plain process: the run every launcher's is compared with."""
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    run([PY, "-m", "cifar_dist.train", *ARGS, f"run.dir={run_dir}"], env)
    assert RunDir(run_dir).summary()["world_size"] == 1
    return run_dir


def assert_same_training(reference: Path, run_dir: Path) -> None:
    a = [r for r in read_jsonl(reference / METRICS) if "train_loss" in r]
    b = [r for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        rel = 1e-5 if ra["step"] <= 20 else 1e-2
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=rel, abs=1e-6), ra["step"]
    summary = RunDir(run_dir).summary()
    assert (summary["world_size"], summary["precision"]) == (2, RunDir(reference).summary()["precision"])

"""Shared fixtures: a data cache for the session, and helpers that run the real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_dist.rundir import METRICS, MODEL, RunDir, load_weights

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# Threads per process: the cores shared among pytest-xdist's workers (`make test` runs two), so
# tests side by side do not oversubscribe the CPU (OpenMP's spin-waits make that several times slower).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

# A tiny run: the blitz net on 1,280 synthetic images, 2 epochs of 64-image steps (~2 s of training).
TINY = [
    "model.name=blitz", "data.source=synthetic", "data.synthetic_train=1280", "data.synthetic_test=300",
    "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.warmup_epochs=0.5", "train.log_every=5",
    "run.progress=lines",
]


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


def run(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300, check: bool = True,
        ) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def train_cmd(*overrides: str, config: str | None = None) -> list[str]:
    return [PY, "-m", "cifar_dist.train"] + (["--config", config] if config else []) + list(overrides)


def torchrun(n: int, *args: str) -> list[str]:
    """`torchrun --nproc_per_node N ARGS` on a free port."""
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "localhost:0", *args]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights and identical records (wall-clock fields aside)."""
    import torch

    wa = load_weights(a / MODEL)["state_dict"]
    wb = load_weights(b / MODEL)["state_dict"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    assert without_timing(read_jsonl(b / METRICS)) == without_timing(read_jsonl(a / METRICS))
    sa, sb = (RunDir(d).summary() for d in (a, b))
    for key in ("test_accuracy", "confusion_matrix", "test_loss", "steps", "per_class_accuracy"):
        assert sa[key] == sb[key], key


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    """Records minus the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_second")} for r in records]


def write_image_tree(root: Path, classes: list[str], per_class: dict[str, int], suffix: str = ".jpg", seed: int = 0) -> None:
    """root/<split>/<class>/NNNN<suffix>: random 32x32 RGB images, a distinct mean colour per class."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.array([(ci * 25) % 256, (ci * 70) % 256, (255 - ci * 25) % 256])
                img = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}{suffix}")

"""A 100-class run end to end (console, summary, plots, compare, wandb, predict) and `data show`. The
cifar100 source and statistics computed from the data, in-process: tests/unit/test_cifar100.py."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_dist.compare import CONFUSION_PNG, CURVES_PNG, PER_CLASS_PNG, confusion_grid
from cifar_dist.rundir import CLASS_PLOT, MODEL, RunDir, load_weights
from cifar_dist.sources import CIFAR10_STATS
from tests.helpers import PY, TINY, run, train_cmd
from tests.helpers.wandb_records import history

HUNDRED = [*TINY, "data.synthetic_classes=100", "data.synthetic_train=2000", "data.synthetic_test=500",
           "train.batch_size=100", "train.log_every=10"]


@pytest.fixture(scope="module")
def hundred(tmp_path_factory, cache_dir):
    """Two finished 100-class runs (wandb offline in the first) and their console output."""
    import os

    root = tmp_path_factory.mktemp("hundred")
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_DIR=str(root))
    env.pop("WANDB_API_KEY", None)
    first = run(train_cmd(*HUNDRED, f"run.dir={root / 'a'}", "tracking.backend=wandb", "tracking.log_images=4"), env)
    run(train_cmd(*HUNDRED, f"run.dir={root / 'b'}", "seed=1", "train.epochs=1"), env)
    return root, first.stdout


def test_a_hundred_classes_print_a_summary_and_the_best_and_worst(hundred):
    root, stdout = hundred
    summary = RunDir(root / "a").summary()
    per_class = summary["per_class_accuracy"]
    assert len(per_class) == 100 and np.array(summary["confusion_matrix"]).shape == (100, 100)
    final = stdout[stdout.rindex("\nepoch 2  step 40  test accuracy"):].splitlines()[2:]  # after the accuracy line
    values = sorted(per_class.values())
    assert final[0] == (f"  100 classes: per-class accuracy mean {np.mean(values):.2%}, median {np.median(values):.2%}, "
                        f"{values.count(0.0)} at 0%; the 5 best and the 5 worst:")
    ranked = sorted(per_class, key=lambda c: -per_class[c])  # stable: ties stay in class order
    shown = [line.split()[0] for line in final[1:12]]
    assert shown == ranked[:5] + ["..."] + ranked[-5:]
    assert sum(line.startswith("  class") for line in final) == 10  # and no 100-line table


def test_a_hundred_classes_plots_compare_and_wandb(hundred, env, tmp_path):
    root, _ = hundred
    with Image.open(root / "a" / CLASS_PLOT) as im:
        assert im.size[0] > 1500 and len(im.convert("L").getcolors()) > 10  # wide enough for 100 labels
    proc = run([PY, "-m", "cifar_dist.cli", "compare", str(root / "a"), str(root / "b"), "--out", str(tmp_path)], env)
    blocks = proc.stdout.split("\n\n")
    lines = blocks[1].splitlines()
    assert lines[0] == "per-class test accuracy (final evaluation), 100 classes, best first by the mean over runs"
    assert lines[1].split() == ["class", "a", "b"] and len(lines) == 102  # a row per class
    a, b = (RunDir(root / k).summary()["per_class_accuracy"] for k in "ab")
    means = [(a[c] + b[c]) / 2 for c in (line.split()[0] for line in lines[2:])]
    assert means == sorted(means, reverse=True) and sorted(line.split()[0] for line in lines[2:]) == sorted(a)
    rows, cols, panel = confusion_grid(2, 100, len("class00"))
    assert (rows, cols) == (1, 2) and panel == pytest.approx(11.315) and confusion_grid(5, 100, 7)[:2] == (3, 2)
    confusion = (100 * panel * cols, 100 * panel * rows)
    for name, size in ((CURVES_PNG, None), (PER_CLASS_PNG, (1800, 500)), (CONFUSION_PNG, confusion)):
        with Image.open(tmp_path / name) as im:
            assert size is None or np.abs(np.subtract(im.size, size)).max() <= 1, (name, im.size)  # pixels, rounded
            assert len(im.convert("L").getcolors()) > 10, f"{name} is blank"

    # wandb: a key per class and a per-class table, as wandb itself recorded them.
    (log,) = [Path(p) for p in glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))]  # WANDB_DIR=root
    evals = [row for row in history(log) if "test/accuracy" in row]
    assert len(evals) == 2 and all({f"test/acc/{c}" for c in a} <= row.keys() for row in evals)
    table = json.loads((log.parent / "files" / evals[-1]["test/per_class/path"]).read_text())
    assert table["columns"] == ["class", "accuracy", "correct", "images"] and len(table["data"]) == 100
    confusion = np.array(RunDir(root / "a").summary()["confusion_matrix"])
    assert [row[0] for row in table["data"]] == list(a) and [row[1] for row in table["data"]] == list(a.values())
    assert [row[2] for row in table["data"]] == confusion.diagonal().tolist()
    assert [row[3] for row in table["data"]] == confusion.sum(1).tolist()


def test_a_hundred_class_model_predicts_with_its_own_statistics(hundred, env, tmp_path):
    root, _ = hundred
    weights = load_weights(root / "a" / MODEL)
    assert len(weights["classes"]) == 100 and tuple(weights["mean"]) != CIFAR10_STATS.mean
    Image.new("RGB", (40, 30), (20, 140, 220)).save(tmp_path / "x.jpg")
    proc = run([PY, "-m", "cifar_dist.cli", "predict", "--checkpoint", str(root / "a"), str(tmp_path / "x.jpg"),
                "--json", "--top-k", "5"], env)
    (result,) = json.loads(proc.stdout)
    assert len(result["top"]) == 5 and all(t["class"] in weights["classes"] for t in result["top"])


def test_data_show_draws_what_the_net_sees(tmp_path, env):
    shown = tmp_path / "grid.png"
    base = [PY, "-m", "cifar_dist.cli", "data", "show", "--config", "debug", "data.synthetic_train=500",
            "data.synthetic_test=100"]
    proc = run([*base, "--out", str(shown), "data.cutout=8"], env)
    assert proc.stdout.strip().endswith(f"{shown}: 6 training images per class for 10 classes")
    with Image.open(shown) as im:
        assert im.format == "PNG" and len(im.convert("RGB").getcolors(2**20)) > 1000
    hundred = tmp_path / "grid100.png"
    run([*base, "data.synthetic_classes=100", "--per-class", "4", "--epoch", "3", "--out", str(hundred)], env)
    with Image.open(hundred) as big, Image.open(shown) as small:
        assert big.size[0] * big.size[1] > 4 * small.size[0] * small.size[1]
    bad = run([*base, "--out", str(tmp_path / "grid.jpg")], env, check=False)
    assert bad.returncode == 2 and bad.stderr == f"error: data show: --out must name a .png file, got {tmp_path / 'grid.jpg'}\n"

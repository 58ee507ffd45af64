"""Gradient accumulation, clipping and the LR range test on real gloo ranks (torchrun): N ranks
equal one rank, as tests/test_distributed.py shows for plain training, and k micro-batches equal
one batch. The blitz net has no BatchNorm and no dropout, so the runs differ by float summation
order only (a micro-batch's or a rank's BatchNorm statistics would be its own)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from cifar_dist.rundir import METRICS, MODEL, RunDir, load_weights
from tests.helpers import PY, TINY, read_jsonl, run, torchrun

STEP_BY_STEP = [*TINY, "train.log_every=1"]  # a record per step: 40 steps over 2 epochs
CLIP = "train.clip_grad_norm=0.2"  # below these runs' norms from the first step on (seen: 0.2 to 0.4, then up to 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """1 rank; 1 rank with 4 micro-batches; 2 ranks with 4 micro-batches each (8 of 8 images);
    1 rank clipped; 2 ranks clipped."""
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    root = tmp_path_factory.mktemp("options")
    plain = [PY, "-m", "cifar_dist.train"]
    for name, launch, extra in (("one", plain, []), ("one_acc4", plain, ["train.accumulate=4"]),
                                ("two_acc4", torchrun(2, "-m", "cifar_dist.train"), ["train.accumulate=4"]),
                                ("one_clip", plain, [CLIP]), ("two_clip", torchrun(2, "-m", "cifar_dist.train"), [CLIP])):
        run([*launch, *STEP_BY_STEP, *extra, f"run.dir={root / name}"], env)
    return root


def losses(run_dir) -> list[dict]:
    return [r for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]


def assert_same_training(a, b) -> None:
    """The bound of tests/test_distributed.py: each step's loss to 1e-5 in the first epoch (a wrong
    gradient, summed instead of averaged or from part of the batch, is off from the second step on),
    1e-2 in the second (float rounding grows with training), and the final weights to 1e-2. A
    gradient norm, a root of a sum of squares of summed gradients, rounds more: 1e-3 in the first
    epoch (seen: 7e-5); a norm of one rank's half of the batch would be off by about a third."""
    ra, rb = losses(a), losses(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, 41))
    for x, y in zip(ra, rb):
        rel = 1e-5 if x["step"] <= 20 else 1e-2
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=rel, abs=1e-6), x["step"]
        assert y["lr"] == x["lr"]
        if "grad_norm" in x:
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=max(rel, 1e-3)), x["step"]
    wa, wb = load_weights(a / MODEL)["state_dict"], load_weights(b / MODEL)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-2, atol=5e-3)


def test_four_micro_batches_train_as_one_batch_on_one_rank_and_on_two(runs):
    assert_same_training(runs / "one", runs / "one_acc4")
    assert_same_training(runs / "one", runs / "two_acc4")
    assert RunDir(runs / "two_acc4").summary()["world_size"] == 2


def test_clipped_training_on_two_ranks_equals_one_rank(runs):
    """The norm is the global batch's on every rank (taken after DDP's all-reduce), so both clip alike;
    the norms go in metrics.jsonl."""
    clipped = losses(runs / "one_clip")
    assert all("grad_norm" in r for r in clipped) and not any("grad_norm" in r for r in losses(runs / "one"))
    # Clipping acted in the first epoch too, where the comparison below is tight.
    assert sum(r["grad_norm"] > 0.2 for r in clipped[:20]) >= 15
    assert_same_training(runs / "one_clip", runs / "two_clip")
    # ... and changed the training: the unclipped run's losses part from the clipped run's.
    assert max(abs(u["train_loss"] - c["train_loss"]) for u, c in zip(losses(runs / "one"), clipped)) > 0.05


def test_lr_find_traces_the_same_curve_on_one_and_two_ranks(env, tmp_path):
    env["OMP_NUM_THREADS"] = "1"
    args = ["-m", "cifar_dist.lr_find", "--config", "debug", "--steps", "40", "--start-lr", "1e-4", "--end-lr", "30",
            "data.synthetic_train=1024", "train.batch_size=64"]
    one = run([PY, *args, "--out", str(tmp_path / "one")], env)
    two = run(torchrun(2, *args, "--out", str(tmp_path / "two")), env)
    a, b = (json.loads((tmp_path / d / "lr_find.json").read_text()) for d in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    # The same LRs, stopped at the same step (or the next: the divergence test on rounded losses).
    m = min(len(a["lr"]), len(b["lr"]))
    assert b["lr"][:m] == a["lr"][:m] and abs(len(a["lr"]) - len(b["lr"])) <= 1
    n = m // 2
    assert b["loss"][:n] == pytest.approx(a["loss"][:n], rel=1e-4)  # the first half; float order grows after
    growth = (30 / 1e-4) ** (1 / 39)  # per step
    assert abs(math.log(b["suggested_lr"] / a["suggested_lr"])) <= 2 * math.log(growth) + 1e-9
    assert a["suggested_lr"] == pytest.approx(a["lowest_at_lr"] / 10)
    assert 1e-4 <= a["suggested_lr"] < 30 and (tmp_path / "one" / "lr_find.png").stat().st_size > 10_000
    # What it prints: the suggestion and the command line that uses it; the second rank prints nothing.
    line = one.stdout.strip().splitlines()[-1].strip()
    assert line == ("cifar-dist train --config debug data.synthetic_train=1024 train.batch_size=64 "
                    f"train.lr={a['suggested_lr']:.3g}")
    assert two.stdout.count("suggested peak lr") == 1

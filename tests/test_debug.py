"""Single-GPU local debugging: overfitting a batch, the first non-finite layer named by
`train.detect_anomaly` with nothing invalid written, and a profile of a few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, assert_same_run, read_jsonl, run, train_cmd
from torch import nn

from cifar_dist import checkpoint, models
from cifar_dist.config import ConfigError, config_hash, load_config
from cifar_dist.data import TrainBatches
from cifar_dist.debug import PROFILE_DIR, loss_floor, overfit
from cifar_dist.errors import run_command
from cifar_dist.rundir import METRICS, MODEL, SUMMARY, RunDir, load_weights
from cifar_dist.sources import make_synthetic
from cifar_dist.train import main as train_main


@pytest.fixture
def registered():
    """The model registry restored after a test adds to it."""
    saved = dict(models.MODELS)
    yield
    models.MODELS.clear()
    models.MODELS.update(saved)


# ---------------------------------------------------------------------------- train.overfit_batches


def test_overfit_batches_repeat_the_first_batches_exactly():
    ds = make_synthetic(640, 10)
    batches = TrainBatches(ds.train_x, ds.train_y, load_config("debug").data, 64, rank=0, world=1, seed=0)
    repeated = overfit(batches, 3)
    assert repeated.steps_per_epoch == batches.steps_per_epoch == 10  # an epoch keeps its length
    for epoch in (0, 4):
        for step, (x, y) in enumerate(repeated.epoch(epoch, start=1), start=1):
            again_x, again_y = batches.batch(0, step % 3)  # flips, shifts and order of epoch 0
            assert torch.equal(x, again_x) and torch.equal(y, again_y)
    with pytest.raises(ConfigError, match=r"^train.overfit_batches: 11 is more than the 10 batches of an epoch"):
        overfit(batches, 11)


def test_overfit_on_blitz_takes_the_loss_to_its_floor(env, tmp_path):
    """The blitz config's own recipe (lr 0.1, weight decay, label smoothing 0.1) on one batch of 64 images, 200 steps."""
    run_dir = tmp_path / "run"
    proc = run(train_cmd("data.source=synthetic", "data.synthetic_train=640", "data.synthetic_test=100", "train.batch_size=64",
                         "train.overfit_batches=1", "train.epochs=20", "eval.every=0", "train.log_every=10",
                         f"run.dir={run_dir}", "run.progress=lines", config="blitz"), env)
    floor = loss_floor(0.1, 10)
    assert floor == pytest.approx(0.5003, abs=1e-4)  # the entropy of the smoothed labels
    assert "overfit: train.overfit_batches=1: the first 1 batches of epoch 0 (64 images)" in proc.stdout
    assert f"near {floor:.3f}" in proc.stdout
    losses = [r["train_loss"] for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]
    assert losses[0] > 2 and losses[-1] < floor + 0.02


# ---------------------------------------------------------------------------- train.detect_anomaly


class NaNAfter(nn.Module):
    """The identity for its first `k` training forwards, then NaN."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.calls = k, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return x * math.nan if self.calls > self.k else x


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


class NaNGradientAfter(NaNAfter):
    """The identity forwards; after `k` training forwards, NaN gradients backwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return _NaNGradient.apply(x) if self.calls > self.k else x


def poisoned_net(poison: nn.Module):
    class Poisoned(nn.Module):
        def __init__(self, num_classes: int):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), poison, nn.ReLU())
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    return Poisoned


@pytest.mark.parametrize(("poison", "error"), [
    (NaNAfter(3), "non-finite loss at step 4: first non-finite output in module body.1 (NaNAfter)"),
    (NaNGradientAfter(3), "non-finite gradient at step 4: first in module body.0 (Conv2d), parameter body.0."),
])
def test_detect_anomaly_names_the_step_and_module_and_writes_nothing_invalid(poison, error, registered, cache_dir,
                                                                             tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    models.register("poisoned")(poisoned_net(poison))
    run_dir = tmp_path / "run"
    code = run_command(train_main, [*TINY, "model.name=poisoned", "train.detect_anomaly=true", "checkpoint.every_steps=2",
                                    "train.log_every=1", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: train.detect_anomaly: {error}")
    # The bad step reached no file: checkpoints and records end before it, finite, and the run is not "done".
    assert [c.step for c in checkpoint.list_checkpoints(run_dir)] == [2]
    records = read_jsonl(run_dir / METRICS)
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["train_loss"]) for r in records)
    assert not (run_dir / SUMMARY).exists() and not (run_dir / MODEL).exists()
    weights = checkpoint.load_latest(run_dir, warn=print)[1]["model"]
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_detect_anomaly_and_profile_change_no_result_and_no_config_hash(env, tmp_path):
    base = [*TINY, "train.epochs=1"]
    watched = [*base, "train.detect_anomaly=true", "profile.steps=2"]
    assert config_hash(load_config(None, base)) == config_hash(load_config(None, watched))  # resumable either way
    assert config_hash(load_config(None, base)) != config_hash(load_config(None, [*base, "train.overfit_batches=1"]))
    run(train_cmd(*base, f"run.dir={tmp_path / 'plain'}"), env)
    run(train_cmd(*watched, f"run.dir={tmp_path / 'watched'}"), env)
    assert_same_run(tmp_path / "plain", tmp_path / "watched")


# ---------------------------------------------------------------------------- profile.*


def test_profile_writes_a_trace_and_an_operator_table_and_training_goes_on(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(*TINY, "profile.steps=3", "profile.wait=2", f"run.dir={run_dir}"), env)
    folder = run_dir / PROFILE_DIR
    assert f"profile: steps 3-5 traced: {folder / 'trace.json'}" in proc.stdout
    trace = json.loads((folder / "trace.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 3
    ops = (folder / "ops.txt").read_text()
    assert ops.startswith("steps 3-5, rank 0: top operators by self_cpu_time_total") and "convolution" in ops
    assert RunDir(run_dir).summary()["steps"] == 40
    assert load_weights(run_dir / MODEL)["model"] == "blitz"


@pytest.mark.parametrize(("override", "key", "problem"), [
    ("train.overfit_batches=-1", "train.overfit_batches", "must be >= 0"),
    ("train.detect_anomaly=maybe", "train.detect_anomaly", "expected true or false"),
    ("model.compile=true train.detect_anomaly=true", "train.detect_anomaly", "needs model.compile=false"),
    ("profile.steps=-2", "profile.steps", "must be >= 0"),
    ("profile.wait=0", "profile.wait", "must be >= 1"),
    ("profile.after=3", "profile.after", "unknown key"),
])
def test_bad_debugging_keys_are_one_line_naming_the_key(override, key, problem):
    with pytest.raises(ConfigError) as e:
        load_config("debug", override.split())
    assert str(e.value).startswith(key) and problem in str(e.value)

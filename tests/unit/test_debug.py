"""Debugging parts in-process: `train.overfit_batches` repeats the first batches of epoch 0, the first
non-finite layer is named by `train.detect_anomaly` with nothing invalid written, a smoke failure is
filed under the phase whose code raised it, a profile stopped by an error writes nothing, and bad
debugging keys are one line. The smoke, overfitting and the profiler as a user runs them:
tests/e2e/test_debug.py."""


from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cifar_dist import checkpoint, loop, models, resume, run_opening
from cifar_dist.config import ConfigError, ProfileConfig, load_config
from cifar_dist.data import Batches, TrainBatches
from cifar_dist.debug.overfit import RepeatedBatches, overfit_batches
from cifar_dist.debug.profiler import StepProfiler
from cifar_dist.errors import run_command
from cifar_dist.rundir import METRICS, MODEL, SUMMARY, TRACE
from cifar_dist.smoke import Phase, phase_of
from cifar_dist.train import main as train_main
from tests.helpers import TINY, read_jsonl


@pytest.fixture
def registered():
    """The model registry restored after a test adds to it."""
    saved = dict(models.MODELS)
    yield
    models.MODELS.clear()
    models.MODELS.update(saved)


def failure_of(call) -> Exception:
    try:
        call()
    except Exception as e:
        return e
    raise AssertionError("no failure")


class Nothing(SimpleNamespace):
    """A stand-in whose every attribute is missing: the real function given it fails at its first line, in its own frame."""


@pytest.mark.parametrize(("call", "phase"), [
    (lambda: loop.Loop.save(Nothing()), Phase.CHECKPOINT),
    (lambda: loop.Loop.step(Nothing(), None, None), Phase.STEPS),
    (lambda: loop.Loop.warm_up(Nothing()), Phase.COMPILE),
    (lambda: run_opening.open_run(Nothing(), Nothing()), Phase.RUN_DIR),  # any function of run_opening.py
    # Deepest in checkpoint.py's reading code, which is no phase's own: the resume that called it is the phase.
    (lambda: resume.resume(SimpleNamespace(path=42), Nothing(), Nothing(), Nothing()), Phase.RESUME),
    (lambda: json.loads("{"), None),  # in no phase's code: "other"
])
def test_a_failure_is_filed_under_the_phase_whose_code_raised_it(call, phase):
    error = failure_of(call)
    assert phase_of(error) is phase, f"{type(error).__name__}: {error}"


class Numbered:
    """Stands in for TrainBatches: batch (epoch, step) is that pair. A TrainBatches batch is a function
    of (epoch, step) alone (its order and augmentation draws derive from the seed and epoch)."""

    steps_per_epoch = 10

    def batch(self, epoch: int, step: int) -> tuple[int, int]:
        return epoch, step


def test_overfit_batches_repeat_the_first_batches_of_epoch_0():
    repeated = overfit_batches(Numbered(), 3)
    assert repeated.steps_per_epoch == 10  # an epoch keeps its length
    assert list(repeated.epoch(4, start=1)) == [(0, 1), (0, 2), (0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2), (0, 0)]
    assert overfit_batches(Numbered(), 10).batch(7, 9) == (0, 9)
    numbered = Numbered()
    assert overfit_batches(numbered, 0) is numbered  # off
    with pytest.raises(ConfigError, match=r"^train.overfit_batches: 11 is more than the 10 batches of an epoch"):
        overfit_batches(Numbered(), 11)
    # One way through an epoch for every kind of batches: the protocol's.
    assert RepeatedBatches.epoch is TrainBatches.epoch is Batches.epoch


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


def test_a_profile_left_on_an_error_writes_nothing_and_the_next_one_works(tmp_path):
    """A run stopped inside its window (a signal, an error) leaves no partial files and no profiler
    running: the next run in the process (a search worker's next trial) profiles as usual."""
    said: list[str] = []
    cfg = ProfileConfig(steps=2, wait=1)

    def steps(profiler: StepProfiler, n: int) -> None:
        for _ in range(n):
            torch.ones(64, 64).matmul(torch.ones(64, 64))
            profiler.step()

    with pytest.raises(KeyboardInterrupt), StepProfiler(cfg, device=torch.device("cpu"), folder=tmp_path / "a",
                                                        say=said.append, after_step=0) as profiler:
        steps(profiler, 2)  # the warm-up step and the first traced one
        raise KeyboardInterrupt
    assert not (tmp_path / "a").exists() and not any("traced:" in line for line in said)
    with StepProfiler(cfg, device=torch.device("cpu"), folder=tmp_path / "b", say=said.append, after_step=10) as profiler:
        steps(profiler, 5)
    assert said[-1].startswith(f"profile: steps 12-13 traced: {tmp_path / 'b' / TRACE}")
    trace = json.loads((tmp_path / "b" / TRACE).read_text())
    assert {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")} == \
        {"ProfilerStep#12", "ProfilerStep#13"}


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

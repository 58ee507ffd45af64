"""Single-GPU local debugging: `--smoke` on every shipped config and under torchrun, a smoke that
names the phase that fails (by the code it failed in), overfitting a batch, the first non-finite
layer named by `train.detect_anomaly` with nothing invalid written, and a profile of a few steps
whose trace numbers the steps as the console does."""

from __future__ import annotations

import json
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import PY, ROOT, TINY, assert_same_run, read_jsonl, run, torchrun, train_cmd
from torch import nn

from cifar_dist import checkpoint, models, runs, train
from cifar_dist.cli import main as cli_main
from cifar_dist.config import ConfigError, ProfileConfig, config_hash, load_config, shipped_configs
from cifar_dist.data import Batches, TrainBatches
from cifar_dist.debug.overfit import RepeatedBatches, loss_floor, overfit_batches
from cifar_dist.debug.profiler import StepProfiler
from cifar_dist.errors import run_command
from cifar_dist.rundir import METRICS, MODEL, OPS, PROFILE_DIR, SUMMARY, TRACE, RunDir, load_weights
from cifar_dist.smoke import Phase, phase_of
from cifar_dist.sources import SOURCES, SYNTHETIC_CLASSES
from cifar_dist.train import main as train_main


@pytest.fixture
def registered():
    """The model registry restored after a test adds to it."""
    saved = dict(models.MODELS)
    yield
    models.MODELS.clear()
    models.MODELS.update(saved)


@pytest.fixture(scope="module")
def small_cifar10(tmp_path_factory):
    """100 training and 100 test images in the `cifar10` source's own layout (torchvision's python
    pickles): the shipped configs read the real CIFAR-10 through that reader, which tests never do."""
    folder = tmp_path_factory.mktemp("c10") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:  # 5 x 20 training images, 100 test images
        n = 100 if name == "test_batch" else 20
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in SYNTHETIC_CLASSES]}))
    return folder.parent


@pytest.fixture
def smoke_env(env):
    """`python -m cifar_dist.train` from any folder runs this checkout (the smoke's run dir is ./runs/...)."""
    return dict(env, PYTHONPATH=str(ROOT))


PATHS = [phase.value for phase in Phase]


def smoke_cmd(*args: str, config: str | None = None) -> list[str]:
    """`cifar-dist train --smoke ARGS` (as `python -m cifar_dist.cli`: the checkout's, from any folder)."""
    return [PY, "-m", "cifar_dist.cli", "train", "--smoke"] + (["--config", config] if config else []) + list(args)


def smoke_table(stdout: str) -> dict[str, tuple[str, str]]:
    """The smoke's closing lines: phase -> (status, detail)."""
    table = {}
    for line in stdout.splitlines():
        for path in PATHS:
            if line.startswith(f"  {path:<12} "):
                status, _, detail = line[15:].partition("  ")
                table[path] = (status.strip(), detail.strip())
    return table


# ---------------------------------------------------------------------------- --smoke


@pytest.mark.parametrize("name", shipped_configs())
def test_smoke_passes_on_every_shipped_config(name, small_cifar10, smoke_env, tmp_path):
    cfg = load_config(name)
    # The configs that read a real archive (data.path: data, absent here) read a small stand-in: CIFAR-10's
    # in its own layout, through the config's own source; any other archive's, synthetic images.
    # debug's synthetic data is its own.
    data = []
    if cfg.data.source == "cifar10":
        data = [f"data.path={small_cifar10}", "data.download=false"]
    elif SOURCES[cfg.data.source].needs_path:
        data = ["data.source=synthetic", "data.synthetic_train=640", "data.synthetic_test=100"]
    proc = run(smoke_cmd(*data, config=name), smoke_env, cwd=tmp_path, timeout=300)
    table = smoke_table(proc.stdout)
    assert list(table) == list(PATHS), proc.stdout[-3000:]
    expected = {path: "ok" for path in PATHS} | {"compile": "skipped"}  # a compile is asked for with --smoke-compile
    assert {path: status for path, (status, _) in table.items()} == expected, proc.stdout[-3000:]
    assert table["compile"][1].startswith("add --smoke-compile" if cfg.model.compile else "model.compile=false")
    assert "4 steps" in table["train steps"][1] and "smoke passed" in proc.stdout
    assert not any((tmp_path / "runs").iterdir())  # the throwaway run dir is gone


def test_smoke_under_torchrun_prints_one_table(smoke_env, tmp_path):
    proc = run(torchrun(2, "-m", "cifar_dist.cli", "train", "--config", "debug", "--smoke", "run.progress=none"),
               smoke_env, cwd=tmp_path, timeout=300)
    table = smoke_table(proc.stdout)
    assert [status for status, _ in table.values()] == ["ok"] * 3 + ["skipped"] + ["ok"] * 6
    assert proc.stdout.count("smoke passed") == 1 and "on 2 x cpu" in proc.stdout


def test_a_smoke_names_the_path_that_fails_and_keeps_its_run_dir(monkeypatch, cache_dir, tmp_path, capsys):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # The checkpoint folder cannot be made: it would be inside a file.
    monkeypatch.setattr(checkpoint, "checkpoint_dir", lambda run_dir: blocker / "checkpoints")
    code = cli_main(["train", *TINY, "--smoke", f"run.dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    table = smoke_table(out)
    assert code == 1
    assert table["checkpoint"][0] == "failed" and table["checkpoint"][1].startswith("NotADirectoryError")
    assert all(table[p][0] == "ok" for p in ("data", "run dir", "net", "train steps", "records", "evaluation"))
    assert table["compile"][0] == "skipped" and all(table[p] == ("not reached", "") for p in ("resume", "final"))
    assert "smoke FAILED in" in out and f"run dir kept: {tmp_path / 'run'}" in out


def test_a_smoke_whose_data_is_missing_says_so(cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    code = cli_main(["train", "--config", "medium", "--smoke", f"data.path={tmp_path}", "data.download=false",
                     f"run.dir={tmp_path / 'run'}"])
    table = smoke_table(capsys.readouterr().out)
    assert code == 1 and table["data"][0] == "failed" and "cifar-10-batches-py: missing data_batch_1" in table["data"][1]
    assert all(status == "not reached" for path, (status, _) in table.items() if path not in ("data", "compile"))


def test_a_smoke_needs_a_new_run_dir(cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli_main(["train", *TINY, "--smoke", f"run.dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.startswith("error: run.dir: --smoke needs a new or empty run dir")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def failure_of(call) -> Exception:
    try:
        call()
    except Exception as e:
        return e
    raise AssertionError("no failure")


class Nothing(SimpleNamespace):
    """A stand-in whose every attribute is missing: the real function given it fails at its first line, in its own frame."""


@pytest.mark.parametrize(("call", "phase"), [
    (lambda: train.Loop.save(Nothing()), Phase.CHECKPOINT),
    (lambda: train.Loop.step(Nothing(), None, None), Phase.STEPS),
    (lambda: train.Loop.warm_up(Nothing()), Phase.COMPILE),
    (lambda: runs.open_run(Nothing(), Nothing()), Phase.RUN_DIR),  # any function of runs.py
    # Deepest in checkpoint.py's reading code, which is no phase's own: the resume that called it is the phase.
    (lambda: train.resume(SimpleNamespace(path=42), Nothing(), Nothing(), Nothing()), Phase.RESUME),
    (lambda: json.loads("{"), None),  # in no phase's code: "other"
])
def test_a_failure_is_filed_under_the_phase_whose_code_raised_it(call, phase):
    error = failure_of(call)
    assert phase_of(error) is phase, f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------- train.overfit_batches


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


def test_overfit_on_blitz_takes_the_loss_to_its_floor(env, tmp_path):
    """The blitz config's own recipe (lr 0.1, weight decay, label smoothing 0.1) on one batch of 32 images, 200 steps."""
    run_dir = tmp_path / "run"
    proc = run(train_cmd("data.source=synthetic", "data.synthetic_train=640", "data.synthetic_test=100", "train.batch_size=32",
                         "train.overfit_batches=1", "train.epochs=10", "eval.every=0", "train.log_every=10",
                         f"run.dir={run_dir}", "run.progress=lines", config="blitz"), env)
    floor = loss_floor(0.1, 10)
    assert floor == pytest.approx(0.5003, abs=1e-4)  # the entropy of the smoothed labels
    assert "overfit: train.overfit_batches=1: the first 1 batches of epoch 0 (32 images)" in proc.stdout
    assert f"near {floor:.3f}" in proc.stdout
    losses = [r["train_loss"] for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]
    assert losses[0] > 2 and losses[-1] - floor < 0.05 * (losses[0] - floor)  # 95% of the way down


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
    assert f"profile: steps 3-5 traced: {folder / TRACE}" in proc.stdout
    trace = json.loads((folder / TRACE).read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"}  # the steps the console names
    ops = (folder / OPS).read_text()
    assert ops.startswith("steps 3-5, rank 0: top operators by self_cpu_time_total") and "convolution" in ops
    assert RunDir(run_dir).summary()["steps"] == 40
    assert load_weights(run_dir / MODEL)["model"] == "blitz"


def test_a_resumed_profile_numbers_its_steps_as_the_run_does(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    run_dir = tmp_path / "run"
    assert run_command(train_main, [*TINY, "train.epochs=1", f"run.dir={run_dir}"]) == 0  # 20 steps
    capsys.readouterr()
    assert run_command(train_main, [*TINY, "profile.steps=2", "profile.wait=1", f"run.dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "profile: tracing steps 22-23 on rank 0" in out and "profile: steps 22-23 traced" in out
    trace = json.loads((run_dir / PROFILE_DIR / TRACE).read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#22", "ProfilerStep#23"}


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

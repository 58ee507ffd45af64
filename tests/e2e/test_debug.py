"""Single-GPU local debugging as a user runs it: `--smoke` on every shipped config and under torchrun,
a smoke that names the path that fails, overfitting a batch to the loss floor, `train.detect_anomaly`
and the profiler changing no result, and a profile whose trace numbers the steps as the console
does, after a resume too. The parts in-process (the repeated
batches, the first non-finite layer named, bad keys): tests/unit/test_debug.py."""


from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from cifar_dist import checkpoint
from cifar_dist.cli import main as cli_main
from cifar_dist.config import load_config, shipped_configs
from cifar_dist.debug.overfit import loss_floor
from cifar_dist.errors import run_command
from cifar_dist.result_keys import config_hash
from cifar_dist.rundir import METRICS, MODEL, OPS, PROFILE_DIR, TRACE, RunDir, load_weights
from cifar_dist.smoke import Phase
from cifar_dist.sources import SOURCES, SYNTHETIC_CLASSES
from cifar_dist.train import main as train_main
from tests.helpers import PY, ROOT, TINY, assert_same_run, read_jsonl, run, torchrun, train_cmd


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
    status, said = table["checkpoint"]
    assert status == "failed" and said.startswith("cannot write checkpoint") and "Not a directory" in said
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


# ---------------------------------------------------------------------------- train.overfit_batches


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

"""A short real training on synthetic data: it learns, and its run directory records everything."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import yaml
from PIL import Image

from cifar_dist.rundir import CLASS_PLOT, CONFIG, ENV, LOSS_PLOT, METRICS, MODEL, SUMMARY, RunDir, load_weights
from tests.helpers import PY, TINY, read_jsonl, run, train_cmd, without_timing


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    import os

    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), WANDB_MODE="offline")
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    proc = run(train_cmd(*TINY, f"run.dir={run_dir}", "seed=3"), env)
    return run_dir, proc


def test_short_training_clearly_learns(tiny_run):
    run_dir, proc = tiny_run
    summary = RunDir(run_dir).summary()
    assert summary["test_accuracy"] > 0.6  # chance is 0.1
    train = [r for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]
    assert train[-1]["train_loss"] < 0.7 * train[0]["train_loss"]
    assert "test accuracy" in proc.stdout and "frog" in proc.stdout  # the per-class table


def test_progress_lines_in_a_log_show_percent_speed_and_eta(tiny_run):
    """Without a terminal (a Slurm output file), each progress line carries what a bar would show."""
    _, proc = tiny_run
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ") and " lr " in line]
    assert lines and all(re.search(r"step +\d+/40 \( *\d+%\) .* img/s  ETA \d+ (s|min)", line) for line in lines), lines
    assert re.search(r"step +40/40 \(100%\).*ETA 0 s", lines[-1])


def test_run_directory_files_and_keys(tiny_run):
    run_dir, _ = tiny_run
    for name in (CONFIG, ENV, METRICS, SUMMARY, LOSS_PLOT, CLASS_PLOT, MODEL):
        assert (run_dir / name).is_file(), name
    cfg = yaml.safe_load((run_dir / CONFIG).read_text())
    assert cfg["seed"] == 3 and cfg["run"]["dir"] == str(run_dir) and cfg["run"]["id"]
    env = json.loads((run_dir / ENV).read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"].startswith(
        torch.__version__.split("+")[0])
    assert env["world_size"] == 1 and env["device"].startswith("cpu") and "code_version" in env

    records = read_jsonl(run_dir / METRICS)
    assert all({"step", "epoch", "time"} <= r.keys() for r in records)
    train = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "test_loss" in r]
    assert all("lr" in r for r in train) and all("test_accuracy" in r for r in evals)
    steps = [r["step"] for r in train]
    assert steps == sorted(steps) and steps[-1] == 40  # 1280 // 64 * 2 epochs
    assert [r["epoch"] for r in evals] == [1, 2]  # eval.every=1 (the default)

    s = RunDir(run_dir).summary()
    for key in ("test_accuracy", "per_class_accuracy", "confusion_matrix", "test_loss", "epochs", "train_seconds",
                "images_per_second", "world_size", "device"):
        assert key in s, key
    assert 0 <= s["test_accuracy"] <= 1 and s["epochs"] == 2 and s["world_size"] == 1 and s["device"] == "cpu"
    conf = torch.tensor(s["confusion_matrix"])
    assert conf.shape == (10, 10) and conf.sum() == 300
    assert abs(conf.diag().sum().item() / 300 - s["test_accuracy"]) < 1e-9
    assert s["test_accuracy"] == evals[-1]["test_accuracy"]
    per_class = conf.diag() / conf.sum(1)
    assert list(s["per_class_accuracy"].values()) == pytest.approx(per_class.tolist())

    for png in (LOSS_PLOT, CLASS_PLOT):
        with Image.open(run_dir / png) as im:
            assert im.format == "PNG" and im.size == (700, 450)

    weights = load_weights(run_dir / MODEL)
    assert weights["model"] == "blitz" and len(weights["classes"]) == 10
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights["state_dict"])


def test_training_is_deterministic_on_cpu(tiny_run, env, tmp_path):
    run_dir, _ = tiny_run
    run(train_cmd(*TINY, f"run.dir={tmp_path / 'again'}", "seed=3"), env)
    assert without_timing(read_jsonl(tmp_path / "again" / METRICS)) == without_timing(
        read_jsonl(run_dir / METRICS))
    a = load_weights(run_dir / MODEL)["state_dict"]
    b = load_weights(tmp_path / "again" / MODEL)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_and_accelerate_launch_reach_the_same_training(env, tmp_path):
    args = [*TINY, "train.epochs=1"]
    run([PY, "-m", "cifar_dist.cli", "train", *args, f"run.dir={tmp_path / 'cli'}"], env)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "cifar_dist/train.py"]
    run(accelerate + args + [f"run.dir={tmp_path / 'acc'}"], env)
    a = read_jsonl(tmp_path / "cli" / METRICS)
    b = read_jsonl(tmp_path / "acc" / METRICS)
    assert without_timing(a) == without_timing(b)


def test_an_existing_foreign_directory_is_never_overwritten(env, tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run(train_cmd(*TINY, f"run.dir={foreign}"), env, check=False)
    assert proc.returncode == 2 and "holds no cifar-dist run" in proc.stderr
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_a_finished_run_is_not_redone(tiny_run, env):
    run_dir, _ = tiny_run
    before = (run_dir / METRICS).read_text()
    proc = run(train_cmd(*TINY, f"run.dir={run_dir}", "seed=3"), env)
    assert "already finished" in proc.stdout
    assert (run_dir / METRICS).read_text() == before


def test_compiled_training_saves_plain_weights_and_reports_compile_time_apart(env, tmp_path):
    """torch.compile (inductor, here on the CPU): the warm-up that compiles runs before the clock
    and its state is rolled back, so the run matches an uncompiled one."""
    args = [*TINY, "train.epochs=1"]
    cold = dict(env, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # compile for real, not from a cache
    trained = [run(train_cmd(*args, "model.compile=true", f"run.dir={tmp_path / 'compiled'}"), cold, timeout=600),
               run(train_cmd(*args, f"run.dir={tmp_path / 'plain'}"), env),
               run([PY, "-m", "cifar_dist.evaluate", str(tmp_path / "compiled")], env)]
    assert [proc.stderr for proc in trained] == ["", "", ""], "no library warnings or log lines in a normal run's output"
    compiled = RunDir(tmp_path / "compiled").summary()
    plain = RunDir(tmp_path / "plain").summary()
    assert compiled["compile_seconds"] > 1 and plain["compile_seconds"] == 0
    assert compiled["train_seconds"] < compiled["compile_seconds"]
    assert compiled["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-3)
    weights = load_weights(tmp_path / "compiled" / MODEL)["state_dict"]
    assert weights and not any("_orig_mod" in k or k.startswith("module.") for k in weights)

"""The run directory's owner through the commands: TensorBoard holds what metrics.jsonl holds, a second
run in a busy run dir is refused naming the holder (and a killed holder never blocks), and a failed start
leaves no run dir. The seams in-process: tests/unit/test_seams.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from cifar_dist.rundir import CONFIG, ENV, LOCK, METRICS, RunDir
from cifar_dist.rundir import read_jsonl as tolerant_read
from tests.helpers import ROOT, TINY, read_jsonl, run, train_cmd


def test_tensorboard_holds_what_metrics_jsonl_holds(env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run(train_cmd(*TINY, "data.synthetic_train=640", "tracking.backend=tensorboard", f"run.dir={run_dir}"), env)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = read_jsonl(run_dir / METRICS)

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    train_records = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "test_accuracy" in r]
    assert scalars("train/loss") == [(r["step"], pytest.approx(r["train_loss"])) for r in train_records]
    assert scalars("test/accuracy") == [(r["step"], pytest.approx(r["test_accuracy"])) for r in evals]
    assert scalars("test/acc/cat") == [(r["step"], pytest.approx(r["per_class_accuracy"]["cat"])) for r in evals]
    assert [e.step for e in events.Images("test/confusion_matrix")] == [r["step"] for r in evals]


def test_a_second_run_in_a_busy_run_dir_is_refused_naming_the_holder_and_a_killed_holder_never_blocks(env, tmp_path):
    run_dir = tmp_path / "run"
    slow = [*TINY, "data.synthetic_train=6400", "train.epochs=20", f"run.dir={run_dir}"]
    first = subprocess.Popen(train_cmd(*slow), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not read_jsonl_safe(run_dir / METRICS) and time.monotonic() < deadline:
            time.sleep(0.2)
        config_before = (run_dir / CONFIG).read_bytes()
        second = run(train_cmd(*slow), env, check=False)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"is in use by pid {first.pid}" in second.stderr
        assert (run_dir / CONFIG).read_bytes() == config_before
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert (run_dir / LOCK).exists()  # left behind by the killed holder, and no obstacle:
    run(train_cmd(*TINY, "data.synthetic_train=6400", "train.epochs=1", f"run.dir={run_dir}"), env)
    assert RunDir(run_dir).summary()["epochs"] == 1


def read_jsonl_safe(path):
    return tolerant_read(path) if path.exists() else []


def test_a_failed_start_leaves_no_run_dir(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(*TINY, "train.batch_size=100000", f"run.dir={run_dir}"), env, check=False)
    assert proc.returncode == 2 and "larger than the training set" in proc.stderr
    assert not run_dir.exists()
    # ... and the corrected command then starts cleanly in the same place.
    run(train_cmd(*TINY, f"run.dir={run_dir}"), env)
    assert RunDir(run_dir).summary()["steps"] == 40
    assert json.loads((run_dir / ENV).read_text())["world_size"] == 1

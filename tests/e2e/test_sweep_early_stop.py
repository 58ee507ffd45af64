"""A sweep point that `train.early_stop` ends is done, not failed: its run writes summary.json and
its job returns it, and `status` says why it stopped (the local executor: no Slurm needed)."""

from __future__ import annotations

from pathlib import Path

from cifar_dist.rundir import RunDir
from tests.helpers.slurm import record, slurm_env, status, submitted, wait_done, write_spec


def test_an_early_stopped_point_is_done_and_says_why(tmp_path, cache_dir):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = slurm_env(cache_dir, tmp_path, PATH=str(empty_bin))
    # min_delta 1.0 of accuracy: no evaluation improves on the first; with patience 1 every point stops
    # after its second evaluation, at step 40 of 120.
    spec = write_spec(tmp_path / "early.yaml", "early", {"grid": {"seed": [0, 1]}}, overrides={
        "train.epochs": 6, "train.early_stop.metric": "test_accuracy", "train.early_stop.patience": 1,
        "train.early_stop.min_delta": 1.0})
    sweep_dir = tmp_path / "sw"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], env, tmp_path)
    states = wait_done(sweep_dir, env, timeout=300)
    for point, state in zip(record(sweep_dir)["points"], states):
        summary = RunDir(Path(point["run_dir"])).summary()
        assert summary["steps"] == 40 and summary["early_stop"]["step"] == 40
        assert state["state"] == "done" and state["accuracy"] == summary["test_accuracy"]
        assert state["note"] == f"stopped early at step 40: {summary['early_stop']['reason']}"
    table = submitted(["status", str(sweep_dir)], env, tmp_path).stdout
    assert "2 done" in table and "stopped early at step 40" in table
    assert [s["state"] for s in status(sweep_dir, env)] == ["done", "done"]

"""Checkpoints and exact resume: a run stopped at any moment ends exactly where an uninterrupted
run ends (bit-identical weights, identical records), and a broken checkpoint is skipped."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess

import pytest
import torch

from cifar_dist import checkpoint
from cifar_dist.distributed import EXIT_REQUEUE
from cifar_dist.rundir import CHECKPOINTS, METRICS, MODEL, SUMMARY, RunDir, load_weights
from tests.helpers import FAULT_SCRIPT, FAULTS, PY, ROOT, TINY, assert_same_run, last_step, read_jsonl, run, torchrun, wait_for

# The medium net has dropout: an exact resume must restore every RNG state, not just weights.
CONFIG = [*TINY, "model.name=medium", "train.log_every=3", "checkpoint.every_steps=7", "seed=5"]


@pytest.fixture(scope="module")
def module_env(cache_dir):
    return dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, module_env):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}"], module_env)
    return run_dir


def test_checkpoints_are_named_by_step_and_pruned(reference):
    # Saved every 7 steps, after each evaluation (steps 20 and 40) and at the end (40); keep=2 keeps the
    # newest two, plus the best by test accuracy when that is older.
    accuracy = {r["step"]: r["test_accuracy"] for r in read_jsonl(reference / METRICS) if "test_accuracy" in r}
    best = max(accuracy, key=lambda step: (accuracy[step], step))
    names = sorted(p.name for p in (reference / CHECKPOINTS).iterdir())
    assert names == sorted({"step_00000035", "step_00000040", f"step_{best:08d}"})
    marker = json.loads((reference / CHECKPOINTS / f"step_{best:08d}" / "COMPLETE").read_text())
    assert marker["test_accuracy"] == accuracy[best]
    state = checkpoint.load_state(reference / CHECKPOINTS / "step_00000040" / "state.pt")
    assert {"model", "optimizer", "scheduler", "position", "ranks", "config_hash", "run_id"} <= state.keys()
    assert state["position"]["step"] == 40 and state["run_id"]
    assert set(state["ranks"][0]["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    marker = json.loads((reference / CHECKPOINTS / "step_00000040" / "COMPLETE").read_text())
    assert marker["step"] == 40 and marker["test_accuracy"] is not None


def test_real_signal_at_a_random_step_then_resume_is_exact(reference, module_env, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}"]
    target = random.Random().randint(4, 30)
    proc = subprocess.Popen(cmd, env=module_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(run_dir) >= target, proc)
    proc.send_signal(random.choice([signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert "exiting for requeue" in out
    stopped_at = checkpoint.list_checkpoints(run_dir)[-1].step
    assert stopped_at >= target and not (run_dir / SUMMARY).exists()
    resumed = run(cmd, module_env)
    assert f"step_{stopped_at:08d}" in resumed.stdout
    assert_same_run(reference, run_dir)


def test_signal_at_an_epoch_boundary_then_resume_is_exact(reference, module_env, tmp_path):
    run_dir = tmp_path / "run"
    args = [*CONFIG, f"run.dir={run_dir}"]
    # 20 steps per epoch: the signal arrives during the last step of epoch 0.
    proc = run(FAULTS + args, dict(module_env, CIFAR_DIST_FAULT="signal:0:19"), check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    state = checkpoint.load_state(checkpoint.list_checkpoints(run_dir)[-1].path / "state.pt")
    assert state["position"]["step"] == 20 and state["position"]["offset"] == 20 and state["position"]["epoch"] == 0
    # The epoch's evaluation had not run yet: it runs after the resume, once.
    run([PY, "-m", "cifar_dist.train", *args], module_env)
    assert_same_run(reference, run_dir)


def test_two_gloo_ranks_stop_together_and_resume_exactly(module_env, tmp_path):
    args = [*CONFIG, "train.epochs=2"]
    ref = tmp_path / "ref2"
    run(torchrun(2, "-m", "cifar_dist.train", *args, f"run.dir={ref}"), module_env)
    run_dir = tmp_path / "run2"
    # Only rank 1 gets the signal, mid-epoch 1; both ranks must agree to stop at the same step.
    proc = run(torchrun(2, FAULT_SCRIPT, *args, f"run.dir={run_dir}"),
               dict(module_env, CIFAR_DIST_FAULT="signal:1:5:1"), check=False)
    assert proc.returncode != 0
    assert proc.stdout.count("exiting for requeue") == 1  # rank 0 speaks for both
    newest = checkpoint.list_checkpoints(run_dir)[-1]
    assert newest.step == 26  # 20 + the 6 steps of epoch 1 up to and including the signalled one
    state = checkpoint.load_state(newest.path / "state.pt")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    run(torchrun(2, "-m", "cifar_dist.train", *args, f"run.dir={run_dir}"), module_env)
    assert_same_run(ref, run_dir)


def test_sigkill_while_a_checkpoint_is_written_loses_only_the_steps_since_the_previous(reference, module_env, tmp_path):
    run_dir = tmp_path / "run"
    args = [*CONFIG, f"run.dir={run_dir}"]
    proc = subprocess.Popen(FAULTS + args, env=dict(module_env, CIFAR_DIST_FAULT="slow_save:14"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("FAULT"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    half_written = run_dir / CHECKPOINTS / "step_00000014"
    assert (half_written / "state.pt").exists() and not (half_written / "COMPLETE").exists()
    resumed = run([PY, "-m", "cifar_dist.train", *args], module_env)
    assert f"checkpoint {half_written} has no completion marker" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000007" in resumed.stdout
    assert_same_run(reference, run_dir)


# ---- broken checkpoints are named and skipped; the previous valid one is used


def break_newest(run_dir, how: str, tmp_path):
    newest = checkpoint.list_checkpoints(run_dir)[-1].path
    state = newest / "state.pt"
    if how == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif how == "garbage":
        state.write_bytes(os.urandom(state.stat().st_size))
    elif how == "no marker":
        (newest / "COMPLETE").unlink()
    elif how == "malicious":
        class Payload:
            def __reduce__(self):
                return (open, (str(tmp_path / "pwned"), "w"))

        state.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))  # torch.save's protocol: no warning
        # A matching marker: only weights_only loading stands between the file and its code.
        marker = json.loads((newest / "COMPLETE").read_text())
        marker.update(size=state.stat().st_size, sha256=checkpoint.file_sha256(state))
        (newest / "COMPLETE").write_text(json.dumps(marker))
    return newest


@pytest.mark.parametrize(("how", "said"), [
    ("truncated", "is truncated or altered"),
    ("garbage", "does not match its marker's checksum"),
    ("no marker", "has no completion marker"),
    ("malicious", "does not load (UnpicklingError"),
])
def test_a_broken_checkpoint_is_named_and_the_previous_one_used(reference, tmp_path, how, said):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    broken = break_newest(run_dir, how, tmp_path)
    warnings: list[str] = []
    found = checkpoint.load_latest(run_dir, warn=warnings.append)
    assert found is not None and found[0].step == 35
    assert len(warnings) == 1 and str(broken) in warnings[0] and said in warnings[0]
    assert not (tmp_path / "pwned").exists()


def test_resume_skips_a_broken_newest_checkpoint_end_to_end(module_env, tmp_path):
    run_dir = tmp_path / "run"
    args = [*CONFIG, f"run.dir={run_dir}"]
    proc = run(FAULTS + args, dict(module_env, CIFAR_DIST_FAULT="signal:1:10"), check=False)
    assert proc.returncode == EXIT_REQUEUE
    broken = break_newest(run_dir, "truncated", tmp_path)
    resumed = run([PY, "-m", "cifar_dist.train", *args], module_env)
    assert f"warning: checkpoint {broken} is truncated" in resumed.stdout
    assert "step_00000028" in resumed.stdout  # the previous valid one
    assert (run_dir / SUMMARY).exists()


def test_a_result_changing_config_is_refused_with_the_keys_listed(reference, module_env, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    proc = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={reference}", "train.lr=0.2", "seed=6"], module_env,
               check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "seed: 5 -> 6" in line and "train.lr: 0.05 -> 0.2" in line and "allow_config_change" in line
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before  # nothing touched


def test_epochs_may_grow_and_config_change_can_be_allowed(reference, module_env, tmp_path):
    run_dir = tmp_path / "grow"
    shutil.copytree(reference, run_dir)
    grown = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}", "train.epochs=3"], module_env)
    # A linear decay ended at 0 at step 40 of 40; stretched to 60 steps (10 of warm-up), step 40 is 60% of the
    # way down: the LR there is 0.4 x the peak (0.05), and the line says so.
    assert "note: train.epochs 2 -> 3: the LR schedule is stretched to the new length, so the LR at step 40 goes from " \
           "0 to 0.02 and decays from there" in grown.stdout
    assert RunDir(run_dir).summary()["steps"] == 60
    steps = [r["step"] for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    proc = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}", "train.epochs=4", "train.lr=0.01",
                "checkpoint.allow_config_change=true"], module_env)
    assert "resumed from" in proc.stdout
    assert RunDir(run_dir).summary()["steps"] == 80


def test_checkpoints_every_few_seconds_of_wall_clock(module_env, tmp_path):
    run_dir = tmp_path / "timed"
    run([PY, "-m", "cifar_dist.train", *TINY, "checkpoint.every_minutes=0.0005", "checkpoint.keep=3",
         f"run.dir={run_dir}"], module_env)
    steps = [c.step for c in checkpoint.list_checkpoints(run_dir)]
    by_clock = [s for s in steps if s not in (20, 40)]  # 20 and 40 are also saved after each evaluation
    # Kept: the newest 3, plus the best evaluated one when that is older.
    assert steps[-1] == 40 and 3 <= len(steps) <= 4 and by_clock


def test_resume_with_lookahead_is_exact(reference, module_env, tmp_path):
    """The slow average is part of the checkpoint: a run stopped between two Lookahead pulls
    (every 3 steps; the stop at step 26) resumes to the same weights as one never stopped."""
    args = [*CONFIG, "train.lookahead_every=3"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run([PY, "-m", "cifar_dist.train", *args, f"run.dir={whole}"], module_env)
    proc = run(FAULTS + args + [f"run.dir={stopped}"], dict(module_env, CIFAR_DIST_FAULT="signal:1:5"), check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    assert checkpoint.list_checkpoints(stopped)[-1].step == 26
    run([PY, "-m", "cifar_dist.train", *args, f"run.dir={stopped}"], module_env)
    assert_same_run(whole, stopped)
    plain = load_weights(reference / MODEL)["state_dict"]
    averaged = load_weights(whole / MODEL)["state_dict"]
    assert not torch.equal(plain["fc4.weight"], averaged["fc4.weight"]), "Lookahead changed nothing"


def test_a_damaged_final_checkpoint_is_rewritten_and_the_run_then_says_it_is_finished(reference, module_env, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / SUMMARY).unlink()  # as if killed after the final checkpoint, before summary.json
    final = break_newest(run_dir, "garbage", tmp_path)
    assert final.name == "step_00000040"
    again = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}"], module_env)
    assert f"warning: checkpoint {final}" in again.stdout  # the damaged one named, the previous one used ...
    assert checkpoint.list_checkpoints(run_dir)[-1].path == final  # ... and the final one written again, whole
    assert_same_run(reference, run_dir)
    finished = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}"], module_env)
    assert "already finished" in finished.stdout and "warning" not in finished.stdout


def test_a_checkpoint_of_another_net_is_refused_in_one_line_and_nothing_is_rewritten(reference, module_env, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}", "model.name=blitz",
                "checkpoint.allow_config_change=true"], module_env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
    assert "does not fit this config's model" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_diverging_run_stops_with_one_line_naming_the_step_and_writes_no_nan(module_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([PY, "-m", "cifar_dist.train", *CONFIG, "train.lr=1e9", f"run.dir={run_dir}"], module_env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train loss is nan by step ") and "train.detect_anomaly" in last
    assert not (run_dir / SUMMARY).exists()
    for path in run_dir.rglob("*"):
        if path.suffix in (".json", ".jsonl", ".yaml"):
            assert "NaN" not in path.read_text(), path


@pytest.mark.parametrize("sig", ["TERM", "USR1"])
def test_a_stop_signal_during_data_decoding_exits_75_and_leaves_nothing(module_env, tmp_path, sig):
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"  # a cache of its own: the data is decoded in this run
    proc = run(FAULTS + [*CONFIG, f"run.dir={run_dir}", f"data.cache_dir={cache}"],
               dict(module_env, CIFAR_DIST_FAULT=f"signal_decode:{sig}"), check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr[-2000:]
    assert "stop signal during start-up" in proc.stdout
    assert not run_dir.exists()
    resumed = run([PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}", f"data.cache_dir={cache}"], module_env)
    assert "decoding" not in resumed.stdout  # the cache was finished before the stop
    assert RunDir(run_dir).summary()["steps"] == 40


def test_ctrl_c_stops_at_a_step_boundary_exit_130_and_the_same_command_resumes(reference, module_env, tmp_path):
    """The first Ctrl-C (SIGINT) is a stop like Slurm's: checkpoint, exit 130, no traceback; a second aborts."""
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "cifar_dist.train", *CONFIG, f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, env=module_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(run_dir) >= 9, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "stop signal: checkpoint at step" in out and "the same command resumes it" in out
    assert not (run_dir / SUMMARY).exists()
    run(cmd, module_env)
    assert_same_run(reference, run_dir)

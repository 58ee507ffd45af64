"""A study on the real one-node Slurm (slurm/dev-cluster.sh up): two workers, one job array, take
the trials of a range with hopeless values. One worker is killed hard mid-trial, and the study
fails its trial (no heartbeat) and retries it on the other; that one is pre-empted mid-trial with
Slurm's own signal and, requeued, resumes its trial exactly from its checkpoint.
The study ends with its trials complete or pruned, none lost and none twice. Then `cancel` and
`resubmit --failed` on a one-trial study. Both as small as shows it: three trials of two epochs
(ASHA prunes at epoch 1 only), with 40 steps an epoch, so that a kill or a signal lands inside one."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch
import yaml

from cifar_dist import checkpoint
from cifar_dist.config import config_from_dict
from cifar_dist.rundir import CONFIG, METRICS, PRUNED, read_json
from cifar_dist.train import train
from tests.helpers import read_jsonl, without_timing
from tests.helpers.search import GOOD_THEN_HOPELESS, HOPELESS_LR, search_spec, status, succeeded
from tests.helpers.slurm import (
    dev_cluster,
    job_ids,
    logs,
    newest_step,
    slurm_env,
    squeue,
    start_requeued,
    submitted,
    task_pids,
    wait_for,
    with_conf,
)

pytestmark = pytest.mark.slurm

STEPS_PER_EPOCH = 40  # 2,560 synthetic images in steps of 64


@pytest.fixture(scope="module")
def cluster():
    with dev_cluster(1) as conf:
        yield conf


def trial_mid_epoch(sweep_dir, worker: str) -> str | None:
    """The worker's current trial while it is well inside an epoch (away from an evaluation, where it could be pruned)."""
    current = read_json(sweep_dir / "workers" / worker / "current.json") or {}
    if current.get("trial") is None:
        return None
    name = f"{current['trial']:03d}"
    return name if 5 <= newest_step(sweep_dir / "runs" / name) % STEPS_PER_EPOCH <= 25 else None


def test_study_survives_a_preempted_and_a_killed_worker(tmp_path, cluster, cache_dir):
    env = slurm_env(cache_dir, tmp_path)
    # Trials 0 and 1 start together and draw good rates; whatever else is asked (trial 2 or 3)
    # draws a hopeless one, once trial 0 or 1 has been evaluated: it is pruned (test_search.py).
    spec = search_spec(tmp_path / "st.yaml", "slurm-st", {"trials": 3, "workers": 2, "heartbeat_s": 1, "grace_s": 5,
                                                           "sampler": "random", "seed": GOOD_THEN_HOPELESS,
                                                           "params": HOPELESS_LR},
                       overrides={"train.epochs": 2, "data.synthetic_train": 2560})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], env, tmp_path)
    w0, w1 = job_ids(sweep_dir)
    assert w0.split("_")[0] == w1.split("_")[0], "one array"

    # 1. Kill w1 hard inside a trial: no checkpoint, no word to the study.
    killed = wait_for(lambda: trial_mid_epoch(sweep_dir, "w1"), 240, "w1 inside an epoch", sweep_dir, poll=0.05)
    for pid in task_pids(w1, 0):
        os.kill(pid, signal.SIGKILL)

    # 2. Pre-empt w0 inside an epoch: it checkpoints, suspends its trial and is requeued; released, it resumes it.
    preempted = wait_for(lambda: trial_mid_epoch(sweep_dir, "w0"), 240, "w0 inside an epoch", sweep_dir, poll=0.05)
    subprocess.run(["scancel", "--signal=USR2", w0], env=with_conf(env), check=True, timeout=30)
    wait_for(lambda: any(t["trial"] == preempted and t["state"] == "suspended" for t in status(sweep_dir, env)["trials"]),
             60, f"trial {preempted} suspended", sweep_dir)
    log = sweep_dir / "submitit" / f"{w0}_0_log.out"
    start_requeued(w0, env, lambda: "resumed from" in log.read_text(), 240, f"requeued worker {w0} to resume", sweep_dir)
    assert f"resumed from {sweep_dir / 'runs' / preempted / 'checkpoints'}/step_" in log.read_text(), logs(sweep_dir)

    # 3. w0 fails the silent trial once grace_s has passed, retries it, and ends the study.
    wait_for(lambda: not squeue(env), 600, "every worker to leave the queue", sweep_dir, poll=2)
    table = status(sweep_dir, env)
    assert [(w["name"], w["state"]) for w in table["workers"]] == [("w0", "done"), ("w1", "failed")], table["workers"]
    by_name = {t["trial"]: t for t in table["trials"]}
    states = [t["state"] for t in table["trials"]]
    assert states.count("complete") + states.count("pruned") == 3 and states.count("fail") == 1, table["trials"]
    assert states.count("pruned") >= 1, "the hopeless values were pruned"
    assert by_name[killed]["state"] == "fail"
    (retry,) = [t for t in table["trials"] if t["note"].startswith(f"retry of {killed}")]
    assert retry["state"] in ("complete", "pruned") and retry["worker"] == "w0" and retry["values"] == by_name[killed]["values"]
    assert by_name[preempted]["state"] in ("complete", "pruned"), "resumed by its own worker, never retried"
    assert not any(t["note"].startswith(f"retry of {preempted}") for t in table["trials"])
    assert_resumed_exactly(sweep_dir / "runs" / preempted, tmp_path / "reference")


def assert_resumed_exactly(run_dir, reference) -> None:
    """The pre-empted trial's records and newest weights equal those of the same config trained
    straight through, stopped where the trial stopped (pruned or not)."""
    cfg = config_from_dict(yaml.safe_load((run_dir / CONFIG).read_text()))
    cfg.run.dir, cfg.run.progress = str(reference), "none"
    pruned = read_json(run_dir / PRUNED)
    stop_at = pruned["pruned"]["epoch"] if pruned else None
    torch.set_num_threads(1)  # as the worker trained: limit_threads(cpus_per_task=1)
    train(cfg, on_eval=lambda r: "stop" if r["epoch"] == stop_at else None)
    assert without_timing(read_jsonl(run_dir / METRICS)) == without_timing(read_jsonl(reference / METRICS))
    mine, ref = (checkpoint.load_latest(d, warn=print) for d in (run_dir, reference))
    assert mine[0].step == ref[0].step
    assert all(torch.equal(mine[1]["model"][k], ref[1]["model"][k]) for k in ref[1]["model"]), "weights differ"


def test_cancel_stops_every_worker_and_resubmit_resumes_their_trials(tmp_path, cluster, cache_dir):
    env = slurm_env(cache_dir, tmp_path)
    # One trial of 160 steps: `cancel` (in this process: no start-up to wait for) acts in its first epoch.
    spec = search_spec(tmp_path / "c.yaml", "slurm-cancel", {"trials": 1, "workers": 1, "pruner": "none"},
                       overrides={"train.epochs": 4, "data.synthetic_train": 2560})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], env, tmp_path)
    (first,) = job_ids(sweep_dir)
    trial = wait_for(lambda: trial_mid_epoch(sweep_dir, "w0"), 240, "w0 inside an epoch", sweep_dir, poll=0.05)

    assert first in succeeded(["cancel", str(sweep_dir)], env).stdout
    wait_for(lambda: not squeue(env), 60, "the cancelled worker to leave the queue", sweep_dir)
    table = status(sweep_dir, env)
    assert [w["state"] for w in table["workers"]] == ["cancelled"]
    (suspended,) = [t for t in table["trials"] if t["trial"] == trial]
    assert suspended["state"] == "suspended" and "resubmit --failed resumes it" in suspended["note"]

    succeeded(["resubmit", str(sweep_dir), "--failed"], env)
    (second,) = job_ids(sweep_dir)
    wait_for(lambda: not squeue(env), 300, "the resubmitted worker to finish", sweep_dir, poll=1)
    table = status(sweep_dir, env)
    assert [w["state"] for w in table["workers"]] == ["done"] and second != first
    assert [t["state"] for t in table["trials"]] == ["complete"], table["trials"]
    log = (sweep_dir / "submitit" / f"{second}_0_log.out").read_text()
    assert f"resumed from {sweep_dir / 'runs' / trial / 'checkpoints'}/step_" in log

"""Two Slurm nodes on one machine (slurm/dev-cluster.sh up --nodes 2: network and UTS namespaces,
own addresses and hostnames): a 2-node point is 2 gloo ranks over the virtual network and trains
exactly as 2 ranks on one node; the sbatch template runs there too; when the second node's rank
dies the job ends promptly, and the requeued job resumes to the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from cifar_dist.rundir import METRICS, MODEL, SUMMARY, RunDir, load_weights
from tests.helpers import PY, ROOT, TINY, read_jsonl, run, torchrun
from tests.helpers.slurm import (
    dev_cluster,
    dev_cluster_cmd,
    job_ids,
    job_over,
    job_state,
    logs,
    newest_step,
    restart_requeued,
    scontrol,
    slurm_env,
    squeue,
    status,
    submitted,
    task_pids,
    wait_done,
    wait_for,
    with_conf,
    write_spec,
)

pytestmark = pytest.mark.slurm

# 80 steps, a record and (every 10) a checkpoint along the way.
CONFIG = {"train.epochs": 4, "train.log_every": 1, "checkpoint.every_steps": 10}
TWO_NODES = {"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1}


@pytest.fixture(scope="module")
def cluster2():
    with dev_cluster(2) as conf:
        yield conf


@pytest.fixture(scope="module")
def menv(cluster2, cache_dir, tmp_path_factory):
    return slurm_env(cache_dir, tmp_path_factory.mktemp("wandb"))


@pytest.fixture(scope="module")
def two_node_run(menv, tmp_path_factory):
    """One point on 2 nodes through `python jobs/submit.py`, uninterrupted."""
    tmp = tmp_path_factory.mktemp("mn")
    spec = write_spec(tmp / "mn.yaml", "mn", {"grid": {"seed": [0]}}, cluster="local2", overrides=CONFIG,
                      resources=TWO_NODES)
    submitted([str(spec), "--sweep-dir", str(tmp / "sweep")], menv, tmp)
    wait_done(tmp / "sweep", menv)
    return tmp / "sweep" / "runs" / "000"


def losses(run_dir) -> list[float]:
    return [r["train_loss"] for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]


def assert_same_training(a, b, exact: bool) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 80
    if exact:
        assert la == lb
    else:
        assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
    wa = load_weights(a / MODEL)["state_dict"]
    wb = load_weights(b / MODEL)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_two_node_point_is_two_ranks_on_two_hosts(two_node_run):
    summary = RunDir(two_node_run).summary()
    assert summary["world_size"] == 2
    assert summary["hosts"] == ["node1", "node2"], "rank 0 on the first node, rank 1 on the second"


def test_two_nodes_train_like_two_ranks_on_one_node(two_node_run, menv, tmp_path):
    """The same config as 2 gloo ranks on this machine (torchrun): the same loss at every step."""
    overrides = [f"{k}={v}" for k, v in CONFIG.items()]
    ref = tmp_path / "one-node"
    run(torchrun(2, "-m", "cifar_dist.train", *TINY, *overrides, "seed=0", f"run.dir={ref}"),
        {**menv, "OMP_NUM_THREADS": "1"})
    assert RunDir(ref).summary()["world_size"] == 2
    assert_same_training(ref, two_node_run, exact=False)


def test_sbatch_template_runs_on_two_nodes(two_node_run, menv, tmp_path):
    """slurm/train.sbatch: one srun task per rank (here one per node), ranks from Slurm, no launcher."""
    run_dir = tmp_path / "tpl"
    args = [*TINY, *(f"{k}={v}" for k, v in CONFIG.items()), "seed=0", f"run.dir={run_dir}"]
    env = with_conf({**menv, "PYTHON": PY, "GLOO_SOCKET_IFNAME": "eth0"})
    proc = subprocess.run(["sbatch", "--parsable", "--nodes", "2", str(ROOT / "slurm" / "train.sbatch"), *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    job = proc.stdout.strip()
    output = tmp_path / f"slurm-{job}.out"
    wait_for(lambda: not any(line.split()[0] == job for line in squeue(menv)), 240, f"template job {job} to end")
    assert (run_dir / SUMMARY).exists(), output.read_text()[-3000:]
    summary = RunDir(run_dir).summary()
    assert summary["world_size"] == 2 and summary["hosts"] == ["node1", "node2"]
    assert "2 process(es) on 2 node(s)" in output.read_text()
    assert_same_training(two_node_run, run_dir, exact=True)


def test_rank_death_on_second_node_ends_job_and_requeue_resumes(two_node_run, menv, tmp_path):
    spec = write_spec(tmp_path / "mnf.yaml", "mnf", {"grid": {"seed": [0]}}, cluster="local2", overrides=CONFIG,
                      resources=TWO_NODES)
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], menv, tmp_path)
    job = job_ids(sweep_dir)[0]
    run_dir = sweep_dir / "runs" / "000"
    wait_for(lambda: newest_step(run_dir) >= 25, 120, "25 steps", sweep_dir, poll=0.05)
    victims = task_pids(job, rank=1)
    assert len(victims) == 1, f"rank 1 of job {job}: {victims}"
    assert psutil.Process(victims[0]).environ()["SLURMD_NODENAME"] == "node2"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.monotonic()

    wait_for(lambda: job_over(job, menv), 60, "the job to end after its second rank died", sweep_dir)
    assert time.monotonic() - killed < 60
    [state] = status(sweep_dir, menv)
    assert state["state"] == "failed" and state["step"] < 80, state
    assert not (run_dir / SUMMARY).exists()

    scontrol(["requeue", job], menv)
    wait_for(lambda: job_state(job, menv) == "PENDING", 30, "the requeued job to be pending", sweep_dir)

    restart_requeued(job, sweep_dir, menv)
    wait_done(sweep_dir, menv)
    log = (sweep_dir / "submitit" / f"{job}_0_log.out").read_text()
    assert "resumed from" in log, logs(sweep_dir)
    assert_same_training(two_node_run, run_dir, exact=True)


def test_up_is_idempotent_and_recovers_from_a_crash(cluster2, menv, tmp_path):
    """Last in this module: it restarts the cluster. `up` on a healthy cluster changes nothing; after
    a crash on a half-cleaned machine (daemons killed, the bridge gone, namespaces and hosts lines
    left) `up` still brings back a working two-node cluster."""
    again = dev_cluster_cmd("up", "--nodes", "2")
    assert again.returncode == 0 and "already up" in again.stdout
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("slurmctld", "slurmd"):
            p.kill()
    subprocess.run(["ip", "link", "delete", "cdsl-br0"], check=True)
    up = dev_cluster_cmd("up", "--nodes", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    proc = subprocess.run(["sbatch", "--parsable", "-N", "2", "-o", str(tmp_path / "out.txt"), "--wrap", "srun hostname"],
                          env=with_conf(menv), capture_output=True, text=True, timeout=60, check=True)
    job = proc.stdout.strip()
    wait_for(lambda: not any(line.split()[0] == job for line in squeue(menv)), 60, "a 2-node job after the restart")
    assert sorted((tmp_path / "out.txt").read_text().split()) == ["node1", "node2"]

"""Every launch path through Slurm builds the same process group: one small config through `srun`
tasks without a launcher (one node x 2 tasks, 2 nodes x 1 task) and the sbatch template, on the real
dev cluster. Each ends with world size 2, the same recorded precision, and training equal to the
1-rank run (tests/helpers/launch.py). On one machine: tests/e2e/test_launch.py."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from cifar_dist.rundir import RunDir
from tests.helpers import PY, ROOT, TINY, assert_same_run, our_frames, run, torchrun
from tests.helpers.launch import ARGS, assert_same_training, reference_run
from tests.helpers.slurm import dev_cluster, newest_step, slurm_env, squeue, start_requeued, wait_for, with_conf

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    return reference_run(cache_dir, tmp_path_factory.mktemp("launch") / "one")


def srun_train(env: dict[str, str], tmp_path, *srun_args: str) -> subprocess.CompletedProcess:
    """`srun ARGS python -m cifar_dist.train ...` as typed in an allocation: no launcher, no WORLD_SIZE."""
    return subprocess.run(["srun", *srun_args, PY, "-m", "cifar_dist.train", *ARGS, f"run.dir={tmp_path / 'run'}"],
                          env=with_conf(env), cwd=ROOT, capture_output=True, text=True, timeout=600)


def sbatch_template(env: dict[str, str], tmp_path, *sbatch_args: str) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(ROOT / "slurm" / "train.sbatch"), *ARGS,
                           f"run.dir={tmp_path / 'run'}"], env=with_conf({**env, "PYTHON": PY}), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=True)
    job = proc.stdout.strip()
    wait_for(lambda: not any(line.split()[0] == job for line in squeue(env)), 300, f"template job {job} to end")
    return (tmp_path / f"slurm-{job}.out").read_text()


def test_srun_tasks_and_the_sbatch_template_on_one_node(reference, cache_dir, tmp_path):
    with dev_cluster(1):
        env = slurm_env(cache_dir, tmp_path, OMP_NUM_THREADS="1")
        proc = srun_train(env, tmp_path / "srun", "-n", "2", "--cpus-per-task", "1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("done: test accuracy") == 1  # one group of 2, rank 0 alone prints
        assert_same_training(reference, tmp_path / "srun" / "run")
        bad = subprocess.run(["srun", "-n", "2", PY, "-m", "cifar_dist.train", *ARGS, "train.lr=fast"], env=with_conf(env),
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and bad.stderr.count("error: train.lr: expected a number") == 1, bad.stderr

        out = sbatch_template(env, tmp_path / "sbatch", "--ntasks-per-node", "2", "--cpus-per-task", "1")
        assert "2 process(es) on 1 node(s)" in out
        assert_same_training(reference, tmp_path / "sbatch" / "run")


def test_srun_tasks_on_two_nodes(reference, cache_dir, tmp_path):
    with dev_cluster(2):
        env = slurm_env(cache_dir, tmp_path, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0")
        proc = srun_train(env, tmp_path / "srun2", "-N", "2", "-n", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert RunDir(tmp_path / "srun2" / "run").summary()["hosts"] == ["node1", "node2"]
        assert_same_training(reference, tmp_path / "srun2" / "run")


# ---------------------------------------------------------------------------- requeue under each launcher

LONG = [*TINY, "train.epochs=8", "checkpoint.every_steps=10"]


# The stop each launcher gets: the time limit's USR2 (the launcher must outlive it: cifar-dist launch
# has torchrun ignore it) or a pre-emption's TERM (torchrun passes it on and waits for its ranks).
STOP = {"srun": "USR2", "torchrun": "TERM", "accelerate": "USR2"}


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
    """The plain run every launcher's pre-empted run must equal to the bit: 2 ranks of 1 thread each."""
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    run_dir = tmp_path_factory.mktemp("launch") / "two"
    run(torchrun(2, "-m", "cifar_dist.train", *LONG, f"run.dir={run_dir}"), env)
    return run_dir


@pytest.mark.slurm
@pytest.mark.parametrize("launcher", ["srun", "torchrun", "accelerate"])
def test_sbatch_under_each_launcher_is_preempted_requeued_and_resumed_exactly(launcher, uninterrupted, cache_dir,
                                                                             tmp_path):
    """slurm/train.sbatch with LAUNCHER=srun|torchrun|accelerate, 2 ranks: the job is signalled (still
    RUNNING), the ranks checkpoint and the step and the script exit 75, the job requeues itself and
    its next life resumes and ends bit-identical to the uninterrupted run. The stop is said once
    (rank 0), with no traceback of the project's."""
    with dev_cluster(1):
        env = with_conf({**slurm_env(cache_dir, tmp_path), "PYTHON": PY, "LAUNCHER": launcher})
        run_dir = tmp_path / "run"
        job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node", "2", "--cpus-per-task", "1",
                              str(ROOT / "slurm" / "train.sbatch"), *LONG, f"run.dir={run_dir}"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        out = tmp_path / f"slurm-{job}.out"

        def ended() -> bool:
            return not any(line.split()[0] == job for line in squeue(env))

        wait_for(lambda: newest_step(run_dir) >= 20 or ended(), 300, "20 steps", poll=0.05)
        assert not ended(), out.read_text()[-4000:]
        subprocess.run(["scancel", f"--signal={STOP[launcher]}", job], env=env, check=True, timeout=30)
        wait_for(lambda: "requeueing job" in out.read_text() or ended(), 120, f"job {job} to requeue itself")
        first = out.read_text()
        assert "Exited with exit code 75" in first and "the ranks exited 75 (stopped, checkpointed); requeueing" in first, \
            first[-4000:]
        assert first.count("stop signal: checkpoint at step") == 1, "said by rank 0 alone"
        start_requeued(job, env, lambda: ended() and "resumed from" in out.read_text(), 300, "the second life to finish")
        text = out.read_text()
        lives = re.findall(rf"started by {launcher}, life (\d+) of job {job}", text)  # a dev-cluster requeue may take two
        assert len(lives) >= 2 and text.endswith("the ranks exited 0\n"), text[-4000:]
        assert not our_frames(text) and not re.search(r"^error:", text, re.M), text[-4000:]
        assert_same_run(uninterrupted, run_dir)
        assert RunDir(run_dir).summary()["world_size"] == 2

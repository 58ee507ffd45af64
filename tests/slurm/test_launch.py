"""Every launch path through Slurm builds the same process group: one small config through `srun`
tasks without a launcher (one node x 2 tasks, 2 nodes x 1 task) and the sbatch template, on the real
dev cluster. Each ends with world size 2, the same recorded precision, and training equal to the
1-rank run (tests/helpers/launch.py). On one machine: tests/e2e/test_launch.py."""

from __future__ import annotations

import subprocess

import pytest

from cifar_dist.rundir import RunDir
from tests.helpers import PY, ROOT
from tests.helpers.launch import ARGS, assert_same_training, reference_run
from tests.helpers.slurm import dev_cluster, slurm_env, squeue, wait_for, with_conf

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

"""Every launch path builds the same process group: one small config through plain python,
torchrun, `accelerate launch` (flags, and a config file), `srun` tasks without a launcher (one node
x 2 tasks, 2 nodes x 1 task) and the sbatch template, on the real dev cluster where Slurm is
involved. Each ends with world size 2, the same recorded precision, and training equal to the
1-rank run within the bound tests/test_distributed.py explains (2 ranks sum gradients in another
order). Multi-GPU nodes cannot run here: these are gloo CPU ranks."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import PY, ROOT, TINY, read_jsonl, run, torchrun
from slurm_fixtures import dev_cluster, slurm_env, squeue, wait_for, with_conf

from cifar_dist.rundir import METRICS, RunDir

ARGS = [*TINY, "train.log_every=1", "seed=1"]
ACCELERATE = [PY, "-m", "accelerate.commands.launch"]


def assert_same_training(reference, run_dir):
    a = [r for r in read_jsonl(reference / METRICS) if "train_loss" in r]
    b = [r for r in read_jsonl(run_dir / METRICS) if "train_loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        rel = 1e-5 if ra["step"] <= 20 else 1e-2
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=rel, abs=1e-6), ra["step"]
    summary = RunDir(run_dir).summary()
    assert (summary["world_size"], summary["precision"]) == (2, RunDir(reference).summary()["precision"])


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    run_dir = tmp_path_factory.mktemp("launch") / "one"
    run([PY, "-m", "cifar_dist.train", *ARGS, f"run.dir={run_dir}"], env)
    assert RunDir(run_dir).summary()["world_size"] == 1
    return run_dir


@pytest.mark.parametrize("how", ["torchrun", "accelerate-flags", "accelerate-config-file"])
def test_launchers_on_one_machine(how, reference, env, tmp_path):
    env["OMP_NUM_THREADS"] = "1"
    run_dir = tmp_path / how
    if how == "torchrun":
        cmd = torchrun(2, "-m", "cifar_dist.train")
    elif how == "accelerate-flags":
        cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", "cifar_dist/train.py"]
    else:  # what `accelerate config` writes for 2 processes; on a machine without GPUs they are gloo CPU ranks
        config = tmp_path / "accelerate.yaml"
        config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: 'no'\n"
                          "num_machines: 1\nnum_processes: 2\nmain_process_port: 0\n")
        cmd = [*ACCELERATE, "--config_file", str(config), "cifar_dist/train.py"]
    run([*cmd, *ARGS, f"run.dir={run_dir}"], env)
    assert_same_training(reference, run_dir)


# ---------------------------------------------------------------------------- Slurm


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


@pytest.mark.slurm
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


@pytest.mark.slurm
def test_srun_tasks_on_two_nodes(reference, cache_dir, tmp_path):
    with dev_cluster(2):
        env = slurm_env(cache_dir, tmp_path, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0")
        proc = srun_train(env, tmp_path / "srun2", "-N", "2", "-n", "2")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert RunDir(tmp_path / "srun2" / "run").summary()["hosts"] == ["node1", "node2"]
        assert_same_training(reference, tmp_path / "srun2" / "run")

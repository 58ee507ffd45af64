"""Every launch path builds the same process group: one small config through plain python,
torchrun, `accelerate launch` (flags, and a config file), `srun` tasks without a launcher (one node
x 2 tasks, 2 nodes x 1 task) and the sbatch template, on the real dev cluster where Slurm is
involved. Each ends with world size 2, the same recorded precision, and training equal to the
1-rank run within the bound tests/test_distributed.py explains (2 ranks sum gradients in another
order). Multi-GPU nodes cannot run here: these are gloo CPU ranks.

What the launchers lose, and `cifar-dist launch` gives back: a launcher asked for N processes that
starts one is refused in one line naming the flag that gives N; a mistake under 2 ranks is one line
(rank 0's) and exit 2; and the sbatch template under each LAUNCHER (srun, torchrun, accelerate) is
pre-empted, exits 75, requeues itself and resumes to the same bits as an uninterrupted run."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from conftest import PY, ROOT, TINY, assert_same_run, read_jsonl, run, torchrun
from slurm_fixtures import dev_cluster, newest_step, slurm_env, squeue, start_requeued, wait_for, with_conf

from cifar_dist.distributed import DistributedError, check_asked_for
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
        bad = subprocess.run(["srun", "-n", "2", PY, "-m", "cifar_dist.train", *ARGS, "train.lr=fast"], env=with_conf(env),
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and bad.stderr.count("error: train.lr: expected a number") == 1, bad.stderr

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


# ---------------------------------------------------------------------------- asked for N, got M; exit codes


def our_frames(stderr: str) -> list[str]:
    """Traceback frames in the project's own code (a launcher's own traceback has none)."""
    return [line for line in stderr.splitlines() if line.strip().startswith('File "') and "cifar_dist" in line]


@pytest.mark.parametrize("flags", [["--num_processes", "2"], ["--cpu", "--num_processes", "2"]])
def test_accelerate_asked_for_two_processes_that_starts_one_is_refused(flags, env, tmp_path):
    """On a machine without GPUs `accelerate launch --num_processes 2` (with or without --cpu) starts
    ONE process: it is refused in one line that names --multi_gpu, before anything is written.
    accelerate itself then exits 1; under `cifar-dist launch` the exit code is the run's, 2."""
    run_dir = tmp_path / "run"
    cmd = [*ACCELERATE, *flags, "cifar_dist/train.py", *TINY, f"run.dir={run_dir}"]
    plain = run(cmd, env, check=False)
    errors = [line for line in plain.stderr.splitlines() if line.startswith("error:")]
    assert plain.returncode == 1 and len(errors) == 1, plain.stderr[-3000:]
    assert errors[0].startswith("error: accelerate launch was asked for several processes") and "--multi_gpu" in errors[0]
    assert not our_frames(plain.stderr) and not run_dir.exists()
    wrapped = run([PY, "-m", "cifar_dist.cli", "launch", *cmd], env, check=False)
    assert wrapped.returncode == 2, wrapped.stderr[-3000:]
    assert wrapped.stderr.splitlines()[-1] == ("cifar-dist launch: exit 2 (a mistake, named in the error line above); "
                                               "accelerate launch itself exited 1")


def test_a_mistake_under_two_ranks_is_one_line_and_launch_exits_2(env, tmp_path):
    cmd = torchrun(2, "-m", "cifar_dist.train", *TINY, "train.lr=fast", f"run.dir={tmp_path / 'run'}")
    plain = run(cmd, env, check=False)
    assert plain.returncode == 1, "torchrun's own exit code for any failed rank"
    wrapped = run([PY, "-m", "cifar_dist.launcher", *cmd], env, check=False)
    for proc in (plain, wrapped):
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == ["error: train.lr: expected a number, got 'fast' (str)"], proc.stderr[-3000:]
        assert not our_frames(proc.stderr)
    assert wrapped.returncode == 2 and "torchrun itself exited 1" in wrapped.stderr.splitlines()[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("environ", "refused"), [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "this Slurm job has 2 tasks (SLURM_NTASKS=2) but this process was "
                                                 "started without srun, so it would train alone: start it as `srun"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}, None),  # `srun -n 1` in a 2-task job: asked for 1
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1"}, "accelerate launch was asked for several"),
    ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, None),  # accelerate's one process, asked for one
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "x", "WORLD_SIZE": "2"}, None),  # --multi_gpu: a real group
])
def test_asked_for_n_got_one(environ, refused):
    """The environment each launcher leaves, as read (the Slurm job script's shell cannot run here
    without a cluster; the accelerate case runs for real above)."""
    if refused is None:
        check_asked_for(environ)
        return
    with pytest.raises(DistributedError) as e:
        check_asked_for(environ)
    assert str(e.value).startswith(refused)


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


@pytest.mark.parametrize(("environ", "rank"), [
    ({}, 0), ({"RANK": "1"}, 1),  # torchrun, accelerate launch
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, 1),  # a task of `srun -n 2`
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "3"}, 0),  # `srun -n 1`: a lone process
    ({"SLURM_PROCID": "1"}, 0), ({"RANK": "x"}, 0),
])
def test_the_rank_that_prints_errors(monkeypatch, environ, rank):
    """Rank 0 alone prints an error line; the rank is the launcher's, read before any process group exists."""
    from cifar_dist.errors import launched_rank

    for name in ("RANK", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert launched_rank() == rank

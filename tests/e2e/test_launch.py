"""Every launch path on one machine builds the same process group: one small config through
torchrun and `accelerate launch` (flags, and a config file) ends with world size 2, the same
recorded precision, and training equal to the 1-rank run (tests/helpers/launch.py). Through Slurm:
tests/slurm/test_launch.py. Multi-GPU nodes cannot run here: these are gloo CPU ranks."""

from __future__ import annotations

import subprocess

import pytest

from cifar_dist.distributed import DistributedError, check_asked_for
from cifar_dist.rundir import CHECKPOINTS, SUMMARY
from tests.helpers import PY, ROOT, TINY, last_step, our_frames, run, torchrun, wait_for
from tests.helpers.launch import ARGS, assert_same_training, reference_run

ACCELERATE = [PY, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    return reference_run(cache_dir, tmp_path_factory.mktemp("launch") / "one")


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


def test_a_stop_signal_sent_by_hand_to_every_process_of_the_run_reaches_the_ranks_and_launch_exits_75(env, tmp_path):
    """docs/launchers.md's `pkill -USR1 -f cifar_dist.train`: the pattern matches `cifar-dist launch`,
    torchrun and the ranks. The first two ignore SIGUSR1 (torchrun would die of it, and its ranks with
    it), so only the ranks act: a checkpoint, then exit 75 from the wrapper. The pattern here is this
    test's run dir, where the docs name the module: the other test worker may be training too."""
    env["OMP_NUM_THREADS"] = "1"
    run_dir = tmp_path / "run"
    cmd = [PY, "-m", "cifar_dist.launcher", *torchrun(2, "-m", "cifar_dist.train", *TINY, "train.epochs=100",
                                                      f"run.dir={run_dir}")]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: last_step(run_dir) >= 10, proc)  # two of TINY's train-loss records: training is under way
        assert subprocess.run(["pkill", "-USR1", "-f", str(run_dir)], timeout=30).returncode == 0
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert out.count("stop signal: checkpoint at step") == 1, "said by rank 0 alone"
    assert err.splitlines()[-1].startswith("cifar-dist launch: exit 75 (stopped after a checkpoint")
    assert any((run_dir / CHECKPOINTS).iterdir()) and not (run_dir / SUMMARY).exists()


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

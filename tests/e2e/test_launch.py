"""Every launch path on one machine builds the same process group: one small config through
torchrun and `accelerate launch` (flags, and a config file) ends with world size 2, the same
recorded precision, and training equal to the 1-rank run (tests/helpers/launch.py). Through Slurm:
tests/slurm/test_launch.py. Multi-GPU nodes cannot run here: these are gloo CPU ranks."""

from __future__ import annotations

import pytest

from tests.helpers import PY, run, torchrun
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

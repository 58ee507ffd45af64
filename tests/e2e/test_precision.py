"""Precision as a user meets it: an accelerate config file's precision recorded where `evaluate` finds it
(or refused in one line when it contradicts the config), and fp16 with loss scaling resumed exactly.
The rule itself (cifar_dist/precision.py): tests/unit/test_precision.py."""


from __future__ import annotations

import json
import sys

from cifar_dist import checkpoint
from cifar_dist.distributed import EXIT_REQUEUE
from cifar_dist.precision import cpu_has_fp16
from cifar_dist.rundir import CONFIG, ENV, RunDir
from tests.helpers import FAULTS, PY, TINY, assert_same_run, run, train_cmd


def accelerate_with(config_file, tmp_path, precision: str) -> list[str]:
    """`accelerate launch --config_file F cifar_dist/train.py`: one process, the file's mixed precision."""
    config_file.write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nmixed_precision: {precision}\n"
                           "num_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "cifar_dist/train.py"]


def test_an_accelerate_config_file_precision_is_recorded_and_evaluate_repeats_it(env, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "eval.json"
    proc = run(accelerate_with(tmp_path / "acc.yaml", tmp_path, "bf16") + [*TINY, f"run.dir={run_dir}"], env)
    assert "train.precision=bf16, from the launcher's mixed_precision" in proc.stdout
    assert "precision: bf16" in (run_dir / CONFIG).read_text()
    summary = RunDir(run_dir).summary()
    assert summary["precision"] == "bf16" and json.loads((run_dir / ENV).read_text())["precision"] == "bf16"
    run([PY, "-m", "cifar_dist.evaluate", str(run_dir), "--json", str(out)], env)  # no launcher here
    result = json.loads(out.read_text())
    assert (result["test_loss"], result["confusion_matrix"]) == (summary["test_loss"], summary["confusion_matrix"])


def test_an_accelerate_config_file_that_contradicts_the_config_is_one_line_and_writes_nothing(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(accelerate_with(tmp_path / "acc.yaml", tmp_path, "fp16") + [*TINY, "train.precision=bf16",
                                                                           f"run.dir={run_dir}"], env, check=False)
    # Our one line; accelerate's launcher then adds a CalledProcessError traceback of its own (and exit 1),
    # whose form changes between its versions (1.16 repeats the child's stderr as the error's cause).
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == [
        "error: train.precision: bf16 contradicts the launcher's mixed_precision=fp16 (accelerate config or "
        "--mixed_precision); make them agree or drop one"], proc.stderr
    frames = [line for line in lines if line.strip().startswith('File "')]
    assert not [f for f in frames if "cifar_dist" in f], "a traceback of the launcher's only, none of ours"
    assert not run_dir.exists()


def test_fp16_trains_with_loss_scaling_and_resumes_exactly(env, tmp_path):
    args = [*TINY, "train.precision=fp16", "checkpoint.every_steps=7"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    proc = run(train_cmd(*args, f"run.dir={whole}"), env)
    assert RunDir(whole).summary()["precision"] == "fp16"
    assert ("warning: train.precision=fp16 on a CPU without fp16 instructions" in proc.stdout) == (not cpu_has_fp16())
    proc = run(FAULTS + [*args, f"run.dir={stopped}"], dict(env, CIFAR_DIST_FAULT="signal:1:5"), check=False)
    assert proc.returncode == EXIT_REQUEUE
    saved = checkpoint.load_latest(stopped, warn=print)[1]
    assert saved["scaler"]["scale"] > 0  # the loss scale travels with the checkpoint
    run(train_cmd(*args, f"run.dir={stopped}"), env)
    assert_same_run(whole, stopped)

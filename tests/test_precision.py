"""One precision rule for every launch path (cifar_dist/precision.py): what `auto` means on each
device, what a launcher's mixed precision and dynamo settings do, fp16 with loss scaling resumed
exactly, and the precision used recorded where `evaluate` finds it."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import PY, TINY, assert_same_run, run, train_cmd

from cifar_dist import checkpoint
from cifar_dist.config import ConfigError, load_config
from cifar_dist.distributed import EXIT_REQUEUE
from cifar_dist.precision import adopt_launcher_settings, cpu_has_fp16, resolve, slow_precision_warning
from cifar_dist.rundir import CONFIG, ENV, RunDir

FAULTS = [PY, "tests/run_with_faults.py"]


@pytest.mark.parametrize(("asked", "cpu", "gpu_with_bf16", "older_gpu"), [
    ("auto", "fp32", "bf16", "fp16"),
    ("fp32", "fp32", "fp32", "fp32"),
    ("bf16", "bf16", "bf16", "bf16"),
    ("fp16", "fp16", "fp16", "fp16"),
])
def test_the_rule_on_each_device(monkeypatch, asked, cpu, gpu_with_bf16, older_gpu):
    """The GPU branches run on any machine: torch.cuda's answer is replaced by an A100's, then a V100's."""
    assert resolve(asked, torch.device("cpu")) == cpu
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert resolve(asked, torch.device("cuda")) == gpu_with_bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a V100, T4
    assert resolve(asked, torch.device("cuda")) == older_gpu


@pytest.mark.parametrize(("env", "asked", "used", "compiled"), [
    ({}, "auto", "auto", False),
    ({"ACCELERATE_MIXED_PRECISION": "no"}, "fp32", "fp32", False),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, "auto", "bf16", False),  # taken over
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "fp16", "fp16", False),  # agrees
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, "auto", "auto", True),
])
def test_launcher_settings_are_taken_over(env, asked, used, compiled):
    cfg = load_config("debug", [f"train.precision={asked}"])
    notes = adopt_launcher_settings(cfg, env)
    assert (cfg.train.precision, cfg.model.compile) == (used, compiled)
    assert len(notes) == (used != asked) + compiled


@pytest.mark.parametrize(("env", "said"), [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "train.precision: bf16 contradicts the launcher's mixed_precision=fp16"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, "mixed_precision=fp8, which this project does not train in"),
    ({"ACCELERATE_DYNAMO_BACKEND": "aot_eager"}, "only inductor"),
])
def test_launcher_settings_that_contradict_the_config_are_refused(env, said):
    with pytest.raises(ConfigError, match=said):
        adopt_launcher_settings(load_config("debug", ["train.precision=bf16"]), env)


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


@pytest.mark.parametrize("native", [True, False])
def test_fp16_on_a_cpu_without_fp16_instructions_is_warned(monkeypatch, native):
    """Emulated fp16 (asked for, or from `accelerate launch --mixed_precision fp16`) is several times
    slower than fp32 on a CPU without AVX512-FP16/AMX-FP16, as emulated bf16 is: the run says so in one
    line. The CPU's answer is replaced here, so both cases are checked on any machine."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: native)
    cfg = load_config("debug")
    adopt_launcher_settings(cfg, {"ACCELERATE_MIXED_PRECISION": "fp16"})
    warning = slow_precision_warning(cfg.train.precision, torch.device("cpu"))
    assert (warning is not None) == (not native)
    assert warning is None or (warning.startswith("warning: train.precision=fp16 on a CPU without fp16 instructions")
                               and warning.endswith("add train.precision=fp32") and "\n" not in warning)
    assert slow_precision_warning("fp16", torch.device("cuda")) is None
    assert slow_precision_warning("fp32", torch.device("cpu")) is None

"""One precision rule for every launch path (cifar_dist/precision.py): what `auto` means on each
device, what a launcher's mixed precision and dynamo settings do, and the warning that bf16 is
emulated on this CPU. Through the commands (fp16 resumed exactly, the precision recorded where
`evaluate` finds it): tests/e2e/test_precision.py."""


from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from cifar_dist.config import ConfigError, load_config
from cifar_dist.precision import adopt_launcher_settings, resolve, slow_precision_warning


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


@pytest.mark.parametrize(("flags", "onednn", "native"), [
    ({"avx512f", "avx512_bf16"}, True, True),
    ({"avx512f", "amx_tile", "amx_bf16"}, True, True),
    ({"avx512f", "avx512bw"}, True, False),  # AVX-512 alone: oneDNN says yes, and converts (1.5-1.8x slower)
    ({"avx2"}, False, False),
    (None, True, True),  # no flags listed (not Linux): oneDNN's answer
    (None, False, False),
])
def test_bf16_on_a_cpu_without_bf16_instructions_is_warned(monkeypatch, flags, onednn, native):
    """Emulated bf16 is slower than fp32 on a CPU without AVX512-BF16/AMX: the run says so. The
    CPU's flags and oneDNN's answer are replaced here, so every case is checked on any machine."""
    from cifar_dist import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    bf16, fp32 = "bf16", "fp32"
    warning = precision.slow_precision_warning(bf16, torch.device("cpu"))
    assert (warning is not None) == (not native)
    assert warning is None or "add train.precision=fp32" in warning
    assert precision.slow_precision_warning(fp32, torch.device("cpu")) is None
    assert precision.slow_precision_warning(bf16, torch.device("cuda")) is None


def test_cpu_flags_are_read_from_this_machine():
    """On Linux the flags come from /proc/cpuinfo; every x86 CPU torch runs on lists sse2 there."""
    from cifar_dist.precision import cpu_flags

    if not Path("/proc/cpuinfo").exists() or platform.machine() != "x86_64":
        pytest.skip("needs Linux on x86-64")
    flags = cpu_flags()
    assert flags is not None and "sse2" in flags


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

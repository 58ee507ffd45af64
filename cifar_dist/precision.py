"""Numeric precision, one rule for every launch path: what `train.precision` means on this device,
what a launcher's own mixed-precision or compile setting does to it, and the autocast and loss
scaling a run trains and evaluates with.

    train.precision   on a CPU   on a GPU with bf16 (Ampere and later)   on an older GPU (V100, T4)
    auto              fp32       bf16                                    fp16 (with loss scaling)
    fp32, bf16, fp16  as asked (fp16 always with loss scaling: torch.amp.GradScaler)

`accelerate launch` passes its `mixed_precision` (from flags or an accelerate config file) and
`dynamo_backend` in the environment. The project autocasts and compiles by itself (accelerate is
told not to), so: a launcher precision of fp16/bf16 is taken over when `train.precision=auto`
and written into the run's config; one that contradicts an explicit `train.precision` is refused
in one line. A launcher dynamo backend turns on `model.compile` (inductor only) the same way.
The precision actually used is recorded in summary.json and env.json.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from cifar_dist.config import Config
from cifar_dist.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtypes; fp32 runs without autocast


def resolve(precision: str, device: torch.device) -> str:
    """`train.precision` on this device: fp32, bf16 or fp16."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    used = resolve(precision, device)
    return torch.autocast(device.type, dtype=DTYPES.get(used, torch.float32), enabled=used in DTYPES)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its small range underflows small gradients); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=resolve(precision, device) == "fp16")


def adopt_launcher_settings(cfg: Config, environ: dict[str, str] | None = None) -> list[str]:
    """Apply the launcher's mixed precision and dynamo backend to `cfg` by the rule above; the
    notes to print. Raises ConfigError when the launcher contradicts the config."""
    env = os.environ if environ is None else environ
    notes = []
    launcher = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("", "no"):
        if launcher not in DTYPES:
            raise ConfigError(f"train.precision: the launcher asks for mixed_precision={launcher}, which this project "
                              "does not train in (fp16, bf16 or no)")
        if cfg.train.precision == "auto":
            cfg.train.precision = launcher
            notes.append(f"note: train.precision={launcher}, from the launcher's mixed_precision (recorded in config.yaml)")
        elif cfg.train.precision != launcher:
            raise ConfigError(f"train.precision: {cfg.train.precision} contradicts the launcher's mixed_precision={launcher} "
                              "(accelerate config or --mixed_precision); make them agree or drop one")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo not in ("", "no"):
        if dynamo != "inductor":
            raise ConfigError(f"model.compile: the launcher asks for dynamo_backend={dynamo}; only inductor "
                              "(model.compile=true) is supported")
        if not cfg.model.compile:
            cfg.model.compile = True
            notes.append("note: model.compile=true, from the launcher's dynamo_backend=inductor (recorded in config.yaml)")
    return notes


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16; BF16 on ARM), by the flags Linux
    lists; oneDNN's own answer where none are listed. Without them bf16 is emulated: the `medium` step
    ran 8x slower than fp32 on a 2-core AVX2 VM and 1.5-1.8x slower on an AVX-512 one (whose oneDNN
    check says yes: it converts), against 1.8x faster with them (benchmarks/RESULTS.md)."""
    flags = cpu_flags()
    if flags is None:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", ARM "Features"); None where it lists none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_has_fp16() -> bool:
    """Whether this CPU has fp16 matrix instructions (AVX512-FP16, AMX-FP16). Without them fp16 is
    emulated: measured 3.5x (blitz) and 4x (medium) slower than fp32 on a 2-core Xeon VM that has
    AMX-BF16 but not AMX-FP16 (a step of 64 images, one probe on a shared machine)."""
    return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


def slow_precision_warning(precision: str, device: torch.device) -> str | None:
    """The warning for a precision this CPU emulates (bf16 or fp16, asked for or taken from `accelerate
    launch --mixed_precision`), several times slower than fp32; None when there is nothing to say."""
    if device.type != "cpu" or precision not in DTYPES or {"bf16": cpu_has_bf16, "fp16": cpu_has_fp16}[precision]():
        return None
    units = "AVX512-BF16 or AMX" if precision == "bf16" else "AVX512-FP16 or AMX-FP16"
    return (f"warning: train.precision={precision} on a CPU without {precision} instructions ({units}) is emulated, "
            f"{'1.5x to 8x' if precision == 'bf16' else 'several times'} slower than fp32; add train.precision=fp32")

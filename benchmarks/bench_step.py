"""The CPU training step against the hardware: the `medium` net's bare step (forward, backward and
SGD step; no data path) in GFLOP/s, beside 2048x2048 matmuls of the same precision and threads,
measured in the same run; one table appended to benchmarks/RESULTS.md.

    python benchmarks/bench_step.py [--rounds 5] [--seconds 3] [--allocator default]

The process keeps its freed memory as a training process on a CPU does (allocator.py), unless
--allocator default leaves glibc's malloc as it comes. Arms: fp32 and bf16 autocast (as
`train.precision`), channels_last (as training), at one thread with batch 64 (one of two gloo
ranks on 2 cores, as `medium_sprint` runs) and at two threads with batch 128 (one process). The
step's FLOPs are counted by torch.utils.flop_counter on one forward and backward (the optimizer's
few element-wise FLOPs are left out). Each round times as many steps as fit in --seconds after 3
of warm-up; a row gives the median of the rounds and their range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_table, spread  # noqa: E402

from cifar_dist.allocator import keep_freed_memory  # noqa: E402
from cifar_dist.models import build_model, set_dropout  # noqa: E402
from cifar_dist.precision import cpu_flags  # noqa: E402

MATMUL = 2048
SHAPES = ((1, 64), (2, 128))  # (threads, batch)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bf16_flags() -> str:
    """The CPU's flags that decide bf16's speed, as /proc/cpuinfo lists them."""
    found = sorted((cpu_flags() or set()) & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2"})
    return ", ".join(found) or "none of avx2, avx512f, avx512_bf16, amx_bf16"


def timed(fn, seconds: float) -> float:
    """Seconds per call of `fn`, over as many calls as fit in `seconds` (after 3 of warm-up)."""
    for _ in range(3):
        fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def matmul(dtype: torch.dtype):
    a, b = torch.randn(MATMUL, MATMUL, dtype=dtype), torch.randn(MATMUL, MATMUL, dtype=dtype)
    return lambda: torch.mm(a, b)


def step(precision: str, batch: int):
    """One training step of `medium` as the loop runs it, and its FLOPs (forward and backward)."""
    torch.manual_seed(0)
    net = build_model("medium", 10).to(memory_format=torch.channels_last)
    set_dropout(net, 0)  # as medium_sprint trains it
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:  # counts matmuls and convolutions: the optimizer's element-wise updates are not among them
        one()
    return one, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed per arm and round (default 3)")
    parser.add_argument("--allocator", choices=("kept", "default"), default="kept",
                        help="kept: freed memory stays in the process, as in training (default); default: glibc's own")
    args = parser.parse_args()
    if args.allocator == "kept" and not keep_freed_memory():
        raise SystemExit("error: --allocator kept needs glibc's malloc, with no MALLOC_* tunables or LD_PRELOAD set")
    peaks: dict[tuple[int, str], list[float]] = {}
    steps: dict[tuple[int, int, str], list[float]] = {}
    flops: dict[tuple[int, str], float] = {}
    for _ in range(args.rounds):  # rounds of every arm in turn: a shared machine's drift falls on all
        for threads, batch in SHAPES:
            torch.set_num_threads(threads)
            for precision, dtype in DTYPES.items():
                s = timed(matmul(dtype), args.seconds)
                peaks.setdefault((threads, precision), []).append(2 * MATMUL**3 / s / 1e9)
                fn, flops[(batch, precision)] = step(precision, batch)
                s = timed(fn, args.seconds)
                steps.setdefault((threads, batch, precision), []).append(flops[(batch, precision)] / s / 1e9)
    rows = []
    for threads, batch in SHAPES:
        for precision in DTYPES:
            gflops, peak = steps[(threads, batch, precision)], peaks[(threads, precision)]
            fraction = statistics.median(gflops) / statistics.median(peak)
            images = [g * 1e9 / flops[(batch, precision)] * batch for g in gflops]
            rows.append([str(threads), str(batch), precision, f"{flops[(batch, precision)] / batch / 1e6:.1f}",
                         spread(images, "{:,.0f}"), spread(gflops, "{:.0f}"), spread(peak, "{:.0f}"), f"{fraction:.0%}"])
    notes = [f"CPU flags for bf16 (/proc/cpuinfo): {bf16_flags()}",
             "step: `medium` net without dropout, channels_last, SGD (momentum 0.9, nesterov, weight decay 5e-4), "
             "cross-entropy with label smoothing 0.1, random inputs, no data path; FLOPs of forward + backward by "
             "torch.utils.flop_counter",
             "allocator: " + ("freed memory kept in the process, as training runs (allocator.py)" if args.allocator == "kept"
                              else "glibc's malloc as it comes (--allocator default)"),
             f"peak: torch.mm of two {MATMUL}x{MATMUL} matrices in that precision on those threads",
             f"{args.rounds} rounds, {args.seconds:g} s per arm and round; median (min-max, rounds)"]
    append_table("The CPU step against the hardware: `medium` step GFLOP/s beside matmul peaks (bench_step.py)", notes,
                 ["threads", "batch", "precision", "MFLOP/image", "images/s", "step GFLOP/s", "matmul GFLOP/s",
                  "step / matmul"], rows)


if __name__ == "__main__":
    main()

"""Data-parallel throughput.

CPU: one process using every core vs one gloo rank per core, whole `cifar-dist train` runs of a
shipped config, in turn in every round (the summary's images/s: training steps, records and
evaluation; data preparation and start-up excluded). Which wins depends on the CPU, the net and
the precision, so measure it on yours.
GPU (when one is present): per-GPU images/s of the `fast` net's training step with and without
the DDP wrapper at N = 1, so the wrapper's own overhead is known.

    python benchmarks/bench_ddp.py [--config medium_sprint] [--data cifar10-jpeg.tar.gz]
        [--extra train.epochs=1] [--repeats 3] [--gpu-steps 200]

Without --data the CPU runs train on synthetic images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_table, run_training, spread  # noqa: E402

SYNTHETIC = ["data.source=synthetic", "data.synthetic_train=10240", "data.synthetic_test=1000"]


def gpu_step_rates(steps: int) -> dict[str, float]:
    """images/s of the fast recipe's step, plain module vs DDP-wrapped, one GPU."""
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from cifar_dist.config import load_config
    from cifar_dist.data import TrainBatches
    from cifar_dist.models import build_model
    from cifar_dist.precision import autocast_context
    from cifar_dist.recipe import make_optimizer, make_step
    from cifar_dist.sources import CIFAR10_STATS

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    tdist.init_process_group("nccl", rank=0, world_size=1)
    cfg = load_config("fast", ["model.compile=false"])
    device = torch.device("cuda")
    images = torch.randint(0, 256, (50_000, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (50_000,), device=device)
    batches = TrainBatches(images, labels, cfg.data, global_batch=cfg.train.batch_size, rank=0, world=1, seed=0,
                           memory_format=torch.channels_last, stats=CIFAR10_STATS)  # random images: any statistics do
    rates = {}
    for wrapped in (False, True):
        net = build_model("fast").to(device, memory_format=torch.channels_last)
        model = DistributedDataParallel(net) if wrapped else net
        optimizer, scheduler = make_optimizer(cfg, net, batches.steps_per_epoch, 10 * batches.steps_per_epoch)
        step = make_step(cfg, model, optimizer, scheduler, autocast_context(cfg.train.precision, device))
        for s in range(20):
            step(*batches.batch(0, s % batches.steps_per_epoch))
        torch.cuda.synchronize()
        t = time.perf_counter()
        for s in range(steps):
            step(*batches.batch(1, s % batches.steps_per_epoch))
        torch.cuda.synchronize()
        rates["DDP" if wrapped else "plain"] = steps * cfg.train.batch_size / (time.perf_counter() - t)
    tdist.destroy_process_group()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-steps", type=int, default=200)
    parser.add_argument("--config", default="medium_sprint", help="CPU: the shipped config (or YAML) both arms run")
    parser.add_argument("--data", type=Path, help="CPU: cifar10-jpeg.tar.gz (default: synthetic images)")
    parser.add_argument("--extra", nargs="*", default=["train.epochs=1"], help="CPU: overrides for both arms")
    args = parser.parse_args()
    import torch

    if torch.cuda.is_available():
        runs = [gpu_step_rates(args.gpu_steps) for _ in range(args.repeats)]
        plain, ddp = [r["plain"] for r in runs], [r["DDP"] for r in runs]
        overhead = [100 * (p - d) / p for p, d in zip(plain, ddp)]
        append_table("DDP wrapper overhead at N = 1 (GPU, fast net, batch 1024, bf16, no compile)",
                     ["images/s of the training step alone (augmented batch from GPU-resident data, forward, "
                      "backward, SGD step)"],
                     ["module", "images/s per GPU", "overhead"],
                     [["plain", spread(plain, "{:,.0f}"), ""], ["DDP (1 rank, NCCL)", spread(ddp, "{:,.0f}"),
                                                               spread(overhead, "{:.1f}%")]])
    else:
        cores = os.cpu_count() or 1
        data = ["data.source=imagefolder", f"data.path={args.data.resolve()}"] if args.data else SYNTHETIC
        overrides = [*data, *args.extra]
        one, per_core = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):  # in turn, so drifts in machine load hit both alike
                one.append(run_training(args.config, 1, overrides, Path(tmp) / f"one-{i}")["images_per_second"])
                per_core.append(run_training(args.config, cores, overrides, Path(tmp) / f"per-core-{i}")["images_per_second"])
        append_table(
            f"1 process of {cores} threads vs {cores} gloo ranks of 1 thread on {cores} CPU cores (`--config {args.config}`)",
            [f"run: `cifar-dist train --config {args.config} {' '.join(overrides)}`; the arms in turn in each of "
             f"{args.repeats} rounds",
             "images/s from summary.json (training steps, records and evaluation; start-up and data preparation "
             "excluded)"],
            ["arm", "images/s", "ratio to 1 process"],
            [[f"1 process, {cores} threads", spread(one, "{:,.0f}"), "1.00"],
             [f"{cores} gloo ranks, 1 thread each", spread(per_core, "{:,.0f}"),
              spread([b / a for a, b in zip(one, per_core)], "{:.2f}")]])


if __name__ == "__main__":
    main()

"""Data-parallel throughput.

CPU: images/s of 1 rank vs 2 gloo ranks sharing the same cores, whole `cifar-dist train` runs
(the summary's images/s: training steps, records and evaluation; data preparation excluded).
GPU (when one is present): per-GPU images/s of the `fast` net's training step with and without
the DDP wrapper at N = 1, so the wrapper's own overhead is known.

    python benchmarks/bench_ddp.py [--repeats 3] [--gpu-steps 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_table, spread, train_launcher  # noqa: E402

from cifar_dist.rundir import RunDir

CPU_RUN = ["model.name=medium", "data.source=synthetic", "data.synthetic_train=10240", "data.synthetic_test=1000",
           "train.epochs=2", "train.batch_size=256", "train.log_every=20", "eval.every=0", "run.progress=none"]


def cpu_images_per_second(ranks: int, tmp: Path, i: int) -> float:
    import subprocess

    run_dir = tmp / f"r{ranks}-{i}"
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    subprocess.run(train_launcher(ranks) + CPU_RUN + [f"run.dir={run_dir}"], check=True, cwd=ROOT, env=env)
    return RunDir(run_dir).summary()["images_per_second"]


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
        with tempfile.TemporaryDirectory() as tmp:
            one, two = [], []
            for i in range(args.repeats):  # alternate, so drifts in machine load hit both alike
                one.append(cpu_images_per_second(1, Path(tmp), i))
                two.append(cpu_images_per_second(2, Path(tmp), i))
        append_table(
            "1 rank vs 2 gloo ranks on the same CPU cores (medium net, batch 256 global)",
            [f"config: {' '.join(CPU_RUN)}", "images/s from summary.json (training time incl. records; "
             "both ranks share the machine's cores, OMP threads split between them)",
             "no GPU was lent to this session: the GPU half of this benchmark (DDP wrapper overhead) is not measured"],
            ["ranks", "images/s", "ratio to 1 rank"],
            [["1", spread(one, "{:,.0f}"), "1.00"],
             ["2 (gloo)", spread(two, "{:,.0f}"), spread([b / a for a, b in zip(one, two)], "{:.2f}")]])


if __name__ == "__main__":
    main()

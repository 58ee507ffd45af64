"""The `fast` recipe on a GPU: accuracy and training time over repeated runs, and the
framework's per-step overhead against a bare loop of the same compiled step.

    python benchmarks/bench_fast.py --data .data/cifar10-jpeg.tar.gz [--repeats 5] [--config fast]

Training time is summary.json's `train_seconds`: first step to final evaluation, with the
framework's records and final checkpoint, without process start-up, data upload and compile
(`compile_seconds`, reported apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, append_table, spread  # noqa: E402


def framework_run(config: str, data: Path, run_dir: Path, extra: list[str]) -> tuple[dict, list[dict]]:
    subprocess.run([PY, "-m", "cifar_dist.train", "--config", config, "data.source=imagefolder", f"data.path={data}",
                    f"run.dir={run_dir}", "run.progress=none", *extra], check=True, cwd=ROOT)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def bare_step_seconds(config: str, data: Path, extra: list[str], steps: int) -> float:
    """Seconds per step of the same step function in a bare loop: no records, no DDP wrapper."""
    from cifar_dist.config import load_config
    from cifar_dist.data import TrainBatches, load_dataset
    from cifar_dist.models import build_model
    from cifar_dist.train import autocast_context, make_optimizer, make_step

    cfg = load_config(config, ["data.source=imagefolder", f"data.path={data}", *extra])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: to try the script out
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    ds = load_dataset(cfg.data).to(device)
    batches = TrainBatches(ds.train_x, ds.train_y, cfg.data, cfg.train.batch_size, 0, 1, cfg.seed, torch.channels_last)
    net = build_model(cfg.model.name).to(device, memory_format=torch.channels_last)
    optimizer, scheduler = make_optimizer(cfg, net, batches.steps_per_epoch, 10**6)
    step = make_step(cfg, net, optimizer, scheduler, autocast_context(cfg, device))
    for s in range(10):
        step(*batches.batch(0, s))
    sync()
    t = time.perf_counter()
    for s in range(steps):
        step(*batches.batch(1 + s // batches.steps_per_epoch, s % batches.steps_per_epoch))
    sync()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", default="fast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run i has seed first_seed + i")
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--bare-steps", type=int, default=200, help="steps of the bare loop timed")
    args = parser.parse_args()
    accs, secs, compiles, step_secs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            seed = [f"seed={args.first_seed + i}"]
            summary, records = framework_run(args.config, args.data, Path(tmp) / f"r{i}", args.extra + seed)
            accs.append(100 * summary["test_accuracy"])
            secs.append(summary["train_seconds"])
            compiles.append(summary["compile_seconds"])
            last_train = [r for r in records if "train_loss" in r][-1]
            step_secs.append(last_train["time"] / last_train["step"])
            print(f"run {i}: {accs[-1]:.2f}% in {secs[-1]:.2f} s (+{compiles[-1]:.1f} s compile)", flush=True)
    bare = bare_step_seconds(args.config, args.data, args.extra, steps=args.bare_steps)
    overhead = [100 * (s / bare - 1) for s in step_secs]
    append_table(
        f"`{args.config}` recipe on {'one GPU' if torch.cuda.is_available() else 'the CPU'}: accuracy and time",
        [f"data: {args.data.name}; `cifar-dist train --config {args.config}` {' '.join(args.extra)}",
         f"mean test accuracy {statistics.mean(accs):.2f}% over {len(accs)} runs "
         f"(seeds {args.first_seed}..{args.first_seed + len(accs) - 1})",
         f"bare loop of the same step: {1000 * bare:.2f} ms/step; framework overhead = framework ms/step / bare - 1"],
        ["test accuracy %", "train seconds", "compile seconds", "framework ms/step", "framework overhead"],
        [[spread(accs, "{:.2f}"), spread(secs, "{:.2f}"), spread(compiles, "{:.1f}"),
          spread([1000 * s for s in step_secs], "{:.2f}"), spread(overhead, "{:.1f}%")]])


if __name__ == "__main__":
    main()

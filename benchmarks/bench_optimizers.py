"""`medium` trained with `train.optimizer=adamw` against its own SGD recipe on the same data, the
same epochs, seed, precision and ranks, one after the other on this machine; one table appended to
benchmarks/RESULTS.md, a row per optimiser.

    python benchmarks/bench_optimizers.py --data cifar10-jpeg.tar.gz --epochs 6 [--adamw-lr find] [--adamw-wd 0.05]

The SGD arm is `medium.yaml` as shipped (lr 0.1, Nesterov momentum 0.9, L2 weight decay 5e-4).
The AdamW arm changes only the optimiser: betas (0.9, 0.999), decoupled weight decay `--adamw-wd`
(default 0.05: its per-step shrink, lr x 0.05 ~ 1e-4 at lr 2e-3, is of the order of SGD's L2 at lr
0.1, 0.1 x 5e-4 = 5e-5) without decay on norms and biases, and its peak LR: `--adamw-lr find`
runs `cifar-dist lr-find` on the same data with the AdamW config (200 steps) and takes its
suggestion; a number is used as given. The warm-up, linear decay, label smoothing and augmentation
are the recipe's for both. Precision: fp32 unless the CPU's flags (/proc/cpuinfo, as lscpu shows
them) include avx512_bf16 or amx_bf16 (`medium.yaml`'s bf16 is emulated without them), or as given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_table, train_launcher  # noqa: E402

from cifar_dist.precision import cpu_has_bf16  # noqa: E402
from cifar_dist.rundir import RunDir  # noqa: E402


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (5 min: {five:.1f})"


def command(module: str, ranks: int, data: Path, args: list[str]) -> None:
    """`python -m cifar_dist.<module> --config medium` on the archive, on `ranks` gloo ranks of a share of the cores each."""
    launcher = train_launcher(ranks)[:-1] + [f"cifar_dist.{module}"]  # its `-m cifar_dist.train`, another module
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    subprocess.run([*launcher, "--config", "medium", "data.source=imagefolder", f"data.path={data}", *args], check=True,
                   cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=threads))


def train(data: Path, run_dir: Path, ranks: int, extra: list[str]) -> tuple[dict, str, str]:
    before = load()
    command("train", ranks, data, [f"run.dir={run_dir}", "run.progress=none", *extra])
    return RunDir(run_dir).summary(), before, load()


def found_lr(data: Path, out: Path, ranks: int, extra: list[str]) -> float:
    command("lr_find", ranks, data, ["--out", str(out), *extra])
    return json.loads((out / "lr_find.json").read_text())["suggested_lr"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the CIFAR-10 image-folder archive")
    parser.add_argument("--epochs", type=int, default=12, help="both arms (medium.yaml: 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks of one thread each (medium_sprint.yaml: faster "
                                                             "than one process of two threads on two cores)")
    parser.add_argument("--adamw-lr", default="find", help="'find' (cifar-dist lr-find's suggestion) or a number")
    parser.add_argument("--adamw-wd", type=float, default=0.05)
    parser.add_argument("--precision", default="", help="fp32 | bf16; default fp32 unless the CPU has bf16 instructions")
    args = parser.parse_args()
    precision = args.precision or ("bf16" if cpu_has_bf16() else "fp32")
    common = [f"train.epochs={args.epochs}", f"seed={args.seed}", f"train.precision={precision}"]
    adamw = ["train.optimizer=adamw", "train.betas=0.9,0.999", f"train.weight_decay={args.adamw_wd}",
             "train.decay_norms_and_biases=false"]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        if args.adamw_lr == "find":
            lr = found_lr(args.data, Path(tmp) / "lr-find", args.ranks, [*common, *adamw])
            how = (f"AdamW peak lr {lr:.3g}: `cifar-dist lr-find` on the same data with the AdamW settings (200 steps "
                   f"from 1e-6 to 10, {time.monotonic() - start:.0f} s): a tenth of the LR at its lowest smoothed loss")
        else:
            lr = float(args.adamw_lr)
            how = f"AdamW peak lr {lr:g}, as given"
        arms = [("sgd", "lr 0.1, Nesterov momentum 0.9, L2 weight decay 5e-4 on every parameter (medium.yaml)", []),
                ("adamw", f"lr {lr:.3g}, betas (0.9, 0.999), eps 1e-8, decoupled weight decay {args.adamw_wd:g}, none on "
                          "norms and biases", [*adamw, f"train.lr={lr:.4g}"])]
        for name, settings, extra in arms:
            summary, before, after = train(args.data, Path(tmp) / name, args.ranks, [*common, *extra])
            rows.append([f"`{name}`", settings, str(args.epochs), f"{100 * summary['test_accuracy']:.2f}",
                         f"{100 * summary['best_test_accuracy']:.2f}", f"{summary['test_loss']:.4f}",
                         f"{summary['train_seconds']:.0f}", f"{summary['images_per_second']:,.0f}", f"{before} -> {after}"])
            print(f"{name}: {100 * summary['test_accuracy']:.2f}% in {summary['train_seconds']:.0f} s", flush=True)
        notes = [f"data: {args.data.name} (data.source=imagefolder); `cifar-dist train --config medium` with "
                 f"{' '.join(common)}, on {args.ranks} gloo rank(s); the same seed, data order and augmentation for both",
                 how, f"whole benchmark: {time.monotonic() - start:.0f} s",
                 "test accuracy with medium.yaml's flip test-time augmentation; one run per arm: a direction, not a "
                 "significant difference"]
    append_table(f"`medium`: AdamW against SGD, {args.epochs} epochs ({precision}, CPU)", notes,
                 ["optimizer", "settings", "epochs", "final test accuracy %", "best test accuracy %", "final test loss",
                  "train seconds", "images/s", "load average before -> after"], rows)


if __name__ == "__main__":
    main()

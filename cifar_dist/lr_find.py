"""`cifar-dist lr-find --config X [key=value ...]`: the learning-rate range test (L. Smith, "Cyclical
Learning Rates for Training Neural Networks", 2017). From the config's initial weights (its
`train.init_from` too), train while the LR grows exponentially from --start-lr to --end-lr over
--steps optimiser steps, recording the loss of each; plot loss against LR, suggest a peak LR and
print the override that uses it.

    cifar-dist lr-find --config medium data.path=cifar10-jpeg.tar.gz
    torchrun --nproc_per_node 2 -m cifar_dist.lr_find --config medium ...

Every step is the config's own (batch, optimiser, weight decay, precision, micro-batches,
clipping); its warm-up and schedule are replaced by the sweep, and nothing is saved but the curve.
It runs on any number of ranks: each step's loss is the mean over the global batch (one all-reduce),
so every rank sees the same curve and stops at the same step, and N ranks trace the curve one rank
does (up to float summation order).

The curve is smoothed (an exponential moving average of the losses, bias-corrected, as fastai's
and torch-lr-finder's finders do, with a memory of about 5% of the sweep: 0.95 per step over 200
steps, torch-lr-finder's default) and the sweep stops early once the smoothed loss exceeds DIVERGED times its minimum.
The suggested peak LR is a tenth of the LR at the smoothed loss's minimum: at the minimum itself
the loss is about to blow up, and an order of magnitude below it is where it still falls steeply.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_dist.config import Config, add_config_arguments, load_config
from cifar_dist.data import TrainBatches, load_dataset
from cifar_dist.distributed import Distributed
from cifar_dist.errors import UserError, run_command
from cifar_dist.finetune import load_init, read_init
from cifar_dist.precision import autocast_context, grad_scaler
from cifar_dist.recipe import build_optimizer, make_net, make_step, param_groups
from cifar_dist.rundir import write_json

MEMORY_FORMAT = torch.channels_last  # as training's step (loop.MEMORY_FORMAT)
STEPS = 200
START_LR, END_LR = 1e-6, 10.0
MEMORY = 0.05  # the smoothed loss's memory, a share of the sweep's steps
DIVERGED = 4.0  # the sweep stops once the smoothed loss is this many times its minimum
PLOT, VALUES = "lr_find.png", "lr_find.json"


@dataclass
class Curve:
    """The sweep: the LR of each step and its loss (mean over the global batch), raw and smoothed."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped: str = ""  # why the sweep ended before its last step, or ""
    smoothing: float = 0.95  # weight of the past in the smoothed loss
    average: float = 0.0  # the moving average before its bias correction

    def add(self, lr: float, loss: float) -> None:
        self.lrs.append(lr)
        self.losses.append(loss)
        self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        self.smoothed.append(self.average / (1 - self.smoothing ** len(self.losses)))

    def diverged(self) -> bool:
        last = self.smoothed[-1]
        return not math.isfinite(last) or last > DIVERGED * min(self.smoothed)

    def lowest(self) -> int:
        """The step of the lowest smoothed loss."""
        finite = [(v, i) for i, v in enumerate(self.smoothed) if math.isfinite(v)]
        if not finite:
            raise UserError("lr-find: the loss was not finite at any LR; lower --start-lr")
        return min(finite)[1]

    def suggestion(self) -> float:
        return self.lrs[self.lowest()] / 10


def sweep(cfg: Config, dist: Distributed, steps: int, start_lr: float, end_lr: float) -> Curve:
    """The range test on this rank's share of each global batch; the same curve on every rank."""
    init = read_init(cfg)
    data = load_dataset(cfg.data, announce=dist.print).to(dist.device)
    batches = TrainBatches(data.train_x, data.train_y, cfg.data, global_batch=cfg.train.batch_size, rank=dist.rank,
                           world=dist.world, seed=cfg.seed, memory_format=MEMORY_FORMAT, stats=data.stats)
    net = make_net(cfg, data.train_x, len(data.classes), MEMORY_FORMAT, dist.rank, stats=data.stats)
    if init is not None:
        dist.print(load_init(net, init, cfg.model.name, data.classes)[0])
    model = dist.prepare(net, cfg.train.sync_bn)
    t = cfg.train
    groups = param_groups(net, t.lr, t.weight_decay, t.bias_lr_scale, 0, decay_norms_and_biases=t.decay_norms_and_biases)
    optimizer = build_optimizer(cfg, groups)
    growth = (end_lr / start_lr) ** (1 / max(1, steps - 1))  # per step
    # Every group keeps its ratio to train.lr (bias_lr_scale); the main group's LR is the one swept.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: start_lr * growth**s / t.lr)
    step = make_step(cfg, model, optimizer, scheduler, autocast_context(t.precision, dist.device),
                     grad_scaler(t.precision, dist.device))
    curve = Curve(smoothing=min(0.98, max(0.5, 1 - 1 / (MEMORY * steps))))
    for s in range(steps):
        lr = scheduler.get_last_lr()[0]
        loss = step(*batches.batch(s // batches.steps_per_epoch, s % batches.steps_per_epoch))
        curve.add(lr, float(dist.sum(loss.float())) / dist.world)
        if curve.diverged():
            curve.stopped = f"stopped at step {s + 1} of {steps}: the smoothed loss passed {DIVERGED:g}x its minimum"
            break
    return curve


def plot(curve: Curve, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    best, suggested = curve.lowest(), curve.suggestion()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(curve.lrs, curve.losses, color="0.75", linewidth=1, label="loss (mean over the global batch)")
    ax.plot(curve.lrs, curve.smoothed, color="C0", linewidth=2, label="smoothed")
    ax.axvline(suggested, color="C2", linestyle="--", label=f"suggested peak lr {suggested:.3g}")
    ax.plot([curve.lrs[best]], [curve.smoothed[best]], "o", color="C3", label=f"lowest smoothed loss, lr {curve.lrs[best]:.3g}")
    ax.set_xscale("log")
    top = min(max(curve.smoothed[: best + 1]) * 1.1, DIVERGED * curve.smoothed[best])  # the blow-up off the chart
    ax.set_ylim(min(curve.losses) * 0.95 if min(curve.losses) > 0 else None, top)
    ax.set_xlabel("learning rate (main parameter group)")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar-dist lr-find", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, " (its net, data, batch and optimiser; the sweep replaces train.lr and its schedule)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimiser steps of the sweep (default {STEPS})")
    parser.add_argument("--start-lr", type=float, default=START_LR, help=f"the first step's LR (default {START_LR:g})")
    parser.add_argument("--end-lr", type=float, default=END_LR, help=f"the last step's LR (default {END_LR:g})")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help=f"folder for {PLOT} and {VALUES} (default lr-find/<model>-<time>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_intermixed_args(argv)
    if args.steps < 10:
        raise UserError(f"--steps: at least 10 (a curve to read), got {args.steps}")
    if not 0 < args.start_lr < args.end_lr or not math.isfinite(args.end_lr):
        raise UserError(f"--start-lr and --end-lr: need 0 < start < end, got {args.start_lr:g} and {args.end_lr:g}")
    cfg = load_config(args.config, args.overrides)
    dist = Distributed(cfg.train.device)
    try:
        out = Path(dist.broadcast(str(args.out or Path("lr-find") / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")))
        curve = sweep(cfg, dist, args.steps, args.start_lr, args.end_lr)
        dist.main_only(lambda: report(curve, cfg, args, dist.world, out))
    finally:
        dist.close()
    return 0


def report(curve: Curve, cfg: Config, args: argparse.Namespace, world: int, out: Path) -> None:
    """Rank 0: the plot, the values, and what to do with them."""
    out.mkdir(parents=True, exist_ok=True)
    best, suggested = curve.lowest(), curve.suggestion()
    t = cfg.train
    what = (f"{cfg.model.name}, {t.optimizer}, batch {t.batch_size} on {world} rank{'s' * (world > 1)}: "
            f"{len(curve.lrs)} steps from lr {args.start_lr:g} to {curve.lrs[-1]:.3g}")
    values: dict[str, Any] = {"lr": curve.lrs, "loss": curve.losses, "smoothed": curve.smoothed, "world_size": world,
                              "lowest_at_lr": curve.lrs[best], "suggested_lr": suggested, "stopped": curve.stopped}
    write_json(out / VALUES, values)
    plot(curve, f"LR range test: {what}\nsuggested peak lr {suggested:.3g} (a tenth of the lowest smoothed loss's)",
         out / PLOT)
    configs = [part for name in args.config or [] for part in ("--config", name)]
    kept = [o for o in args.overrides if not o.startswith("train.lr=")]
    command = shlex.join(["cifar-dist", "train", *configs, *kept, f"train.lr={suggested:.3g}"])
    print(f"lr-find: {what}" + (f" ({curve.stopped})" if curve.stopped else ""))
    print(f"lowest smoothed loss {curve.smoothed[best]:.4f} at lr {curve.lrs[best]:.3g}; "
          f"suggested peak lr {suggested:.3g} (a tenth of it)")
    print(f"plot {out / PLOT}, values {out / VALUES}")
    print(f"train with it:\n  {command}", flush=True)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

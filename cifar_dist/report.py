"""What people read: the console during training, and plots and comparisons made from run
directories alone (metrics.jsonl, summary.json, config.yaml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cifar_dist.config import Config
from cifar_dist.distributed import Distributed
from cifar_dist.evaluate import EvalResult

# ---------------------------------------------------------------------------- console


class Console:
    """Rank 0's console: a progress bar on a terminal, plain lines in logs (Slurm), nothing
    on other ranks."""

    def __init__(self, dist: Distributed, cfg: Config, steps_per_epoch: int, classes: list[str]):
        mode = cfg.run.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if dist.is_main else "none"
        self.dist, self.cfg, self.steps_per_epoch, self.classes = dist, cfg, steps_per_epoch, classes
        self.bar = None
        self.last_step = 0

    def start(self, run: Any, n_params: int, n_train: int, total_steps: int, pos: Any) -> None:
        if self.mode == "none":
            return
        c = self.cfg
        print(f"run {run.path}  id {run.run_id}\n"
              f"model {c.model.name} ({n_params:,} parameters) on {self.dist.world} x {self.dist.device.type}  "
              f"data {c.data.source}: {n_train:,} training images, {self.steps_per_epoch} steps/epoch of "
              f"{c.train.batch_size}  epochs {c.train.epochs}", flush=True)
        self.last_step = pos.step
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=pos.step, unit="step", dynamic_ncols=True, leave=False)

    def train(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(record["step"] - self.last_step)
            self.bar.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.3g}")
        elif self.mode == "lines":
            print(f"epoch {record['epoch']:6.2f}  step {record['step']:6d}  loss {record['train_loss']:.4f}  "
                  f"lr {record['lr']:.4g}  {record['time']:8.1f} s", flush=True)
        self.last_step = record["step"]

    def eval(self, record: dict[str, Any], result: EvalResult) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.clear()
        print(format_eval(record, result, self.classes), flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.mode != "none":
            print(f"done: test accuracy {summary['test_accuracy']:.2%} (best {summary['best_test_accuracy']:.2%}) "
                  f"in {summary['train_seconds']:.1f} s, {summary['images_per_second']:,.0f} images/s", flush=True)


def format_eval(record: dict[str, Any], result: EvalResult, classes: list[str]) -> str:
    """The seeds' per-class accuracy printout, as a table with the class counts."""
    totals = result.confusion.sum(1).tolist()
    width = max(len(c) for c in classes)
    lines = [f"epoch {record['epoch']}  step {record['step']}  test accuracy {result.accuracy:.2%}  "
             f"loss {result.loss:.4f}  ({int(result.confusion.sum())} images)"]
    for name, acc, total in zip(classes, result.per_class, totals):
        lines.append(f"  {name:>{width}}  {acc:7.2%}  {'#' * round(acc * 20):<20}  of {total}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_plots(run_dir: Path) -> None:
    """loss.png (train and test loss against epochs) and per_class_accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "train_loss" in r]
    test = [r for r in records if "test_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot([r["epoch"] for r in train], [r["train_loss"] for r in train], label="train loss (label-smoothed)")
    ax.plot([r["epoch"] for r in test], [r["test_loss"] for r in test], "o-", label="test loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"loss: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png")
    plt.close(fig)

    summary = json.loads((run_dir / "summary.json").read_text())
    per_class = summary["per_class_accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.bar(list(per_class), [100 * v for v in per_class.values()])
    ax.axhline(100 * summary["test_accuracy"], color="k", ls="--", lw=1, label=f"overall {summary['test_accuracy']:.1%}")
    ax.set(ylabel="test accuracy (%)", ylim=(0, 100), title=f"per-class accuracy: {run_dir.name}")
    ax.tick_params(axis="x", rotation=45)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "per_class_accuracy.png")
    plt.close(fig)

"""What rank 0 prints while a run trains: a progress bar on a terminal, plain lines in logs
(Slurm output files), the per-class evaluation table (a summary with the best and worst classes
when there are many); nothing on other ranks."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Iterable
from typing import Any

from cifar_dist.config import Config
from cifar_dist.distributed import Distributed
from cifar_dist.metrics import MANY_CLASSES, EvalResult

BEST_AND_WORST = 5  # classes printed at each end of the ranking when there are too many to list


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
        self.total_steps = 0
        self.last_time = 0.0  # training seconds at the previous record: images/s and the ETA come from the interval

    def start(self, run: Any, n_params: int, n_train: int, total_steps: int, pos: Any) -> None:
        if self.mode == "none":
            return
        c = self.cfg
        print(f"run {run.path}  id {run.run_id}\n"
              f"model {c.model.name} ({n_params:,} parameters) on {self.dist.world} x {self.dist.device.type}  "
              f"data {c.data.source}: {n_train:,} training images, {self.steps_per_epoch} steps/epoch of "
              f"{c.train.batch_size}  epochs {c.train.epochs}", flush=True)
        self.last_step, self.last_time, self.total_steps = pos.step, pos.elapsed, total_steps
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=pos.step, unit="step", dynamic_ncols=True, leave=False)

    def train(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(record["step"] - self.last_step)
            self.bar.set_postfix(epoch=f"{record['epoch']:.2f}", loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.3g}")
        elif self.mode == "lines":  # a log file (Slurm output) gets what a progress bar shows: %, speed, ETA
            step, seconds = record["step"], record["time"]
            per_step = (seconds - self.last_time) / max(1, step - self.last_step)
            speed = f"{self.cfg.train.batch_size / per_step:,.0f} img/s" if per_step > 0 else "- img/s"
            print(f"epoch {record['epoch']:6.2f}  step {step:6d}/{self.total_steps} ({step / self.total_steps:4.0%})  "
                  f"loss {record['train_loss']:.4f}  lr {record['lr']:.4g}  {seconds:8.1f} s  {speed}  "
                  f"ETA {_duration(per_step * (self.total_steps - step))}", flush=True)
        self.last_step, self.last_time = record["step"], record["time"]

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
    """The seeds' per-class accuracy printout, as a table with the class counts; past MANY_CLASSES
    classes, a summary of the per-class accuracies and the BEST_AND_WORST best and worst classes instead."""
    totals, per_class = result.confusion.sum(1).tolist(), result.per_class
    head = (f"epoch {record['epoch']}  step {record['step']}  test accuracy {result.accuracy:.2%}  "
            f"loss {result.loss:.4f}  ({int(result.confusion.sum())} images)")
    if len(classes) <= MANY_CLASSES:
        return "\n".join([head, *_class_lines(range(len(classes)), classes, per_class, totals)])
    ranked = sorted(range(len(classes)), key=lambda i: (-per_class[i], i))  # best first; ties in class order
    n = BEST_AND_WORST
    lines = _class_lines(ranked[:n] + ranked[-n:], classes, per_class, totals)
    summary = (f"  {len(classes)} classes: per-class accuracy mean {statistics.fmean(per_class):.2%}, median "
               f"{statistics.median(per_class):.2%}, {per_class.count(0.0)} at 0%; the {n} best and the {n} worst:")
    return "\n".join([head, summary, *lines[:n], "  ...", *lines[n:]])


def _class_lines(rows: Iterable[int], classes: list[str], per_class: list[float], totals: list[int]) -> list[str]:
    rows = list(rows)
    width = max(len(classes[i]) for i in rows)
    return [f"  {classes[i]:>{width}}  {per_class[i]:7.2%}  {'#' * round(per_class[i] * 20):<20}  of {totals[i]}" for i in rows]


def _duration(seconds: float) -> str:
    """4 s, 3 min 20 s, 2 h 05 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"

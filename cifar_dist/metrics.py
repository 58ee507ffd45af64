"""What an evaluation measures, and the records a run writes: plain values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only in annotations: the sweep commands read DIRECTIONS without loading torch
    import torch

# The metrics a run records that a search or a ranking may be judged by, and which way is better.
DIRECTIONS = {"test_accuracy": "maximize", "test_loss": "minimize"}
# Past this many classes, per-class results are summarised, sorted and scaled wherever they are shown
# (the console's table, compare's table and plots, a run's plots), so that they read at ten classes
# and at a hundred.
MANY_CLASSES = 20


def direction(metric: str) -> str:
    """"maximize" or "minimize" for a metric of DIRECTIONS."""
    return DIRECTIONS[metric]


@dataclass
class EvalResult:
    confusion: torch.Tensor  # (C, C) int64 counts, rows = true class, columns = predicted
    loss: float  # mean cross-entropy per test image (no label smoothing)
    samples: list[tuple[int, int, int]]  # (test index, true, predicted) for a few images, rank 0's shard

    @property
    def accuracy(self) -> float:
        return int(self.confusion.diag().sum()) / int(self.confusion.sum())

    @property
    def per_class(self) -> list[float]:
        return (self.confusion.diag().double() / self.confusion.sum(1).clamp(min=1)).tolist()


def eval_record(step: int, epoch: int, elapsed: float, result: EvalResult, classes: list[str]) -> dict[str, Any]:
    return {
        "step": step, "epoch": epoch, "time": round(elapsed, 3),
        "test_loss": result.loss, "test_accuracy": result.accuracy,
        "per_class_accuracy": dict(zip(classes, result.per_class)),
    }

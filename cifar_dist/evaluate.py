"""Evaluation that is exact at any world size: each rank classifies a disjoint contiguous shard
of the test set (no padding, no duplicates) and the confusion counts are summed over ranks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.data import eval_shard, normalize
from cifar_dist.distributed import Distributed


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


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, dist: Distributed,
             batch_size: int, tta_flip: bool = False, autocast: contextlib.AbstractContextManager | None = None,
             memory_format: torch.memory_format = torch.contiguous_format, n_samples: int = 0) -> EvalResult:
    was_training = net.training
    net.eval()
    dist.broadcast_buffers(net)
    shard = eval_shard(len(labels), dist.rank, dist.world)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=images.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    samples: list[tuple[int, int, int]] = []
    for start in range(shard.start, shard.stop, batch_size):
        stop = min(start + batch_size, shard.stop)
        x = normalize(images[start:stop]).contiguous(memory_format=memory_format)
        y = labels[start:stop]
        with autocast or contextlib.nullcontext():
            logits = net(x)
            if tta_flip:
                logits = (logits + net(x.flip(3))) / 2
        logits = logits.float()
        pred = logits.argmax(1)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        counts += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        if len(samples) < n_samples:
            k = min(n_samples - len(samples), len(y))
            samples += [(start + i, int(y[i]), int(pred[i])) for i in range(k)]
    counts, loss_sum = dist.sum(counts), dist.sum(loss_sum)
    net.train(was_training)
    return EvalResult(counts.view(num_classes, num_classes).cpu(), float(loss_sum) / len(labels), samples)

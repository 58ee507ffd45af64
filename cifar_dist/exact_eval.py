"""Evaluation that is exact at any world size: each rank classifies a disjoint contiguous shard
of the test set (no padding, no duplicates) and the confusion counts are summed over ranks."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.config import EvalConfig
from cifar_dist.data import Dataset, Stats, eval_shard, normalize
from cifar_dist.distributed import Distributed
from cifar_dist.metrics import EvalResult


@torch.no_grad()
def evaluate(net: nn.Module, data: Dataset, dist: Distributed, cfg: EvalConfig, *, stats: Stats | None = None,
             autocast: contextlib.AbstractContextManager | None = None,
             memory_format: torch.memory_format = torch.contiguous_format, samples: int = 0) -> EvalResult:
    """`net` on the test set of `data` (on the net's device), its inputs normalised with `stats` (the
    data's own by default), in batches of cfg.batch_size images per rank; `samples`: how many
    (index, true, predicted) triples of rank 0's shard the result keeps, for captioned examples.

    Test-time augmentation averages logits: of the image and its mirror (cfg.tta_flip), and with
    cfg.tta_translate = t also of the image shifted by t pixels down-right and up-left (reflected at
    the borders), weighted 1/2, 1/4, 1/4 (airbench's multi-crop evaluation)."""
    images, labels, num_classes, stats = data.test_x, data.test_y, len(data.classes), stats or data.stats
    tta_flip, tta_translate = cfg.tta_flip, cfg.tta_translate

    def view(x: torch.Tensor) -> torch.Tensor:
        logits = net(x).float()  # averaged in fp32, not in the autocast dtype
        return (logits + net(x.flip(3)).float()) / 2 if tta_flip else logits

    def classify(x: torch.Tensor) -> torch.Tensor:
        if not tta_translate:
            return view(x)
        t = tta_translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        shifted = [padded[..., : -2 * t, : -2 * t], padded[..., 2 * t :, 2 * t :]]
        return view(x) / 2 + sum(view(v.contiguous(memory_format=memory_format)) for v in shifted) / 4

    was_training = net.training
    net.eval()
    dist.broadcast_buffers(net)
    shard = eval_shard(len(labels), dist.rank, dist.world)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=images.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    kept: list[tuple[int, int, int]] = []
    for start in range(shard.start, shard.stop, cfg.batch_size):
        stop = min(start + cfg.batch_size, shard.stop)
        x = normalize(images[start:stop], stats).contiguous(memory_format=memory_format)
        y = labels[start:stop]
        with autocast or contextlib.nullcontext():
            logits = classify(x)
        pred = logits.argmax(1)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        counts += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        if len(kept) < samples:
            k = min(samples - len(kept), len(y))
            kept += [(start + i, int(y[i]), int(pred[i])) for i in range(k)]
    counts, loss_sum = dist.sum(counts), dist.sum(loss_sum)
    net.train(was_training)
    return EvalResult(counts.view(num_classes, num_classes).cpu(), float(loss_sum) / len(labels), kept)

"""train.overfit_batches=N: can the net learn at all? The same N batches of epoch 0, again and
again, should take the training loss to its floor (`loss_floor`)."""

from __future__ import annotations

import math

import torch

from cifar_dist.config import ConfigError, TrainConfig
from cifar_dist.data import Batches


class RepeatedBatches(Batches):
    """Step s of every epoch is batch s mod N of epoch 0, with the flips, shifts and cutouts it had
    then, so the same N batches come again and again; an epoch keeps its length (the LR schedule
    and evaluations keep theirs). Only the net's own randomness (dropout) differs between the passes."""

    def __init__(self, batches: Batches, n: int):
        if n > batches.steps_per_epoch:
            raise ConfigError(f"train.overfit_batches: {n} is more than the {batches.steps_per_epoch} batches of an epoch")
        self.batches, self.n, self.steps_per_epoch = batches, n, batches.steps_per_epoch

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.batch(0, step % self.n)


def overfit_batches(batches: Batches, n: int) -> Batches:
    """`batches`, or with n > 0 (train.overfit_batches) their first n repeated."""
    return RepeatedBatches(batches, n) if n else batches


def loss_floor(label_smoothing: float, num_classes: int) -> float:
    """The lowest cross-entropy a net can reach against smoothed labels: their entropy (0 without smoothing)."""
    if not label_smoothing:
        return 0.0
    other = label_smoothing / num_classes
    true = 1 - label_smoothing + other
    return -(true * math.log(true) + (num_classes - 1) * other * math.log(other))


def overfit_notice(cfg: TrainConfig, num_classes: int) -> str:
    """The line said before the first step: what is repeated, and the loss a working net reaches."""
    n, floor = cfg.overfit_batches, loss_floor(cfg.label_smoothing, num_classes)
    return (f"overfit: train.overfit_batches={n}: the first {n} batches of epoch 0 ({n * cfg.batch_size:,} images) again "
            "and again, each with the same flips, shifts and cutouts (dropout stays random); a net and loss that work "
            f"take the training loss near {floor:.3f}"
            + (f" (its floor with train.label_smoothing={cfg.label_smoothing:g})" if floor else ""))

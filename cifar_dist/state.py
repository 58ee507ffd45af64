"""The training state: everything that changes as training goes on (model, optimiser, LR schedule,
Lookahead's slow weights, the moving average of the weights, the position in the schedule and
the early stop's watch), with `state_dict()` and
`load_state_dict()` for checkpoints, resume and the compile warm-up, which all go through it."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cifar_dist.recipe import EMA, Lookahead


@dataclass
class Position:
    """Where training stands."""

    step: int = 0  # optimiser steps done, global
    epoch: int = 0  # current epoch
    offset: int = 0  # steps done within the current epoch
    elapsed: float = 0.0  # seconds of training so far (excludes data preparation and compile)
    records: int = 0  # lines of metrics.jsonl that belong to this position
    best_accuracy: float = 0.0
    # train.early_stop: the best value of its metric so far (None before the first evaluation), the
    # step of that evaluation, and the evaluations since without an improvement
    watch_best: float | None = None
    watch_best_step: int = 0
    watch_stale: int = 0


@dataclass
class TrainState:
    net: nn.Module  # the plain module (no DDP or compile wrapper): its state dict has no prefixes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lookahead: Lookahead
    scaler: torch.amp.GradScaler  # fp16 loss scaling (disabled, and empty, otherwise)
    ema: EMA  # the moving average of the weights (train.ema; off: empty)
    position: Position = field(default_factory=Position)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "lookahead": self.lookahead.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict(),
            "position": asdict(self.position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.lookahead.load_state_dict(state.get("lookahead") or {})  # none when Lookahead was off
        if state.get("scaler"):  # empty for fp32/bf16 runs: no loss scaling
            self.scaler.load_state_dict(state["scaler"])
        self.ema.load_state_dict(state.get("ema") or {}, self.net)  # none when the EMA was off
        self.position = Position(**state["position"])

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the state, to come back to exactly (the compile warm-up's steps are undone)."""
        return copy.deepcopy(self.state_dict())

"""The recipe: what is trained and how. The net (with its data-dependent initialisation), the
optimiser's parameter groups, the learning-rate schedule, Lookahead, and one optimiser step.
Everything here is plain PyTorch on whatever device the net is on; nothing knows of ranks.
The schedule is torch's LambdaLR over a closed-form factor, not its LinearLR/CosineAnnealingLR/SequentialLR:
those apply one factor to every group and restore their length from a checkpoint, so they give the
whitening bias no cut-off of its own and cannot stretch the schedule when a resume changes train.epochs."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.config import Config
from cifar_dist.data import Stats, normalize
from cifar_dist.models import build_model


def make_net(cfg: Config, train_x: torch.Tensor, num_classes: int, memory_format: torch.memory_format,
             rank: int = 0, *, stats: Stats) -> nn.Module:
    """The recipe's net on train_x's device (benchmarks/bench_fast.py's bare loop builds it here too)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if train_x.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    net = build_model(cfg.model.name, num_classes)
    if hasattr(net, "init_from_data"):
        # Data-dependent init from a fixed slice of the training set: identical on every rank.
        net.init_from_data(normalize(train_x[:5000], stats).cpu())
    if cfg.train.whiten_bias_epochs:  # trained early on only: its lr goes to 0 after (param_groups)
        net.whiten.bias.requires_grad_(True)
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout differs per rank, like its data
    return net.to(train_x.device, memory_format=memory_format)


def make_optimizer(cfg: Config, net: nn.Module, steps_per_epoch: int, total_steps: int):
    t = cfg.train
    # ceil: any whiten_bias_epochs > 0 is at least one step, so the bias never lands in the main group
    groups = param_groups(net, t.lr, t.weight_decay, t.bias_lr_scale, math.ceil(t.whiten_bias_epochs * steps_per_epoch))
    optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)
    warmup = max(1, round(t.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:  # LR multiplier before optimiser step `step` (0-based)
        if step < warmup:
            return t.warmup_start + (1 - t.warmup_start) * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if t.schedule == "linear":
            return t.final_lr + (1 - t.final_lr) * (1 - progress)
        if t.schedule == "cosine":
            return t.final_lr + (1 - t.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def until(steps: int):  # an lr of 0 leaves a parameter exactly as it is: no step, no decay
        return lambda step: factor(step) if step < steps else 0.0

    factors = [until(g["steps"]) if "steps" in g else factor for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def param_groups(net: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float,
                 whiten_bias_steps: int) -> list[dict[str, Any]]:
    """The trainable parameters, at lr and weight_decay, except:
    - with bias_lr_scale != 1, BatchNorm biases in a group at lr x scale and weight_decay / scale,
      so that their decay per step (lr x weight_decay) is the others' (airbench: 64x);
    - with whiten_bias_steps > 0, the fast net's whitening bias in a group like the BatchNorm
      biases' that trains for that many steps only ("steps": make_optimizer's schedule then
      gives it lr 0; airbench trains it for the first 3 epochs)."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    biases = {id(m.bias) for m in net.modules() if isinstance(m, norms) and m.bias is not None and m.bias.requires_grad}
    if bias_lr_scale == 1:
        biases = set()
    early = {id(net.whiten.bias)} if whiten_bias_steps else set()
    scaled = {"lr": lr * bias_lr_scale, "weight_decay": weight_decay / bias_lr_scale}
    groups = [{"params": [p for p in trainable if id(p) not in biases | early], "weight_decay": weight_decay}]
    if biases:
        groups.append({"params": [p for p in trainable if id(p) in biases], **scaled})
    if early:
        groups.append({"params": [net.whiten.bias], **scaled, "steps": whiten_bias_steps})
    return groups


class Lookahead:
    """airbench's Lookahead: every `every` optimiser steps (and after the last) the weights and
    BatchNorm statistics are pulled to their slow average, avg = d * avg + (1 - d) * net, and
    training goes on from it. d = 0.95**every * (step / total)**3: nothing early, most at the end.
    every = 0: off. Every rank does the same on the same weights; rank 0's average is checkpointed."""

    def __init__(self, net: nn.Module, every: int, total_steps: int):
        self.every, self.total = every, total_steps
        # state_dict()'s tensors share storage with the parameters and buffers: copies into them land in the net.
        self.live = {k: v for k, v in net.state_dict().items() if v.is_floating_point()} if every else {}
        self.avg = {k: v.detach().clone() for k, v in self.live.items()}  # same keys, same order

    @torch.no_grad()
    def after(self, step: int) -> None:
        if not self.every or (step % self.every and step != self.total):
            return
        d = 0.95**self.every * (step / self.total) ** 3
        # One multi-tensor kernel per pull, not two per tensor: launches matter on a GPU at ~4 ms a step.
        avg, live = list(self.avg.values()), list(self.live.values())
        torch._foreach_lerp_(avg, live, 1 - d)
        torch._foreach_copy_(live, avg)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.avg

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """The slow average; where a checkpoint has none (written with Lookahead off), the weights themselves."""
        for name, avg in self.avg.items():
            avg.copy_(saved[name] if name in saved else self.live[name])


def make_step(cfg: Config, model: nn.Module, optimizer, scheduler, autocast: contextlib.AbstractContextManager,
              scaler: torch.amp.GradScaler | None = None):
    """One optimiser step on this rank's slice; returns the slice's mean loss (a tensor, no sync).
    With fp16, `scaler` scales the loss so that small gradients survive, and skips a step whose
    gradients overflowed (the LR schedule moves on regardless)."""
    forward = torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model
    smoothing = cfg.train.label_smoothing
    scaler = scaler or torch.amp.GradScaler(enabled=False)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = F.cross_entropy(forward(x), y, label_smoothing=smoothing)
        scaler.scale(loss).backward()  # DDP averages the gradients over ranks here
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step

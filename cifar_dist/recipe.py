"""The recipe: what is trained and how. The net (with its data-dependent initialisation), the
optimiser (SGD or AdamW) and its parameter groups, the learning-rate schedule, Lookahead, the moving
average of the weights (EMA), and one optimiser step (micro-batches, clipping, loss scaling).
Everything here is plain PyTorch on whatever device the net is on; nothing knows of ranks (a step
only uses the DDP wrapper's `no_sync` when the model it is given has one).
The schedule is torch's LambdaLR over a closed-form factor, not its LinearLR/CosineAnnealingLR/SequentialLR:
those apply one factor to every group and restore their length from a checkpoint, so they give the
whitening bias no cut-off of its own and cannot stretch the schedule when a resume changes train.epochs."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.config import Config
from cifar_dist.data import Stats, normalize
from cifar_dist.models import build_model, set_dropout


def make_net(cfg: Config, train_x: torch.Tensor, num_classes: int, memory_format: torch.memory_format,
             rank: int = 0, *, stats: Stats) -> nn.Module:
    """The recipe's net on train_x's device (benchmarks/bench_fast.py's bare loop builds it here too)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if train_x.device.type == "cpu":
        deterministic_algorithms(compiled=cfg.model.compile)
    net = build_model(cfg.model.name, num_classes)
    if cfg.model.dropout != -1:
        set_dropout(net, cfg.model.dropout)
    if hasattr(net, "init_from_data"):
        # Data-dependent init from a fixed slice of the training set: identical on every rank.
        net.init_from_data(normalize(train_x[:5000], stats).cpu())
    if cfg.train.whiten_bias_epochs:  # trained early on only: its lr goes to 0 after (param_groups)
        net.whiten.bias.requires_grad_(True)
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout differs per rank, like its data
    return net.to(train_x.device, memory_format=memory_format)


def deterministic_algorithms(compiled: bool) -> None:
    """torch's deterministic algorithms, warning where an op has none. torch.use_deterministic_algorithms
    also sets inductor's flag, and importing inductor's config imports torch._dynamo (1.3 s on a
    2-core CPU, in every process): only a compiled net reads that flag, so without one the run
    sets the algorithms alone (tests/unit/test_recipe.py checks that torch reports them on).
    Deterministic mode also fills every new tensor with NaN, in case an op reads memory it never
    wrote; none of the recipe's ops does (resumed runs match uninterrupted ones bit for bit:
    tests/e2e), and the fills cost 3-6% of a CPU step, so they are off."""
    if compiled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def _without_dynamo(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` with the methods that torch.optim wraps for torch.compile's sake unwrapped (its step
    run under no_grad, as its wrapper runs it for an optimiser that is not differentiable). Those
    wrappers import torch._dynamo on first use (1.3 s on a 2-core CPU, in every rank of every run)
    to mark graph breaks and keep dynamo out, which only matters where the optimiser itself is
    compiled; this project compiles the net, never the optimiser. Step hooks, the profiler's label
    and the LR scheduler's check still wrap the step (torch adds them per instance and class)."""
    methods = {name: inspect.unwrap(getattr(cls, name)) for name in _DYNAMO_WRAPPED}
    methods["step"] = torch.no_grad()(methods["step"])
    return type(cls.__name__, (cls,), {**methods, "__doc__": cls.__doc__, "__module__": __name__})


_DYNAMO_WRAPPED = ("step", "zero_grad", "add_param_group", "state_dict", "load_state_dict")
SGD, AdamW = _without_dynamo(torch.optim.SGD), _without_dynamo(torch.optim.AdamW)


def make_optimizer(cfg: Config, net: nn.Module, steps_per_epoch: int, total_steps: int):
    t = cfg.train
    # ceil: any whiten_bias_epochs > 0 is at least one step, so the bias never lands in the main group
    groups = param_groups(net, t.lr, t.weight_decay, t.bias_lr_scale, math.ceil(t.whiten_bias_epochs * steps_per_epoch),
                          decay_norms_and_biases=t.decay_norms_and_biases)
    optimizer = build_optimizer(cfg, groups)
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


def build_optimizer(cfg: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """`train.optimizer` over `groups` (each group's own lr and weight_decay, as param_groups sets them)."""
    t = cfg.train
    if t.optimizer == "adamw":
        return AdamW(groups, lr=t.lr, betas=(t.betas[0], t.betas[1]), eps=t.eps, weight_decay=t.weight_decay)
    return SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov)


def param_groups(net: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float,
                 whiten_bias_steps: int, *, decay_norms_and_biases: bool = True) -> list[dict[str, Any]]:
    """The trainable parameters, at lr and weight_decay, except:
    - with decay_norms_and_biases false, every 0- or 1-dimensional parameter (norm layers' scales and
      shifts, every bias) in a group of its own without weight decay;
    - with bias_lr_scale != 1, BatchNorm biases in a group at lr x scale and weight_decay / scale,
      so that their decay per step (lr x weight_decay) is the others' (airbench: 64x), or none;
    - with whiten_bias_steps > 0, the fast net's whitening bias in a group like the BatchNorm
      biases' that trains for that many steps only ("steps": make_optimizer's schedule then
      gives it lr 0; airbench trains it for the first 3 epochs)."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    biases = {id(m.bias) for m in net.modules() if isinstance(m, norms) and m.bias is not None and m.bias.requires_grad}
    if bias_lr_scale == 1:
        biases = set()
    early = {id(net.whiten.bias)} if whiten_bias_steps else set()
    undecayed = set() if decay_norms_and_biases else {id(p) for p in trainable if p.ndim <= 1}
    scaled = {"lr": lr * bias_lr_scale, "weight_decay": weight_decay / bias_lr_scale if decay_norms_and_biases else 0.0}
    groups = [{"params": [p for p in trainable if id(p) not in biases | early | undecayed], "weight_decay": weight_decay}]
    if undecayed - biases - early:
        groups.append({"params": [p for p in trainable if id(p) in undecayed - biases - early], "weight_decay": 0.0})
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


class EMA:
    """An exponential moving average of the weights and BatchNorm statistics: torch's AveragedModel
    with get_ema_multi_avg_fn (one multi-tensor lerp per step), avg = decay x avg + (1 - decay) x net,
    after every optimiser step. Until `start_step` steps it is a copy of the weights (its count
    of averaged steps is held at 0, so each update copies). Every rank does the same on the same
    weights; its `state_dict` (the averaged module and the count) makes a resume bit-exact.
    decay = 0: off, and `model` is None."""

    def __init__(self, net: nn.Module, decay: float, start_step: int):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.start_step = start_step
        self.model = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None

    @torch.no_grad()
    def after(self, net: nn.Module, step: int) -> None:
        if self.model is None:
            return
        if step <= self.start_step:
            self.model.n_averaged.zero_()
        self.model.update_parameters(net)

    @property
    def net(self) -> nn.Module | None:
        """The averaged net, to evaluate; None when off."""
        return self.model.module if self.model is not None else None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict() if self.model is not None else {}

    def load_state_dict(self, saved: dict[str, torch.Tensor], net: nn.Module) -> None:
        """The average; where a checkpoint has none (written with the EMA off), it starts again from the weights."""
        if self.model is None:
            return
        if saved:
            self.model.load_state_dict(saved)
        else:
            self.model.module.load_state_dict(net.state_dict())
            self.model.n_averaged.zero_()


class Step:
    """One optimiser step on this rank's slice of the global batch, in `train.accumulate`
    micro-batches; returns the slice's mean loss (a tensor, no sync).

    Each micro-batch's loss is divided by their number, so the summed gradient is the slice's mean
    gradient, as one pass over the whole slice gives it (up to float summation order). Under DDP
    the first k-1 backward passes run in `no_sync` (no all-reduce): only the last one averages the
    accumulated gradients over ranks. With `train.clip_grad_norm`, the gradient norm is taken after
    that all-reduce, so it is the global batch's (the same on every rank), and after unscaling in
    fp16; `grad_norm` holds it (before clipping) until the next step. With fp16, the scaler skips a
    step whose gradients overflowed (the LR schedule moves on regardless)."""

    def __init__(self, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 autocast: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler | None = None):
        self.forward = torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model
        self.no_sync = getattr(model, "no_sync", contextlib.nullcontext)  # DDP's, or nothing to hold back
        self.optimizer, self.scheduler, self.autocast = optimizer, scheduler, autocast
        self.scaler = scaler or torch.amp.GradScaler(enabled=False)
        self.smoothing, self.micro, self.clip = cfg.train.label_smoothing, cfg.train.accumulate, cfg.train.clip_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_norm: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scaler, k = self.scaler, self.micro
        if k == 1:
            loss = self.loss(x, y)
            scaler.scale(loss).backward()  # DDP averages the gradients over ranks here
        else:
            losses = []
            for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k))):
                with self.no_sync() if i < k - 1 else contextlib.nullcontext():
                    losses.append(self.loss(xs, ys) / k)
                    scaler.scale(losses[-1]).backward()  # the last one all-reduces the sum of the k
            loss = torch.stack(losses).sum()
        if self.clip:
            scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip).detach()
        scaler.step(self.optimizer)
        scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return F.cross_entropy(self.forward(x), y, label_smoothing=self.smoothing)


def make_step(cfg: Config, model: nn.Module, optimizer, scheduler, autocast: contextlib.AbstractContextManager,
              scaler: torch.amp.GradScaler | None = None) -> Step:
    """The recipe's optimiser step (Step) over `model` (the module to train: DDP-wrapped when N > 1)."""
    return Step(cfg, model, optimizer, scheduler, autocast, scaler)

"""`train(cfg) -> summary`: the one entry point for the CLI, `accelerate launch`, torchrun,
submitit and the tests.

    python -m cifar_dist.train --config debug train.epochs=2
    accelerate launch --multi_gpu --num_processes 2 cifar_dist/train.py --config fast
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist import checkpoint
from cifar_dist.config import Config, ConfigError, config_hash, load_config
from cifar_dist.data import DataError, TrainBatches, load_dataset, normalize
from cifar_dist.distributed import EXIT_REQUEUE, Distributed, DistributedError
from cifar_dist.evaluate import EvalResult, evaluate
from cifar_dist.models import build_model, count_parameters
from cifar_dist.report import Console, write_plots
from cifar_dist.tracking import SUMMARY, RunDir, RunDirError, eval_record, open_records, prepare_run_dir, write_atomic


class Stopped(Exception):
    """Stopped on a signal after writing a checkpoint; the run resumes from it when restarted."""


@dataclass
class Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # optimiser steps done, global
    epoch: int = 0  # current epoch
    offset: int = 0  # steps done within the current epoch
    elapsed: float = 0.0  # seconds of training so far (excludes data preparation and compile)
    records: int = 0  # lines of metrics.jsonl that belong to this position
    best_accuracy: float = 0.0
    pending: list[torch.Tensor] = field(default_factory=list)  # this rank's losses since the last record


def train(cfg: Config) -> dict[str, Any]:
    dist = Distributed(cfg.train.device)
    try:
        return _train(cfg, dist)
    finally:
        dist.close()


def _train(cfg: Config, dist: Distributed) -> dict[str, Any]:
    if cfg.train.batch_size % dist.world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not split evenly over {dist.world} ranks")
    run = prepare_run_dir(cfg, dist)
    data = load_dataset(cfg.data, announce=dist.print).to(dist.device)
    memory_format = torch.channels_last  # faster convolutions on GPU and on CPU (oneDNN) alike
    batches = TrainBatches(data.train_x, data.train_y, cfg.data, cfg.train.batch_size, dist.rank, dist.world,
                           cfg.seed, memory_format)
    total_steps = cfg.train.epochs * batches.steps_per_epoch

    net = make_net(cfg, data.train_x, len(data.classes), memory_format, dist.rank)
    model = dist.prepare(net, cfg.train.sync_bn)
    optimizer, scheduler = make_optimizer(cfg, net, batches.steps_per_epoch, total_steps)
    lookahead = Lookahead(net, cfg.train.lookahead_every, total_steps)
    pos = resume(run, cfg, dist, net, optimizer, scheduler, lookahead)
    if pos.step >= total_steps and run.summary:
        dist.print(f"run {run.path} already finished at step {pos.step}: test accuracy {run.summary['test_accuracy']:.2%}")
        return run.summary

    records = open_records(dist, run, cfg, data.classes, data.test_x, pos.records)
    console = Console(dist, cfg, batches.steps_per_epoch, data.classes)
    autocast = autocast_context(cfg, dist.device)
    if warning := slow_bf16_warning(cfg, dist.device):
        dist.print(warning)
    step_fn = make_step(cfg, model, optimizer, scheduler, autocast)
    compile_seconds = warm_up(step_fn, batches, net, optimizer, scheduler) if cfg.model.compile else 0.0
    console.start(run, count_parameters(net), len(data.train_y), total_steps, pos)

    def do_eval() -> EvalResult:
        return evaluate(net, data.test_x, data.test_y, len(data.classes), dist, cfg.eval.batch_size, cfg.eval.tta_flip,
                        autocast, memory_format, n_samples=cfg.tracking.log_images, tta_translate=cfg.eval.tta_translate)

    def save(test_accuracy: float | None = None) -> None:
        state = checkpoint_state(cfg, dist, net, optimizer, scheduler, lookahead, pos, clock.elapsed(), records.lines,
                                 data.classes)
        dist.main_only(lambda: checkpoint.save(run.path, pos.step, state, cfg.checkpoint.keep, test_accuracy))

    dist.install_stop_handlers()
    clock = Clock(pos.elapsed)
    last_save = time.monotonic()
    result = saved_eval = None
    for epoch in range(pos.epoch, cfg.train.epochs):
        pos.epoch = epoch
        for x, y in batches.epoch(epoch, start=pos.offset):
            pos.pending.append(step_fn(x, y))
            pos.step += 1
            lookahead.after(pos.step)
            pos.offset += 1
            if pos.step % cfg.train.log_every == 0 or pos.offset == batches.steps_per_epoch:
                record = train_record(pos, dist, scheduler, clock, batches.steps_per_epoch)
                records.log(record)
                console.train(record)
            stop, save_due = dist.agree(
                (cfg.checkpoint.every_steps > 0 and pos.step % cfg.checkpoint.every_steps == 0)
                or (cfg.checkpoint.every_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.checkpoint.every_minutes)
            )
            if save_due or stop:
                save()
                last_save = time.monotonic()
            if stop:
                dist.print(f"stop signal: checkpoint at step {pos.step} written to {run.path}; exiting for requeue")
                raise Stopped(str(run.path))
        if epoch == cfg.train.epochs - 1 or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
            result = do_eval()
            pos.best_accuracy = max(pos.best_accuracy, result.accuracy)
            record = eval_record(pos.step, epoch + 1, clock.elapsed(), result, data.classes)
            records.log(record, result)
            console.eval(record, result)
        pos.epoch, pos.offset = epoch + 1, 0
        checkpointing = cfg.checkpoint.every_steps or cfg.checkpoint.every_minutes
        if checkpointing and result is not None and result is not saved_eval:
            save(result.accuracy)  # the weights just evaluated, so that "keep the best" has something to keep
            saved_eval, last_save = result, time.monotonic()

    if result is None:  # resumed from the last step's checkpoint, the final evaluation not yet recorded
        result = do_eval()
    train_seconds = clock.elapsed()
    save(result.accuracy)
    summary = make_summary(cfg, dist, run, result, pos, train_seconds, compile_seconds, len(data.train_y) * cfg.train.epochs,
                           data.classes)
    dist.main_only(lambda: finish_run(run, cfg, net, data.classes, summary, records))
    console.finish(summary)
    return summary


# ---------------------------------------------------------------------------- building blocks


def make_net(cfg: Config, train_x: torch.Tensor, num_classes: int, memory_format: torch.memory_format,
             rank: int = 0) -> nn.Module:
    """The recipe's net on train_x's device (benchmarks/bench_fast.py's bare loop builds it here too)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if train_x.device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    net = build_model(cfg.model.name, num_classes)
    if hasattr(net, "init_from_data"):
        # Data-dependent init from a fixed slice of the training set: identical on every rank.
        net.init_from_data(normalize(train_x[:5000]).cpu())
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


def autocast_context(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them bf16 is emulated:
    measured 8x (medium) to 12x (fast) slower than fp32 on a 2-core AVX2 VM, against 1.8x faster with them."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def slow_bf16_warning(cfg: Config, device: torch.device) -> str | None:
    if device.type != "cpu" or cfg.train.precision != "bf16" or cpu_has_bf16():
        return None
    return ("warning: train.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16 or AMX) is emulated, "
            "about 10x slower than fp32; add train.precision=fp32")


def make_step(cfg: Config, model: nn.Module, optimizer, scheduler, autocast):
    """One optimiser step on this rank's slice; returns the slice's mean loss (a tensor, no sync)."""
    forward = torch.compile(model, mode=cfg.model.compile_mode) if cfg.model.compile else model
    smoothing = cfg.train.label_smoothing

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = F.cross_entropy(forward(x), y, label_smoothing=smoothing)
        loss.backward()  # DDP averages the gradients over ranks here
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def warm_up(step_fn, batches: TrainBatches, net: nn.Module, optimizer, scheduler) -> float:
    """Compile before the clock starts: run two steps, then restore every bit of state."""
    start = time.perf_counter()
    saved = (copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict()), scheduler.state_dict(),
             torch.get_rng_state())
    x, y = batches.batch(0, 0)
    for _ in range(2):
        step_fn(x, y)
    if x.is_cuda:
        torch.cuda.synchronize()
    net.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    scheduler.load_state_dict(saved[2])
    torch.set_rng_state(saved[3])
    return time.perf_counter() - start


class Clock:
    """Training seconds, continuing across resumes."""

    def __init__(self, already: float):
        self.start = time.perf_counter() - already

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def train_record(pos: Position, dist: Distributed, scheduler, clock: Clock, steps_per_epoch: int) -> dict[str, Any]:
    """The mean loss over the global batches since the last record (one all-reduce)."""
    local = torch.stack(pos.pending).float().sum()
    loss = float(dist.sum(local)) / (dist.world * len(pos.pending))
    pos.pending.clear()
    return {"step": pos.step, "epoch": round(pos.epoch + pos.offset / steps_per_epoch, 4), "time": round(clock.elapsed(), 3),
            "train_loss": loss, "lr": scheduler.get_last_lr()[0]}


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_state(cfg: Config, dist: Distributed, net: nn.Module, optimizer, scheduler, lookahead: Lookahead,
                     pos: Position, elapsed: float, records: int, classes: list[str]) -> dict[str, Any]:
    """Everything needed to continue exactly: model, optimiser, schedule, position, and every
    rank's RNG states and pending losses (gathered to all ranks; rank 0 writes them)."""
    dist.broadcast_buffers(net)
    per_rank = dist.gather({"rng": checkpoint.rng_state(), "pending": [t.item() for t in pos.pending]})
    return {
        "model": net.state_dict(),  # the plain module: no `module.` or `_orig_mod.` prefixes
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "lookahead": lookahead.avg,
        "position": {"step": pos.step, "epoch": pos.epoch, "offset": pos.offset, "elapsed": elapsed,
                     "records": records, "best_accuracy": pos.best_accuracy},
        "ranks": per_rank,
        "world_size": dist.world,
        "config_hash": config_hash(cfg),
        "config": cfg.to_dict(),
        "classes": classes,
        "run_id": cfg.run.id,
    }


def resume(run: RunDir, cfg: Config, dist: Distributed, net: nn.Module, optimizer, scheduler,
           lookahead: Lookahead) -> Position:
    """Continue from the newest valid checkpoint in the run dir, if any."""
    found = checkpoint.load_latest(run.path, warn=lambda m: dist.print(f"warning: {m}"))
    # Every rank must pick the same checkpoint; rank 0's choice wins.
    chosen = dist.broadcast(str(found[0].path) if found else None)
    if chosen is None:
        return Position()
    state = found[1] if found and str(found[0].path) == chosen else checkpoint.load_state(Path(chosen) / checkpoint.STATE)
    if state.get("config_hash") != config_hash(cfg) and not cfg.checkpoint.allow_config_change:
        raise RunDirError(f"checkpoint {chosen} was written by a different config; use checkpoint.allow_config_change=true")
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    saved = state.get("lookahead") or {}  # none when Lookahead was off (allow_config_change)
    for name, avg in lookahead.avg.items():
        avg.copy_(saved[name] if name in saved else lookahead.live[name])
    p = state["position"]
    pos = Position(p["step"], p["epoch"], p["offset"], p["elapsed"], p["records"], p["best_accuracy"])
    if state["world_size"] == dist.world:
        mine = state["ranks"][dist.rank]
        checkpoint.set_rng_state(mine["rng"])
        pos.pending = [torch.tensor(v, device=dist.device) for v in mine["pending"]]
    else:  # the data order does not depend on the world size; per-rank RNG streams and losses do
        dist.print(f"note: resuming {state['world_size']} ranks' checkpoint on {dist.world}; dropout RNG streams restart")
    dist.print(f"resumed from {chosen} (step {pos.step}, epoch {pos.epoch}, {pos.offset} steps into it)")
    return pos


# ---------------------------------------------------------------------------- the end


def make_summary(cfg: Config, dist: Distributed, run: RunDir, result: EvalResult, pos: Position, train_seconds: float,
                 compile_seconds: float, images: int, classes: list[str]) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "model": cfg.model.name,
        "test_accuracy": result.accuracy,
        "best_test_accuracy": pos.best_accuracy,
        "per_class_accuracy": dict(zip(classes, result.per_class)),
        "confusion_matrix": result.confusion.tolist(),
        "test_loss": result.loss,
        "epochs": cfg.train.epochs,
        "steps": pos.step,
        "train_seconds": round(train_seconds, 3),
        "compile_seconds": round(compile_seconds, 3),
        "images_per_second": round(images / max(train_seconds, 1e-9), 1),
        "world_size": dist.world,
        "hosts": dist.gather(socket.gethostname()),  # the node of each rank, in rank order
        "device": dist.device.type,
    }


def finish_run(run: RunDir, cfg: Config, net: nn.Module, classes: list[str], summary: dict[str, Any], records) -> None:
    """Rank 0: final weights for `predict`, summary.json, plots, wandb summary."""
    weights = {"model": cfg.model.name, "classes": classes, "state_dict": net.state_dict()}
    tmp = run.path / ".model.pt.tmp"
    torch.save(weights, tmp)
    tmp.replace(run.path / "model.pt")
    write_atomic(run.path / SUMMARY, json.dumps(summary, indent=2))
    records.finish(summary)
    write_plots(run.path)


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None, prog: str = "python -m cifar_dist.train") -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(prog=prog, description="Train a CIFAR-10 classifier (data-parallel under a launcher).")
    parser.add_argument("--config", help="a shipped config name (debug, blitz, medium, fast, resnet18) or a YAML path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 model.name=medium")
    args = parser.parse_args(argv)
    return args, load_config(args.config, args.overrides)


def main(argv: list[str] | None = None, prog: str = "python -m cifar_dist.train") -> int:
    try:
        args, cfg = parse_args(argv, prog)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        train(cfg)
        return 0
    except (ConfigError, DataError, RunDirError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped:
        return EXIT_REQUEUE


if __name__ == "__main__":
    sys.exit(main())

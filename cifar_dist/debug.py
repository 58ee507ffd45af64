"""Debugging a run on one machine: `train.overfit_batches`, `train.detect_anomaly` and `profile.*`.

The loop calls in at its step boundaries through `Watch` (start, after each step, finish).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_dist.config import Config, ConfigError, ProfileConfig
from cifar_dist.data import TrainBatches
from cifar_dist.distributed import Distributed
from cifar_dist.errors import UserError
from cifar_dist.rundir import write_atomic

PROFILE_DIR = "profile"  # in the run dir: TRACE and OPS
TRACE = "trace.json"  # Chrome trace format: https://ui.perfetto.dev or chrome://tracing
OPS = "ops.txt"
OPS_ROWS = 30  # operators in the table


# ---------------------------------------------------------------------------- train.overfit_batches


class RepeatedBatches:
    """train.overfit_batches=N: step s of every epoch is batch s mod N of epoch 0, with the flips,
    shifts and cutouts it had then, so the same N batches come again and again; an epoch keeps its
    length (the LR schedule and evaluations keep theirs). Only the net's own randomness (dropout)
    differs between the passes."""

    def __init__(self, batches: TrainBatches, n: int):
        if n > batches.steps_per_epoch:
            raise ConfigError(f"train.overfit_batches: {n} is more than the {batches.steps_per_epoch} batches of an epoch")
        self.batches, self.n, self.steps_per_epoch = batches, n, batches.steps_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(start, self.steps_per_epoch):
            yield self.batch(epoch, step)

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.batch(0, step % self.n)


def overfit(batches: TrainBatches, n: int) -> TrainBatches | RepeatedBatches:
    return RepeatedBatches(batches, n) if n else batches


def loss_floor(label_smoothing: float, num_classes: int) -> float:
    """The lowest cross-entropy a net can reach against smoothed labels: their entropy (0 without smoothing)."""
    if not label_smoothing:
        return 0.0
    other = label_smoothing / num_classes
    true = 1 - label_smoothing + other
    return -(true * math.log(true) + (num_classes - 1) * other * math.log(other))


# ---------------------------------------------------------------------------- train.detect_anomaly


class AnomalyError(UserError):
    """train.detect_anomaly found a non-finite loss or gradient; the step is not recorded or saved."""


class AnomalyWatch:
    """Forward hooks on every module and gradient hooks on every trainable parameter note, as device
    booleans (no sync), whether each output and each gradient is finite, in the order they are made.
    After the step one check (one sync; every rank agrees) stops the run at the first non-finite
    loss or gradient, naming the first module whose output, or gradient, was not finite."""

    def __init__(self, net: nn.Module):
        self.outputs: list[tuple[str, torch.Tensor]] = []  # (module, output not finite), as the forward ran
        self.grads: list[tuple[str, torch.Tensor]] = []  # (parameter, gradient not finite), as backward made them
        modules = dict(net.named_modules())
        for name, module in modules.items():
            module.register_forward_hook(functools.partial(self._output, _describe(name, module)))
        for name, p in net.named_parameters():
            if p.requires_grad:
                owner = name.rpartition(".")[0]
                p.register_hook(functools.partial(self._grad, f"{_describe(owner, modules[owner])}, parameter {name}"))

    def _output(self, label: str, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training:  # evaluation's forwards are not a step's
            return
        values = [t for t in (output if isinstance(output, (tuple, list)) else [output])
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if values:
            self.outputs.append((label, torch.stack([_not_finite(t) for t in values]).any()))

    def _grad(self, label: str, grad: torch.Tensor) -> None:
        self.grads.append((label, _not_finite(grad)))

    def check(self, loss: torch.Tensor, step: int, dist: Distributed) -> None:
        outputs, grads = self.outputs, self.grads
        self.outputs, self.grads = [], []
        flags = torch.stack([~torch.isfinite(loss), *(f for _, f in outputs), *(f for _, f in grads)]).tolist()
        found = _explain(step, flags[0], [label for (label, _), bad in zip(outputs, flags[1:]) if bad],
                         [label for (label, _), bad in zip(grads, flags[1 + len(outputs):]) if bad])
        if not dist.sum(torch.tensor(int(found is not None), device=loss.device)):
            return
        rank, why = next((r, why) for r, why in enumerate(dist.gather(found)) if why)  # the same line on every rank
        raise AnomalyError(f"train.detect_anomaly: {f'on rank {rank}: ' if dist.world > 1 else ''}{why}")


def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """Whether any value is NaN or infinite, as a device boolean. A float64 sum is non-finite exactly
    then (finite fp32 values cannot overflow it) and costs less than isfinite(t).all() (measured ~2x
    on a CPU), which makes a boolean copy of t first."""
    return ~torch.isfinite(t.sum(dtype=torch.float64))


def _describe(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    return f"module {name} ({kind})" if name else f"the net's own forward ({kind})"


def _explain(step: int, loss_bad: bool, bad_outputs: list[str], bad_grads: list[str]) -> str | None:
    if loss_bad:
        where = f"first non-finite output in {bad_outputs[0]}" if bad_outputs else \
            "every module's output was finite, the loss is not (check the labels)"
        return f"non-finite loss at step {step}: {where}"
    if bad_grads:  # the first made, nearest the loss: where backward first went wrong
        return f"non-finite gradient at step {step}: first in {bad_grads[0]}"
    return None


# ---------------------------------------------------------------------------- profile.*


class Profiler:
    """profile.steps=N: torch.profiler over N training steps after profile.wait steps (its last one the
    profiler's own warm-up), on rank 0; then the trace and the top operators by self time are
    written to run.dir/profile/ and the profiler stops: training goes on unprofiled."""

    def __init__(self, cfg: ProfileConfig, device: torch.device, folder: Path, say: Callable[[str], None]):
        cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        self.cfg, self.folder, self.say = cfg, folder, say
        schedule = torch.profiler.schedule(wait=cfg.wait - 1, warmup=1, active=cfg.steps, repeat=1)
        self.prof: torch.profiler.profile | None = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self.write)
        self.first = self.done = 0  # the first traced step (global); steps ended since start
        self.written = False

    def start(self, step: int) -> None:
        self.first = step + self.cfg.wait + 1
        self.say(f"profile: tracing steps {self.first}-{self.first + self.cfg.steps - 1} on rank 0 into {self.folder}/")
        self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.done += 1
        self.prof.step()  # at the end of the window this writes the files (on_trace_ready)
        if self.done == self.cfg.wait + self.cfg.steps:
            self.prof.stop()
            self.prof = None

    def finish(self) -> None:
        """The run ended inside the window: what was traced is written; nothing when it ended before."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
            if not self.written:
                self.say(f"profile: the run ended before step {self.first}; nothing traced")

    def write(self, prof: torch.profiler.profile) -> None:
        last = self.first - 1 + min(self.cfg.steps, self.done - self.cfg.wait)
        self.folder.mkdir(parents=True, exist_ok=True)
        export = self.folder / f".{TRACE}.export"  # torch writes in place; the run dir's files are written whole
        prof.export_chrome_trace(str(export))
        write_atomic(self.folder / TRACE, export.read_bytes())
        export.unlink()
        table = prof.key_averages().table(sort_by=self.sort, row_limit=OPS_ROWS)
        write_atomic(self.folder / OPS, f"steps {self.first}-{last}, rank 0: top operators by {self.sort}\n{table}\n")
        self.written = True
        self.say(f"profile: steps {self.first}-{last} traced: {self.folder / TRACE} (open in https://ui.perfetto.dev "
                 f"or chrome://tracing); top operators by self time: {self.folder / OPS}")


# ---------------------------------------------------------------------------- the loop's hooks


class Watch:
    """The debugging switches of a run, at the loop's step boundaries; each call returns at once when they are off."""

    def __init__(self, cfg: Config, dist: Distributed, run_dir: Path, net: nn.Module, num_classes: int):
        self.cfg, self.dist, self.num_classes = cfg, dist, num_classes
        self.anomaly = AnomalyWatch(net) if cfg.train.detect_anomaly else None
        on_rank0 = cfg.profile.steps and dist.is_main
        self.profiler = Profiler(cfg.profile, dist.device, run_dir / PROFILE_DIR, dist.print) if on_rank0 else None

    def start(self, step: int) -> None:
        """Say which switches are on (before the first step); start the profiler."""
        t = self.cfg.train
        if n := t.overfit_batches:
            floor = loss_floor(t.label_smoothing, self.num_classes)
            self.dist.print(f"overfit: train.overfit_batches={n}: the first {n} batches of epoch 0 ({n * t.batch_size:,} "
                            "images) again and again, each with the same flips, shifts and cutouts (dropout stays "
                            f"random); a net and loss that work take the training loss near {floor:.3f}"
                            + (f" (its floor with train.label_smoothing={t.label_smoothing:g})" if floor else ""))
        if self.anomaly:
            self.dist.print("detect_anomaly: a non-finite loss or gradient stops the run, naming the step and the first "
                            "module that made one (one device sync per step)")
        if self.profiler:
            self.profiler.start(step)

    def after_step(self, loss: torch.Tensor, step: int) -> None:
        if self.anomaly:
            self.anomaly.check(loss, step, self.dist)
        if self.profiler:
            self.profiler.step()

    def finish(self) -> None:
        if self.profiler:
            self.profiler.finish()

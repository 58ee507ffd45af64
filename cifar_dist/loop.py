"""The training loop and what it needs at hand (`Loop`): epochs of steps, training records,
evaluations, the early-stop watch, checkpoints, and a stop at a step boundary when any rank got a
signal. train.py builds its parts and reads its result; the loop never sees a command line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from cifar_dist import checkpoint
from cifar_dist.config import Config
from cifar_dist.console import Console
from cifar_dist.data import Batches, Dataset
from cifar_dist.debug.anomaly import NOTICE as ANOMALY_NOTICE
from cifar_dist.debug.anomaly import AnomalyDetector
from cifar_dist.debug.overfit import overfit_notice
from cifar_dist.debug.profiler import StepProfiler, maybe_profile
from cifar_dist.distributed import Distributed
from cifar_dist.errors import UserError
from cifar_dist.exact_eval import evaluate
from cifar_dist.metrics import EvalResult, direction, eval_record
from cifar_dist.models import count_parameters
from cifar_dist.precision import autocast_context, slow_precision_warning
from cifar_dist.recipe import make_step
from cifar_dist.result_keys import config_hash
from cifar_dist.resume import Resumed
from cifar_dist.rundir import RunDir
from cifar_dist.state import TrainState
from cifar_dist.trackers import Records

MEMORY_FORMAT = torch.channels_last  # faster convolutions on GPU and on CPU (oneDNN) alike
# Called on rank 0 with each evaluation record; a returned reason stops the run after that evaluation
# (a step boundary) on every rank, e.g. a hyperparameter search pruning a hopeless trial.
EvalHook = Callable[[dict[str, Any]], str | None]


class Stopped(Exception):
    """Stopped on a signal after writing a checkpoint; the run resumes from it when restarted."""


class NonFiniteLoss(UserError):
    """Training diverged (a NaN or infinite loss); the run stops without writing the bad state."""


class Loop:
    """The training loop and what it needs at hand: epochs of steps, records, evaluations,
    checkpoints, and a stop at a step boundary when any rank got a signal."""

    def __init__(self, cfg: Config, dist: Distributed, *, run: RunDir, data: Dataset, batches: Batches,
                 state: TrainState, model: torch.nn.Module, records: Records, resumed: Resumed,
                 init_from: dict[str, Any] | None = None, on_eval: EvalHook | None = None):
        """`model` is `state.net` as trained (DDP-wrapped when N > 1); `resumed`: what the checkpoint
        resumed (if any) left to record; `init_from`: the fine-tuning source's record, for summary.json."""
        self.cfg, self.dist, self.run_dir, self.data, self.batches = cfg, dist, run, data, batches
        self.on_eval, self.stop_reason = on_eval, None
        self.state, self.records = state, records
        self.pending, self.pending_norms, self.started_from = resumed.losses, resumed.grad_norms, resumed.started_from
        self.init_from = init_from
        # The weights evaluated, checkpointed as the best, and saved in model.pt: the average's with eval.ema.
        self.evaluated = state.ema.net if cfg.eval.ema else state.net
        self.early_stop: dict[str, Any] | None = self.early_stop_record() if self.watch_ran_out() else None
        self.autocast = autocast_context(cfg.train.precision, dist.device)
        self.step_fn = make_step(cfg, model, state.optimizer, state.scheduler, self.autocast, state.scaler)
        self.console = Console(dist, cfg, batches.steps_per_epoch, data.classes)
        self.anomaly = AnomalyDetector(state.net, dist) if cfg.train.detect_anomaly else None
        self.profiler: StepProfiler | None = None  # while run() traces steps (profile.steps)
        self.compile_seconds = self.train_seconds = 0.0

    def run(self) -> EvalResult:
        cfg, dist, pos = self.cfg, self.dist, self.state.position
        if warning := slow_precision_warning(cfg.train.precision, dist.device):
            dist.print(warning)
        if cfg.model.compile:
            self.compile_seconds = self.warm_up()
        total_steps = cfg.train.epochs * self.batches.steps_per_epoch
        self.console.start(self.run_dir, count_parameters(self.state.net), len(self.data.train_y), total_steps, pos)
        self.clock = Clock(pos.elapsed)
        self.last_save = time.monotonic()
        self.announce_debugging()
        result = saved = None
        keep_best = cfg.checkpoint.every_steps or cfg.checkpoint.every_minutes or cfg.train.early_stop.metric
        with maybe_profile(cfg.profile, dist, self.run_dir.path, after_step=pos.step) as self.profiler:
            for epoch in range(pos.epoch, cfg.train.epochs):
                if self.early_stop:  # resumed after the watch ran out: the run ends here
                    break
                pos.epoch = epoch
                for x, y in self.batches.epoch(epoch, start=pos.offset):
                    self.step(x, y)
                    self.between_steps()
                result = self.end_epoch(epoch) or result
                if self.stop_reason or self.early_stop:
                    break
                if result is not None and result is not saved and keep_best:
                    self.save(result)  # the weights just evaluated, so that "keep the best" has something to keep
                    saved = result
        if result is None:  # resumed from the last step's checkpoint, the final evaluation not yet recorded
            result = self.evaluate()
        self.train_seconds = self.clock.elapsed()
        self.save(result)
        return result

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimiser step (all of its micro-batches): stops, checkpoints and evaluations come only between these."""
        pos = self.state.position
        loss = self.step_fn(x, y)
        self.pending.append(loss)
        if self.step_fn.grad_norm is not None:
            self.pending_norms.append(self.step_fn.grad_norm)
        pos.step += 1
        if self.anomaly:  # a non-finite loss stops the run here, before anything records it
            self.anomaly.check(loss, pos.step)
        if self.profiler:
            self.profiler.step()
        self.state.lookahead.after(pos.step)
        self.state.ema.after(self.state.net, pos.step)
        pos.offset += 1

    def announce_debugging(self) -> None:
        """Before the first step: the debugging switches that are on (profile.* says so itself)."""
        if self.cfg.train.overfit_batches:
            self.dist.print(overfit_notice(self.cfg.train, len(self.data.classes)))
        if self.anomaly:
            self.dist.print(ANOMALY_NOTICE)

    def between_steps(self) -> None:
        """A training record when due; then, with every rank, a checkpoint when due and a stop when signalled."""
        cfg, pos = self.cfg, self.state.position
        if pos.step % cfg.train.log_every == 0 or pos.offset == self.batches.steps_per_epoch:
            record = self.train_record()
            self.records.log(record)
            self.console.train(record)
        every_steps, every_minutes = cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes
        decided = self.dist.stop_or_save((every_steps > 0 and pos.step % every_steps == 0) or
                                         (every_minutes > 0 and time.monotonic() - self.last_save >= 60 * every_minutes))
        if decided.save or decided.stop:
            self.save()
        if decided.stop:
            self.dist.print(f"stop signal: checkpoint at step {pos.step} written to {self.run_dir.path}; exiting for requeue "
                            "(the same command resumes it)")
            raise Stopped(str(self.run_dir.path))

    def end_epoch(self, epoch: int) -> EvalResult | None:
        """The evaluation, when one is due after this epoch."""
        cfg, pos = self.cfg, self.state.position
        result = None
        if epoch == cfg.train.epochs - 1 or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
            result = self.evaluate()
            pos.best_accuracy = max(pos.best_accuracy, result.accuracy)
            record = eval_record(pos.step, epoch + 1, self.clock.elapsed(), result, self.data.classes)
            self.records.log(record, result)
            self.console.eval(record, result)
            if self.on_eval is not None:  # rank 0 asks; every rank gets its answer
                self.stop_reason = self.dist.broadcast(self.dist.main_only(lambda: self.on_eval(record)))
        pos.epoch, pos.offset = epoch + 1, 0
        if result is not None:
            self.watch(record)
        return result

    def watch(self, record: dict[str, Any]) -> None:
        """train.early_stop, after an evaluation: did its metric improve on the best by more than
        min_delta? After `patience` evaluations in a row without, the run stops here (every rank
        decides alike: an evaluation's result is the same on every rank)."""
        stop, pos = self.cfg.train.early_stop, self.state.position
        if not stop.metric:
            return
        value, sign = record[stop.metric], 1 if direction(stop.metric) == "maximize" else -1
        if pos.watch_best is None or sign * (value - pos.watch_best) > stop.min_delta:
            pos.watch_best, pos.watch_best_step, pos.watch_stale = value, pos.step, 0
        else:
            pos.watch_stale += 1
        if self.watch_ran_out():
            self.early_stop = self.early_stop_record()
            self.dist.print(f"early stop at step {pos.step} (epoch {pos.epoch}): {self.early_stop['reason']}")

    def watch_ran_out(self) -> bool:
        """Whether the early stop's patience ran out before the last epoch (saved in the position, so a
        run killed between that decision and its summary ends there when restarted)."""
        stop, pos = self.cfg.train.early_stop, self.state.position
        return bool(stop.metric) and pos.watch_stale >= stop.patience and pos.epoch < self.cfg.train.epochs

    def early_stop_record(self) -> dict[str, Any]:
        stop, pos = self.cfg.train.early_stop, self.state.position
        return {"step": pos.step, "epoch": pos.epoch, "metric": stop.metric, "best": pos.watch_best,
                "best_step": pos.watch_best_step,
                "reason": f"{stop.metric} did not improve on {pos.watch_best:.4f} (step {pos.watch_best_step}) by more "
                          f"than {stop.min_delta:g} in {stop.patience} evaluation{'s' * (stop.patience > 1)}"}

    def evaluate(self) -> EvalResult:
        result = evaluate(self.evaluated, self.data, self.dist, self.cfg.eval, autocast=self.autocast,
                          memory_format=MEMORY_FORMAT, samples=self.cfg.tracking.log_images)
        if not math.isfinite(result.loss):
            raise NonFiniteLoss(f"test loss is {result.loss} at step {self.state.position.step}: the weights are not "
                                "finite; lower train.lr, or find the first bad layer with train.detect_anomaly=true")
        return result

    def train_record(self) -> dict[str, Any]:
        """The mean loss over the global batches since the last record (one all-reduce)."""
        pos, dist = self.state.position, self.dist
        local = torch.stack(self.pending).float().sum()
        loss = float(dist.sum(local)) / (dist.world * len(self.pending))
        if not math.isfinite(loss):  # nothing after the last checkpoint is kept; no NaN reaches a file
            raise NonFiniteLoss(f"train loss is {loss} by step {pos.step} (epoch {pos.epoch + 1}): training diverged; "
                                "lower train.lr, or find the first bad layer with train.detect_anomaly=true")
        self.pending.clear()
        record = {"step": pos.step, "epoch": round(pos.epoch + pos.offset / self.batches.steps_per_epoch, 4),
                  "time": round(self.clock.elapsed(), 3), "train_loss": loss, "lr": self.state.scheduler.get_last_lr()[0]}
        if self.pending_norms:  # train.clip_grad_norm: the global norm before clipping, the same on every rank
            norms = torch.stack(self.pending_norms).float()
            finite = norms[torch.isfinite(norms)]  # fp16: a step whose gradients overflowed was skipped
            if len(finite):
                record["grad_norm"] = float(finite.mean())
            self.pending_norms.clear()
        return record

    def save(self, result: EvalResult | None = None) -> None:
        """A checkpoint of this step: the training state, every rank's RNG states and pending losses
        and gradient norms (gathered to all ranks), and what identifies the run; rank 0 writes it.
        `result`: the evaluation of these weights, by which the best checkpoint is kept."""
        cfg, dist, pos = self.cfg, self.dist, self.state.position
        pos.elapsed, pos.records = self.clock.elapsed(), self.records.lines
        dist.broadcast_buffers(self.state.net)
        per_rank = dist.gather({"rng": checkpoint.rng_state(), "pending": [t.item() for t in self.pending],
                                "pending_grad_norms": [t.item() for t in self.pending_norms]})
        state = {**self.state.state_dict(), "ranks": per_rank, "world_size": dist.world, "config_hash": config_hash(cfg),
                 "config": cfg.to_dict(), "classes": self.data.classes, "run_id": cfg.run.id,
                 "mean": self.data.stats.mean, "std": self.data.stats.std,  # for predict from a checkpoint
                 "started_from": self.started_from}
        scores = {"test_accuracy": result.accuracy, "test_loss": result.loss} if result is not None else {}
        best_by = cfg.train.early_stop.metric or "test_accuracy"
        dist.main_only(lambda: (self.run_dir.ensure_present(),
                                checkpoint.save(self.run_dir.path, pos.step, state, cfg.checkpoint.keep, **scores,
                                                best_by=best_by)))
        self.last_save = time.monotonic()

    def warm_up(self) -> float:
        """Compile before the clock starts: run two steps, then restore every bit of state."""
        start = time.perf_counter()
        saved, rng = self.state.snapshot(), torch.get_rng_state()
        x, y = self.batches.batch(0, 0)
        for _ in range(2):
            self.step_fn(x, y)
        if x.is_cuda:
            torch.cuda.synchronize()
        self.state.load_state_dict(saved)
        torch.set_rng_state(rng)
        return time.perf_counter() - start


class Clock:
    """Training seconds, continuing across resumes."""

    def __init__(self, already: float):
        self.start = time.perf_counter() - already

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

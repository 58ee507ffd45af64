"""`train(cfg) -> summary`: the one entry point for the CLI, `accelerate launch`, torchrun,
submitit and the tests.

    python -m cifar_dist.train --config debug train.epochs=2
    accelerate launch --multi_gpu --num_processes 2 cifar_dist/train.py --config fast
    python -m cifar_dist.train --resume-from runs/a/checkpoints/step_00001200 run.dir=runs/b   # a new run from a checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_dist import checkpoint, distributed, schema
from cifar_dist.config import Config, ConfigError, add_config_arguments, config_hash, load_config
from cifar_dist.console import Console
from cifar_dist.data import Batches, Dataset, TrainBatches, load_dataset
from cifar_dist.debug.anomaly import NOTICE as ANOMALY_NOTICE
from cifar_dist.debug.anomaly import AnomalyDetector
from cifar_dist.debug.overfit import overfit_batches, overfit_notice
from cifar_dist.debug.profiler import StepProfiler, maybe_profile
from cifar_dist.distributed import EXIT_INTERRUPTED, EXIT_REQUEUE, Distributed, install_stop_handlers
from cifar_dist.errors import UserError, run_command
from cifar_dist.evaluation import evaluate
from cifar_dist.finetune import InitWeights, load_init, read_init
from cifar_dist.metrics import EvalResult, direction, eval_record
from cifar_dist.models import count_parameters
from cifar_dist.plots import write_plots
from cifar_dist.precision import adopt_launcher_settings, autocast_context, grad_scaler, slow_precision_warning
from cifar_dist.precision import resolve as resolve_precision
from cifar_dist.recipe import EMA, Lookahead, make_net, make_optimizer, make_step
from cifar_dist.rundir import MODEL, PRUNED, SUMMARY, RunDir, RunDirError, save_model, write_json, writing
from cifar_dist.runs import abandon, diff_result_keys, open_run, record_start
from cifar_dist.state import TrainState
from cifar_dist.trackers import Records, RunInfo, open_records

PROG = "python -m cifar_dist.train"
MEMORY_FORMAT = torch.channels_last  # faster convolutions on GPU and on CPU (oneDNN) alike
# Called on rank 0 with each evaluation record; a returned reason stops the run after that evaluation
# (a step boundary) on every rank, e.g. a hyperparameter search pruning a hopeless trial.
EvalHook = Callable[[dict[str, Any]], str | None]


class Stopped(Exception):
    """Stopped on a signal after writing a checkpoint; the run resumes from it when restarted."""


class NonFiniteLoss(UserError):
    """Training diverged (a NaN or infinite loss); the run stops without writing the bad state."""


class OutOfMemory(UserError):
    """The run does not fit in memory (host or device); a start that failed so leaves no run dir behind."""


def train(cfg: Config, on_eval: EvalHook | None = None, dist: Distributed | None = None, *,
          resume_from: Path | None = None) -> dict[str, Any]:
    """The summary; for a run that `on_eval` stopped, the summary with a "pruned" entry (also in
    pruned.json; no summary.json). `dist`: a process group kept open by a caller that trains
    several runs in one job (a search worker); by default one is made and closed here.
    `resume_from`: a checkpoint folder (checkpoint.chosen) whose whole state a new run starts from,
    unless the run dir already holds checkpoints of its own (then it resumes from those)."""
    install_stop_handlers()  # first: a pre-emption during start-up must end in exit 75 too, not a kill
    own = dist is None
    dist = dist or Distributed(cfg.train.device)
    try:
        return _train(cfg, dist, on_eval, resume_from)
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        said = " ".join(str(e).split())
        said = said[said.find("DefaultCPUAllocator"):] if "DefaultCPUAllocator" in said else said  # not torch's C++ frame
        raise OutOfMemory(f"out of memory on {dist.device.type} ({said[:160] or type(e).__name__}): lower "
                          f"train.batch_size (now {cfg.train.batch_size}) or eval.batch_size (now {cfg.eval.batch_size} "
                          "a rank), or choose a smaller model.name").with_traceback(e.__traceback__) from None
    finally:
        if own:
            dist.close()


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` says memory ran out: a device's (torch.OutOfMemoryError), Python's (MemoryError),
    or torch's CPU allocator's, which raises a plain RuntimeError naming itself."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "DefaultCPUAllocator" in str(e)


def _train(cfg: Config, dist: Distributed, on_eval: EvalHook | None = None, resume_from: Path | None = None,
           ) -> dict[str, Any]:
    unit = dist.world * cfg.train.accumulate
    if cfg.train.batch_size % unit:
        split = f"{dist.world} ranks" + (f" x {cfg.train.accumulate} micro-batches" if cfg.train.accumulate > 1 else "")
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} does not split evenly over {split}")
    for note in adopt_launcher_settings(cfg):
        dist.print(note)
    init = read_init(cfg)  # before the run dir: config.yaml records the file's sha256
    data = load_dataset(cfg.data, announce=dist.print).to(dist.device)
    batches = TrainBatches(data.train_x, data.train_y, cfg.data, global_batch=cfg.train.batch_size, rank=dist.rank,
                           world=dist.world, seed=cfg.seed, memory_format=MEMORY_FORMAT, stats=data.stats)
    batches = overfit_batches(batches, cfg.train.overfit_batches)  # debugging: the first N again and again
    run = open_run(cfg, dist)  # locked; nothing written in it until every check below has passed
    try:
        state, model, started = build_state(cfg, dist, data, batches.steps_per_epoch, init)
        resumed = resume(run, cfg, dist, state, resume_from)
        if dist.stop_requested():  # during start-up: nothing trained, nothing to save
            dist.print("stop signal during start-up; exiting for requeue")
            raise Stopped(str(run.path))
        record_start(run, cfg, dist)
    except BaseException:
        abandon(run, dist)
        raise
    pos = state.position
    if (summary := run.summary()) and (pos.step >= cfg.train.epochs * batches.steps_per_epoch or "early_stop" in summary):
        early = f" (stopped early: {summary['early_stop']['reason']})" if "early_stop" in summary else ""
        dist.print(f"run {run.path} already finished at step {pos.step}{early}: test accuracy {summary['test_accuracy']:.2%}")
        return summary

    info = RunInfo(run, cfg.run.name or run.path.name, cfg.to_dict(), data.classes, data.test_x, cfg.train.batch_size)
    try:
        records = open_records(info, cfg.tracking, keep=pos.records, on_this_rank=dist.is_main)
        loop = Loop(cfg, dist, run=run, data=data, batches=batches, state=state, model=model, records=records,
                    resumed=resumed, init_from=started, on_eval=on_eval)
        result = loop.run()
    except BaseException:
        if state.position.step == 0:  # the start failed (out of memory at the first batch, ...): no trace of it
            abandon(run, dist)
        raise
    summary = make_summary(loop, result)
    if loop.stop_reason:
        pos = state.position
        summary["pruned"] = {"step": pos.step, "epoch": pos.epoch, "reason": loop.stop_reason}
        dist.print(f"stopped early at step {pos.step} (epoch {pos.epoch}): {loop.stop_reason}")
        dist.main_only(lambda: (run.ensure_present(), write_json(run / PRUNED, summary), records.finish(summary)))
        return summary
    dist.main_only(lambda: finish_run(loop, summary))
    loop.console.finish(summary)
    return summary


def build_state(cfg: Config, dist: Distributed, data: Dataset, steps_per_epoch: int, init: InitWeights | None = None,
                ) -> tuple[TrainState, torch.nn.Module, dict[str, Any] | None]:
    """The recipe's net (with `init`'s weights when fine-tuning), optimiser, schedule, Lookahead and
    EMA; the module to train (DDP when N > 1); and what summary.json says of the init weights."""
    total_steps = cfg.train.epochs * steps_per_epoch
    net = make_net(cfg, data.train_x, len(data.classes), MEMORY_FORMAT, dist.rank, stats=data.stats)
    started = None
    if init is not None:  # before the averages below copy the weights, and before DDP broadcasts them
        line, replaced = load_init(net, init, cfg.model.name, data.classes)
        dist.print(line)
        started = init.record(replaced)
    model = dist.prepare(net, cfg.train.sync_bn)
    optimizer, scheduler = make_optimizer(cfg, net, steps_per_epoch, total_steps)
    lookahead = Lookahead(net, cfg.train.lookahead_every, total_steps)
    ema = EMA(net, cfg.train.ema.decay, cfg.train.ema.start_step)
    scaler = grad_scaler(cfg.train.precision, dist.device)
    return TrainState(net, optimizer, scheduler, lookahead, scaler, ema), model, started


@dataclass
class Resumed:
    """What a resume hands the loop besides the training state: this rank's losses and gradient norms
    since the last record (tensors: no sync per step), and the checkpoint of another run this run
    started from (`--resume-from`), for summary.json."""

    losses: list[torch.Tensor] = field(default_factory=list)
    grad_norms: list[torch.Tensor] = field(default_factory=list)
    started_from: dict[str, Any] | None = None


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


def resume(run: RunDir, cfg: Config, dist: Distributed, state: TrainState, resume_from: Path | None = None) -> Resumed:
    """Continue from the newest valid checkpoint in the run dir; without one, from `resume_from` (a
    checkpoint of another run, `--resume-from`), as a new run; else start afresh."""
    found = checkpoint.load_latest(run.path, warn=lambda m: dist.print(f"warning: {m}"))
    # Every rank must pick the same checkpoint; rank 0's choice wins.
    chosen = dist.broadcast(str(found[0].path) if found else None)
    elsewhere = chosen is None and resume_from is not None
    if elsewhere:
        chosen = str(resume_from)
    elif chosen is None:
        return Resumed()
    elif resume_from is not None:
        dist.print(f"note: {run.path} holds checkpoints of its own; it resumes from those, not from --resume-from")
    saved = found[1] if found and str(found[0].path) == chosen else checkpoint.load_state(Path(chosen) / checkpoint.STATE)
    if saved.get("config_hash") != config_hash(cfg) and not cfg.checkpoint.allow_config_change:
        then = Config()
        schema.update(then, saved["config"])  # as saved, not validated again: its data may have moved
        changed = "; ".join(diff_result_keys(then, cfg)) or "an older version's keys"
        raise RunDirError(f"checkpoint {chosen} was written by a different config ({changed}); "
                          "use checkpoint.allow_config_change=true")
    try:
        state.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # another net's weights (allow_config_change)
        why = " ".join(str(e).split())[:200]
        raise RunDirError(f"checkpoint {chosen} does not fit this config's model or optimiser ({why})") from None
    resumed = Resumed(started_from=saved.get("started_from"))
    if saved["world_size"] == dist.world:
        mine = saved["ranks"][dist.rank]
        checkpoint.set_rng_state(mine["rng"])
        resumed.losses = [torch.tensor(v, device=dist.device) for v in mine["pending"]]
        resumed.grad_norms = [torch.tensor(v, device=dist.device) for v in mine.get("pending_grad_norms", [])]
    else:  # the data order does not depend on the world size; per-rank RNG streams and losses do
        dist.print(f"note: resuming {saved['world_size']} ranks' checkpoint on {dist.world}; dropout RNG streams restart")
    pos = state.position
    if elsewhere:  # a new run: its own records start empty
        pos.records = 0
        marker = json.loads((Path(chosen) / checkpoint.MARKER).read_text())
        resumed.started_from = {"checkpoint": chosen, "run_id": saved.get("run_id"), "step": pos.step,
                                "sha256": marker["sha256"]}
        dist.print(f"started from {chosen} of run {saved.get('run_id')} (step {pos.step}, epoch {pos.epoch}, "
                   f"{pos.offset} steps into it): its whole training state, in this new run")
    else:
        dist.print(f"resumed from {chosen} (step {pos.step}, epoch {pos.epoch}, {pos.offset} steps into it)")
    if (before := saved["config"]["train"]["epochs"]) != cfg.train.epochs:
        lr_then = saved["scheduler"]["_last_lr"][0]
        lr_now = cfg.train.lr * state.scheduler.lr_lambdas[0](pos.step)
        dist.print(f"note: train.epochs {before} -> {cfg.train.epochs}: the LR schedule is stretched to the new length, "
                   f"so the LR at step {pos.step} goes from {lr_then:.4g} to {lr_now:.4g} and decays from there")
    return resumed


# ---------------------------------------------------------------------------- the end


def make_summary(loop: Loop, result: EvalResult) -> dict[str, Any]:
    """summary.json: the final evaluation, timings and where the run ran."""
    cfg, dist, pos, classes = loop.cfg, loop.dist, loop.state.position, loop.data.classes
    images = len(loop.data.train_y) * cfg.train.epochs
    return {
        "run_id": loop.run_dir.run_id,
        "model": cfg.model.name,
        "test_accuracy": result.accuracy,
        "best_test_accuracy": pos.best_accuracy,
        "per_class_accuracy": dict(zip(classes, result.per_class)),
        "confusion_matrix": result.confusion.tolist(),
        "test_loss": result.loss,
        "epochs": cfg.train.epochs,
        "steps": pos.step,
        "train_seconds": round(loop.train_seconds, 3),
        "compile_seconds": round(loop.compile_seconds, 3),
        "images_per_second": round(images / max(loop.train_seconds, 1e-9), 1),
        "world_size": dist.world,
        "hosts": dist.gather(socket.gethostname()),  # the node of each rank, in rank order
        "device": dist.device.type,
        "precision": resolve_precision(cfg.train.precision, dist.device),
        "weights": evaluated_weights(cfg),
        **({"init_from": loop.init_from} if loop.init_from else {}),
        **({"resumed_from": loop.started_from} if loop.started_from else {}),
        **({"early_stop": early_stop_summary(loop)} if loop.early_stop else {}),
    }


def evaluated_weights(cfg: Config) -> str:
    """Which weights the evaluations, summary.json and model.pt are of."""
    ema = cfg.train.ema
    return f"ema (decay {ema.decay:g}, from step {ema.start_step})" if cfg.eval.ema else "trained"


def early_stop_summary(loop: Loop) -> dict[str, Any]:
    """Why and where the run stopped early, and its best checkpoint (kept: checkpoint.prune keeps the best by the metric)."""
    stop = dict(loop.early_stop or {})
    best = checkpoint.best_of(checkpoint.list_checkpoints(loop.run_dir.path, verify=False), stop["metric"])
    stop["best_checkpoint"] = str(best.path.relative_to(loop.run_dir.path)) if best else None
    return stop


def finish_run(loop: Loop, summary: dict[str, Any]) -> None:
    """Rank 0: the evaluated weights for `predict`, plots, the trackers' summary, and summary.json
    last: a run is finished once every output is written. A failure before it (a full disk) leaves
    the run unfinished, and the same command completes it from the last checkpoint."""
    run, data = loop.run_dir, loop.data
    run.ensure_present()
    with writing():
        save_model(run / MODEL, loop.cfg.model.name, data.classes, loop.evaluated.state_dict(), data.stats.mean,
                   data.stats.std, weights=summary["weights"])
        write_plots(run, summary)
        loop.records.finish(summary)
        write_json(run / SUMMARY, summary)


# ---------------------------------------------------------------------------- command line


def argument_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The training command line: a config, overrides, --resume-from, --print-config (`cifar-dist
    train` adds --smoke, cli.py)."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a CIFAR-10 classifier (data-parallel under a launcher).")
    add_config_arguments(parser, "; with --resume-from and no --config, the checkpoint's own config")
    parser.add_argument("--resume-from", type=Path, metavar="CHECKPOINT",
                        help="start a NEW run (run.dir: a new or empty folder; default a fresh one) from this checkpoint's "
                             "whole training state: a checkpoint folder (checkpoints/step_N), its state.pt, or a run dir "
                             "(its newest checkpoint). The config must match the checkpoint's result-changing keys "
                             "(train.epochs may grow), as for a resume")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def parse_args(argv: list[str] | None = None, prog: str = PROG,
               parser: argparse.ArgumentParser | None = None) -> tuple[argparse.Namespace, Config]:
    """The arguments and the config; --resume-from is resolved to its checkpoint folder (every rank
    reads the same files, so every rank agrees), whose config is the base when no --config is given."""
    args = (parser or argument_parser(prog)).parse_intermixed_args(argv)  # overrides before or after --config
    if args.resume_from is None:
        return args, load_config(args.config, args.overrides)
    args.resume_from = checkpoint.chosen(args.resume_from).path
    base = None
    if not args.config:
        base = checkpoint.load_state(args.resume_from / checkpoint.STATE)["config"]
        base["run"] = {}  # a new run: its own dir, id and name
    return args, load_config(args.config, args.overrides, saved=base)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    return run_parsed(*parse_args(argv, prog))


def run_parsed(args: argparse.Namespace, cfg: Config) -> int:
    """--print-config, or the run: exit 0 when it finished, 75 (requeue) or 130 (Ctrl-C) when a signal stopped it."""
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        train(cfg, resume_from=args.resume_from)
    except Stopped:
        return EXIT_INTERRUPTED if distributed.interrupted else EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

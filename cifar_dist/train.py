"""`train(cfg) -> summary`: the one entry point for the CLI, `accelerate launch`, torchrun,
submitit and the tests. It opens the run, builds the training state (resume.py continues it), runs
the loop (loop.py), and writes the run's last outputs; then its command line.

    python -m cifar_dist.train --config debug train.epochs=2
    accelerate launch --multi_gpu --num_processes 2 cifar_dist/train.py --config fast
    python -m cifar_dist.train --resume-from runs/a/checkpoints/step_00001200 run.dir=runs/b   # a new run from a checkpoint
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from cifar_dist import checkpoint, distributed
from cifar_dist.config import Config, ConfigError, add_config_arguments, load_config
from cifar_dist.data import Dataset, TrainBatches, load_dataset
from cifar_dist.debug.overfit import overfit_batches
from cifar_dist.distributed import EXIT_INTERRUPTED, EXIT_REQUEUE, Distributed, install_stop_handlers
from cifar_dist.errors import UserError, run_command
from cifar_dist.finetune import InitWeights, load_init, read_init
from cifar_dist.loop import MEMORY_FORMAT, EvalHook, Loop, Stopped
from cifar_dist.metrics import EvalResult
from cifar_dist.plots import write_plots
from cifar_dist.precision import adopt_launcher_settings, grad_scaler
from cifar_dist.precision import resolve as resolve_precision
from cifar_dist.recipe import EMA, Lookahead, make_net, make_optimizer
from cifar_dist.resume import resume
from cifar_dist.run_opening import abandon, open_run, record_start
from cifar_dist.rundir import MODEL, PRUNED, SUMMARY, save_model, write_json, writing
from cifar_dist.state import TrainState
from cifar_dist.trackers import RunInfo, open_records

PROG = "python -m cifar_dist.train"


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

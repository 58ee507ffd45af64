"""Debugging a run on one machine: `--smoke` (every path of a config on a few batches),
`train.overfit_batches`, `train.detect_anomaly` and `profile.*`.

The loop calls in at its step boundaries through `Watch` (start, after each step, finish); the
smoke drives train.py's own `_train` twice, so it goes through exactly the code a real run does.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_dist import checkpoint, rundir
from cifar_dist.config import Config, ConfigError, ProfileConfig, validate
from cifar_dist.data import TrainBatches, load_cached
from cifar_dist.distributed import Distributed
from cifar_dist.errors import UserError
from cifar_dist.rundir import OPS, PROFILE_DIR, TRACE, RunDir, RunDirError, load_weights, write_atomic

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


# ---------------------------------------------------------------------------- --smoke

SMOKE_STEPS_PER_EPOCH = 2  # two epochs of two steps; the second is trained after a resume from the first
SMOKE_TEST_IMAGES = 50  # the slice of the test set evaluated: 5 per class of CIFAR-10
# On a CPU the config's batch is capped to this many images per rank (ResNet-18's step: ~1 CPU-second
# at 16); on a GPU it is kept, so that the smoke also shows that the real batch fits in memory.
SMOKE_CPU_BATCH_PER_RANK = 16
PATHS = ("data", "run dir", "net", "compile", "train steps", "records", "evaluation", "checkpoint", "resume", "final")
# The path a failure belongs to: the innermost frame of the training code in its traceback that is
# one of these modules or functions.
FAILURE_PATHS = {
    "cifar_dist.data": "data", "cifar_dist.sources": "data", "load_data": "data",
    "cifar_dist.runs": "run dir",
    "build_state": "net", "make_net": "net", "make_optimizer": "net",
    "warm_up": "compile",
    "step": "train steps",  # Loop.step and the recipe's step
    "train_record": "train steps",  # the mean training loss
    "cifar_dist.trackers": "records", "cifar_dist.console": "records",
    "cifar_dist.evaluation": "evaluation", "evaluate": "evaluation",
    "save": "checkpoint",  # Loop.save and checkpoint.save
    "resume": "resume",
    "finish_run": "final", "make_summary": "final", "cifar_dist.plots": "final",
}


@dataclass
class Failure:
    path: str
    why: str


class PathFailed(Exception):
    """A check of the smoke's own found a path broken."""

    def __init__(self, path: str, why: str):
        super().__init__(why)
        self.path = path


def smoke_config(cfg: Config, dist: Distributed, compile_too: bool) -> Config:
    """The config the smoke runs: the given one on a few batches (see Smoke), in a new run dir."""
    c = copy.deepcopy(cfg)
    t = c.train
    if dist.device.type == "cpu" and t.batch_size % dist.world == 0:  # a batch that does not split fails as it would
        batch = min(t.batch_size, SMOKE_CPU_BATCH_PER_RANK * dist.world)
        t.lr *= batch / t.batch_size  # the linear scaling rule: a smaller batch at the full lr can diverge in 4 steps
        t.batch_size = batch
    scale = 2 / t.epochs  # the schedule keeps its shape over the smoke's two epochs
    t.warmup_epochs, t.whiten_bias_epochs = t.warmup_epochs * scale, t.whiten_bias_epochs * scale
    t.epochs, t.log_every = 2, 1
    t.overfit_batches = min(t.overfit_batches, SMOKE_STEPS_PER_EPOCH)
    c.model.compile = c.model.compile and compile_too
    c.data.train_subset = min(c.data.train_subset or sys.maxsize, SMOKE_STEPS_PER_EPOCH * t.batch_size)
    c.data.test_subset = min(c.data.test_subset or sys.maxsize, SMOKE_TEST_IMAGES)
    # Epoch 1 is checkpointed after its evaluation, so the resume starts epoch 2; step 3 is a periodic checkpoint.
    c.eval.every, c.checkpoint.every_steps, c.profile.steps = 1, SMOKE_STEPS_PER_EPOCH + 1, 0
    c.run.dir = cfg.run.dir or dist.broadcast(f"runs/smoke-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                              f"{uuid.uuid4().hex[:8]}")
    path = Path(c.run.dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"run.dir: --smoke needs a new or empty run dir; {path} is not")
    validate(c)
    return c


class Smoke:
    """--smoke: the config's own net, data source, precision and recipe through every path of a run
    on a few batches. Epoch 1, a run of its own: two steps, an evaluation on a slice of the test set,
    a checkpoint, the final records and plots. Epoch 2: that run resumed from its checkpoint
    (train.epochs may grow), a step, a periodic checkpoint, a step, the evaluation, checkpoint and
    final records again. Then one line per path: ok (what shows it), failed (why), skipped or not
    reached. train.detect_anomaly and the rest of the config stay as given; profiling is off."""

    def __init__(self, cfg: Config, dist: Distributed, compile_too: bool):
        self.given, self.dist, self.compile_too = cfg, dist, compile_too
        self.cfg = smoke_config(cfg, dist, compile_too)
        self.run_dir = RunDir(self.cfg.run.dir)
        self.failure: Failure | None = None
        self.data = ""  # what the data path showed
        self.test_images = 0
        self.first: list[dict[str, Any]] = []  # epoch 1's records: the resumed run keeps those its checkpoint covers
        self.covered = 0
        self.first_summary: dict[str, Any] = {}

    def run(self, train_once: Callable[[Config], dict[str, Any]]) -> bool:
        """All paths, then the report (rank 0); whether every path passed on this rank."""
        cfg, dist = self.cfg, self.dist
        if cfg.tracking.backend == "wandb":
            os.environ["WANDB_MODE"] = "offline"  # the tracker's path, without a throwaway run on the server
        dist.print(self.header())
        self.attempt(self.load_data)
        start = time.perf_counter()  # the data cache aside: decoded once, then every run reads it
        cfg.train.epochs = 1
        self.first_summary = self.attempt(lambda: train_once(cfg)) or {}
        self.first = self.run_dir.metrics() if dist.is_main else []
        self.attempt(self.check_resumable)
        cfg.train.epochs = 2
        self.attempt(lambda: train_once(cfg))
        seconds = time.perf_counter() - start
        if not dist.is_main:
            if self.failure:
                print(f"smoke: rank {dist.rank}: {self.failure.path}: failed: {self.failure.why}", file=sys.stderr, flush=True)
            return self.failure is None
        lines = self.report()
        passed = all(status in ("ok", "skipped") for _, status, _ in lines)
        for path, status, detail in lines:
            print(f"  {path:<12} {status:<12} {detail}")
        kept = f"run dir kept: {self.run_dir.path}" if self.run_dir.path.exists() else "no run dir made"
        if passed and not self.given.run.dir:
            shutil.rmtree(self.run_dir.path, ignore_errors=True)
            kept = "run dir removed"
        print(f"smoke {'passed' if passed else 'FAILED'} in {seconds:.1f} s (data cache aside); {kept}", flush=True)
        return passed

    def attempt(self, step: Callable[[], Any]) -> Any:
        """Run one stage unless an earlier one failed; a failure is noted with the path it belongs to."""
        if self.failure:
            return None
        try:
            return step()
        except Exception as e:
            if not isinstance(e, (UserError, PathFailed)):  # unexpected: the whole traceback, before the report
                traceback.print_exc()
            self.failure = Failure(failed_path(e), describe(e))
            return None

    def header(self) -> str:
        c, given = self.cfg, self.given
        capped = f" (train.batch_size={given.train.batch_size} capped on the CPU, train.lr={c.train.lr:.4g} scaled " \
                 "with it)" if c.train.batch_size != given.train.batch_size else ""
        return (f"smoke: {c.model.name} net, {c.data.source} data, train.precision={c.train.precision}, on {self.dist.world} x "
                f"{self.dist.device.type}: 2 epochs of {SMOKE_STEPS_PER_EPOCH} steps of {c.train.batch_size} images"
                f"{capped} with a resume between them; run dir {c.run.dir}")

    def load_data(self) -> None:
        start = time.perf_counter()
        ds = load_cached(self.cfg.data, announce=self.dist.print)
        d = self.cfg.data
        where = f" {d.path}" if d.path else ""
        self.test_images = min(d.test_subset, len(ds.test_y))
        self.data = (f"{d.source}{where}: {len(ds.train_y):,} training and {len(ds.test_y):,} test images in "
                     f"{len(ds.classes)} classes (cache read in {time.perf_counter() - start:.1f} s); the smoke takes "
                     f"{min(d.train_subset, len(ds.train_y)):,} and {self.test_images:,}")

    def check_resumable(self) -> None:
        """Epoch 1's last checkpoint is the newest valid one and loads (rank 0 looks; all ranks agree)."""
        problem = None
        if self.dist.is_main:
            warnings: list[str] = []
            found = checkpoint.load_latest(self.run_dir.path, warn=warnings.append)
            step = self.first_summary.get("steps")
            if found is None or found[0].step != step:
                problem = f"the checkpoint of step {step} is not the newest valid one: {'; '.join(warnings) or 'none'}"
            else:
                self.covered = found[1]["position"]["records"]
        problem = self.dist.broadcast(problem)
        if problem:
            raise PathFailed("checkpoint", problem)

    # ---- the report (rank 0)

    def report(self) -> list[tuple[str, str, str]]:
        checks = {"data": lambda: self.data or None, "run dir": self.shown_run_dir, "net": self.shown_net,
                  "compile": self.shown_compile, "train steps": self.shown_steps, "records": self.shown_records,
                  "evaluation": self.shown_evaluation, "checkpoint": self.shown_checkpoint, "resume": self.shown_resume,
                  "final": self.shown_final}
        lines = []
        for path in PATHS:
            if self.failure and self.failure.path == path:
                lines.append((path, "failed", self.failure.why))
                continue
            try:
                shown = checks[path]()
            except Exception as e:  # an artefact on disk that is not what it must be
                lines.append((path, "failed", describe(e)))
                continue
            if isinstance(shown, tuple):  # (status, why)
                lines.append((path, *shown))
            else:
                lines.append((path, "ok", shown) if shown else (path, "not reached", ""))
        if self.failure and self.failure.path not in PATHS:
            lines.append((self.failure.path, "failed", self.failure.why))
        return lines

    def records(self) -> list[dict[str, Any]]:
        return self.run_dir.metrics()

    def shown_run_dir(self) -> str | None:
        files = (rundir.CONFIG, rundir.ENV)
        return f"{self.run_dir.path}: {', '.join(files)}" if all((self.run_dir / f).is_file() for f in files) else None

    def shown_net(self) -> str | None:
        # config.yaml is written once the net, optimiser and schedule are built (and resumed)
        return f"{self.cfg.model.name}, optimiser and LR schedule built" if (self.run_dir / rundir.CONFIG).is_file() else None

    def shown_compile(self) -> tuple[str, str] | str | None:
        if not self.given.model.compile:
            return "skipped", "model.compile=false"
        if not self.compile_too:
            return "skipped", "add --smoke-compile to compile too (about a minute on a CPU)"
        seconds = self.first_summary.get("compile_seconds")
        return f"compiled and warmed up in {seconds:.1f} s" if seconds else None

    def shown_steps(self) -> str | None:
        losses = [r["train_loss"] for r in self.records() if "train_loss" in r]
        if not losses:
            return None
        if not all(math.isfinite(v) for v in losses):
            raise PathFailed("train steps", f"non-finite training loss: {losses}")
        return f"{len(losses)} steps of {self.cfg.train.batch_size} images, loss {losses[0]:.3f} -> {losses[-1]:.3f}"

    def shown_records(self) -> str | None:
        records, backend = self.records(), self.cfg.tracking.backend
        offline = " (offline for the smoke)" if backend == "wandb" else ""
        return f"{rundir.METRICS}: {len(records)} records; tracker {backend}{offline}" if records else None

    def shown_evaluation(self) -> str | None:
        evals = [r for r in self.records() if "test_accuracy" in r]
        if not evals:
            return None
        return f"{len(evals)} evaluations of {self.test_images} test images, accuracy {evals[-1]['test_accuracy']:.1%}"

    def shown_checkpoint(self) -> str | None:
        kept = checkpoint.list_checkpoints(self.run_dir.path, verify=True)
        if not kept:
            return None
        steps = ", ".join(str(c.step) for c in kept)
        return f"steps {steps} kept (checkpoint.keep={self.cfg.checkpoint.keep}), each matching its sha256"

    def shown_resume(self) -> str | None:
        records, steps = self.records(), self.first_summary.get("steps", 0)
        if not self.first_summary or not any(r["step"] > steps for r in records):
            return None
        if not self.covered or records[: self.covered] != self.first[: self.covered]:
            raise PathFailed("resume", f"epoch 1's records were not kept: the run restarted instead of resuming at step {steps}")
        return f"at step {steps}: epoch 2 went on from epoch 1's last checkpoint, keeping the {self.covered} records it covers"

    def shown_final(self) -> str | None:
        run = self.run_dir
        summary = run.summary()
        if summary is None:
            return None
        load_weights(run / rundir.MODEL)  # weights_only: what predict and evaluate will load
        missing = [name for name in (rundir.LOSS_PLOT, rundir.CLASS_PLOT) if not (run / name).is_file()]
        if missing:
            raise PathFailed("final", f"{', '.join(missing)} missing")
        return (f"{rundir.SUMMARY} (test accuracy {summary['test_accuracy']:.1%}), {rundir.MODEL} (loads), "
                f"{rundir.LOSS_PLOT}, {rundir.CLASS_PLOT}")


def failed_path(error: BaseException) -> str:
    """The path a failure belongs to (FAILURE_PATHS), or "other"."""
    if isinstance(error, PathFailed):
        return error.path
    frames = [frame for frame, _ in traceback.walk_tb(error.__traceback__)]
    for frame in reversed(frames):  # innermost first
        module = frame.f_globals.get("__name__", "")
        if module.startswith("cifar_dist."):
            path = FAILURE_PATHS.get(module) or FAILURE_PATHS.get(frame.f_code.co_name)
            if path:
                return path
    return "other"


def describe(error: BaseException) -> str:
    """One line: a user error's own message; anything else, its type and the first line of its message."""
    text = str(error) if isinstance(error, (UserError, PathFailed)) else \
        f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    return text if len(text) <= 300 else text[:297] + "..."

"""`cifar-dist train --smoke`: every phase of a run (data, run dir, net, compile, train steps,
records, evaluation, checkpoint, resume, final records) on a few batches, through `train(cfg)`
itself, so that it goes through exactly the code a real run does; then one line per phase.

The smoke sits above the loop: it imports train.py, which never imports it. It knows which phase
a failure belongs to by the code each phase runs (`PHASE_CODE`: the functions and modules
themselves, not their names), so that renaming a function cannot silently misfile a failure.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any

from cifar_dist import checkpoint, console, data, exact_eval, finetune, recipe, run_opening, rundir, sources, trackers, train
from cifar_dist.config import Config, validate
from cifar_dist.distributed import Distributed, install_stop_handlers
from cifar_dist.errors import UserError
from cifar_dist.loop import Loop
from cifar_dist.resume import resume
from cifar_dist.rundir import RunDir, RunDirError, load_weights

STEPS_PER_EPOCH = 2  # two epochs of two steps; the second is trained after a resume from the first
TEST_IMAGES = 50  # the slice of the test set evaluated: 5 per class of CIFAR-10
# On a CPU the config's batch is capped to this many images per rank (ResNet-18's step: ~1 CPU-second
# at 16); on a GPU it is kept, so that the smoke also shows that the real batch fits in memory.
CPU_BATCH_PER_RANK = 16


class Phase(Enum):
    """The phases of a run, in the order the report lists them; the value is the report's label."""

    DATA = "data"
    RUN_DIR = "run dir"
    NET = "net"
    COMPILE = "compile"
    STEPS = "train steps"
    RECORDS = "records"
    EVALUATION = "evaluation"
    CHECKPOINT = "checkpoint"
    RESUME = "resume"
    FINAL = "final"


@dataclass
class Failure:
    phase: Phase | None  # None: in no phase's code ("other")
    why: str


class PhaseFailed(Exception):
    """A check of the smoke's own found a phase broken."""

    def __init__(self, phase: Phase, why: str):
        super().__init__(why)
        self.phase = phase


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--smoke and --smoke-compile, on `cifar-dist train`'s command line (cli.py)."""
    parser.add_argument("--smoke", action="store_true",
                        help="every path of this config (data, net, steps, evaluation, checkpoint, resume, final records) "
                             "on a few batches, in a throwaway run dir unless run.dir is given; one line per path, "
                             "exit 0 only if all passed")
    parser.add_argument("--smoke-compile", action="store_true",
                        help="--smoke, with torch.compile too when the config asks for it (skipped otherwise: "
                             "about a minute on a CPU)")


def run_smoke(cfg: Config, compile_too: bool) -> int:
    """The smoke on every rank of this job: exit 0 when every phase passed, else 1."""
    install_stop_handlers()  # as train() does: a signal is a stop at a step boundary, not a kill
    dist = Distributed(cfg.train.device)
    try:
        return 0 if Smoke(cfg, dist, compile_too).run() else 1
    finally:
        dist.close()


def smoke_config(cfg: Config, dist: Distributed, compile_too: bool) -> Config:
    """The config the smoke runs: the given one on a few batches (see Smoke), in a new run dir."""
    c = copy.deepcopy(cfg)
    t = c.train
    unit = dist.world * t.accumulate  # a rank's share of the batch is split into train.accumulate micro-batches
    if dist.device.type == "cpu" and t.batch_size % unit == 0:  # a batch that does not split fails as it would
        batch = min(t.batch_size, max(1, CPU_BATCH_PER_RANK * dist.world // unit) * unit)
        t.lr *= batch / t.batch_size  # the linear scaling rule: a smaller batch at the full lr can diverge in 4 steps
        t.batch_size = batch
    scale = 2 / t.epochs  # the schedule keeps its shape over the smoke's two epochs
    t.warmup_epochs, t.whiten_bias_epochs = t.warmup_epochs * scale, t.whiten_bias_epochs * scale
    t.epochs, t.log_every = 2, 1
    t.overfit_batches = min(t.overfit_batches, STEPS_PER_EPOCH)
    # The average starts by the first step (so epoch 2 resumes a real one); early stopping watches both evaluations.
    t.ema.start_step = min(t.ema.start_step, 1)
    t.early_stop.patience = min(t.early_stop.patience, 1)
    c.model.compile = c.model.compile and compile_too
    c.data.train_subset = min(c.data.train_subset or sys.maxsize, STEPS_PER_EPOCH * t.batch_size)
    c.data.test_subset = min(c.data.test_subset or sys.maxsize, TEST_IMAGES)
    # Epoch 1 is checkpointed after its evaluation, so the resume starts epoch 2; step 3 is a periodic checkpoint.
    c.eval.every, c.checkpoint.every_steps, c.profile.steps = 1, STEPS_PER_EPOCH + 1, 0
    c.run.dir = cfg.run.dir or dist.broadcast(f"runs/smoke-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                              f"{uuid.uuid4().hex[:8]}")
    path = Path(c.run.dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunDirError(f"run.dir: --smoke needs a new or empty run dir; {path} is not")
    validate(c)
    return c


class Smoke:
    """The config's own net, data source, precision and recipe through every phase of a run on a
    few batches. Epoch 1, a run of its own: two steps, an evaluation on a slice of the test set, a
    checkpoint, the final records and plots. Epoch 2: that run resumed from its checkpoint
    (train.epochs may grow), a step, a periodic checkpoint, a step, the evaluation, checkpoint and
    final records again. Then one line per phase: ok (what shows it), failed (why), skipped or not
    reached. train.detect_anomaly and the rest of the config stay as given; profiling is off."""

    def __init__(self, cfg: Config, dist: Distributed, compile_too: bool):
        self.given, self.dist, self.compile_too = cfg, dist, compile_too
        self.cfg = smoke_config(cfg, dist, compile_too)
        self.run_dir = RunDir(self.cfg.run.dir)
        self.failure: Failure | None = None
        self.data = ""  # what the data phase showed
        self.test_images = 0
        self.first: list[dict[str, Any]] = []  # epoch 1's records: the resumed run keeps those its checkpoint covers
        self.covered = 0
        self.first_summary: dict[str, Any] = {}

    def run(self) -> bool:
        """Every phase, then the report (rank 0); whether every phase passed on this rank."""
        cfg, dist = self.cfg, self.dist
        if "wandb" in cfg.tracking.backend:
            os.environ["WANDB_MODE"] = "offline"  # the tracker's code, without a throwaway run on the server
        dist.print(self.header())
        self.attempt(self.load_data)
        start = time.perf_counter()  # the data cache aside: decoded once, then every run reads it
        cfg.train.epochs = 1
        self.first_summary = self.attempt(lambda: train.train(cfg, dist=dist)) or {}
        self.first = self.run_dir.metrics() if dist.is_main else []
        self.attempt(self.check_resumable)
        cfg.train.epochs = 2
        self.attempt(lambda: train.train(cfg, dist=dist))
        seconds = time.perf_counter() - start
        if not dist.is_main:
            if self.failure:
                print(f"smoke: rank {dist.rank}: {label(self.failure.phase)}: failed: {self.failure.why}", file=sys.stderr,
                      flush=True)
            return self.failure is None
        lines = self.report()
        passed = all(status in ("ok", "skipped") for _, status, _ in lines)
        for phase, status, detail in lines:
            print(f"  {phase:<12} {status:<12} {detail}")
        kept = f"run dir kept: {self.run_dir.path}" if self.run_dir.path.exists() else "no run dir made"
        if passed and not self.given.run.dir:
            shutil.rmtree(self.run_dir.path, ignore_errors=True)
            kept = "run dir removed"
        print(f"smoke {'passed' if passed else 'FAILED'} in {seconds:.1f} s (data cache aside); {kept}", flush=True)
        return passed

    def attempt(self, stage: Callable[[], Any]) -> Any:
        """Run one stage unless an earlier one failed; a failure is noted with the phase it belongs to."""
        if self.failure:
            return None
        try:
            return stage()
        except Exception as e:
            if not isinstance(e, (UserError, PhaseFailed)):  # unexpected: the whole traceback, before the report
                traceback.print_exc()
            self.failure = Failure(phase_of(e), one_line(e))
            return None

    def header(self) -> str:
        c, given = self.cfg, self.given
        capped = f" (train.batch_size={given.train.batch_size} capped on the CPU, train.lr={c.train.lr:.4g} scaled " \
                 "with it)" if c.train.batch_size != given.train.batch_size else ""
        return (f"smoke: {c.model.name} net, {c.data.source} data, train.precision={c.train.precision}, on {self.dist.world} x "
                f"{self.dist.device.type}: 2 epochs of {STEPS_PER_EPOCH} steps of {c.train.batch_size} images"
                f"{capped} with a resume between them; run dir {c.run.dir}")

    def load_data(self) -> None:
        start = time.perf_counter()
        ds = data.load_cached(self.cfg.data, announce=self.dist.print)
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
            raise PhaseFailed(Phase.CHECKPOINT, problem)

    # ---- the report (rank 0): what each phase left in the run dir

    def report(self) -> list[tuple[str, str, str]]:
        """(phase, status, detail) for every phase, and for a failure in no phase's code."""
        evidence = {Phase.DATA: lambda: self.data or None, Phase.RUN_DIR: self.shown_run_dir, Phase.NET: self.shown_net,
                    Phase.COMPILE: self.shown_compile, Phase.STEPS: self.shown_steps, Phase.RECORDS: self.shown_records,
                    Phase.EVALUATION: self.shown_evaluation, Phase.CHECKPOINT: self.shown_checkpoint,
                    Phase.RESUME: self.shown_resume, Phase.FINAL: self.shown_final}
        lines = []
        for phase in Phase:
            if self.failure and self.failure.phase is phase:
                lines.append((phase.value, "failed", self.failure.why))
                continue
            try:
                shown = evidence[phase]()
            except Exception as e:  # an artefact on disk that is not what it must be
                lines.append((phase.value, "failed", one_line(e)))
                continue
            if isinstance(shown, tuple):  # (status, why)
                lines.append((phase.value, *shown))
            else:
                lines.append((phase.value, "ok", shown) if shown else (phase.value, "not reached", ""))
        if self.failure and self.failure.phase is None:
            lines.append((label(None), "failed", self.failure.why))
        return lines

    def records(self) -> list[dict[str, Any]]:
        return self.run_dir.metrics()

    def shown_run_dir(self) -> str | None:
        files = (rundir.CONFIG, rundir.ENV)
        return f"{self.run_dir.path}: {', '.join(files)}" if all((self.run_dir / f).is_file() for f in files) else None

    def shown_net(self) -> str | None:
        # config.yaml is written once the net, optimiser and schedule are built (and resumed)
        if not (self.run_dir / rundir.CONFIG).is_file():
            return None
        t = self.cfg.train
        shown = f"{self.cfg.model.name}, {t.optimizer} optimiser and LR schedule built"
        if t.ema.decay:
            shown += f", EMA of the weights (decay {t.ema.decay:g})"
        if t.init_from:
            started = (self.run_dir.summary() or self.first_summary).get("init_from")
            if not started:
                return None
            shown += f"; weights from {started['file']} (sha256 {started['sha256'][:12]}, head {started['head']})"
        return shown

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
            raise PhaseFailed(Phase.STEPS, f"non-finite training loss: {losses}")
        t = self.cfg.train
        micro = f" in {t.accumulate} micro-batches" if t.accumulate > 1 else ""
        shown = f"{len(losses)} steps of {t.batch_size} images{micro}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        if t.clip_grad_norm:
            norms = [r["grad_norm"] for r in self.records() if "grad_norm" in r]
            if not norms:
                raise PhaseFailed(Phase.STEPS, "train.clip_grad_norm is on but no record holds a grad_norm")
            shown += f"; gradient norm {norms[0]:.3g} -> {norms[-1]:.3g} (clipped at {t.clip_grad_norm:g})"
        return shown

    def shown_records(self) -> str | None:
        records, backend = self.records(), self.cfg.tracking.backend
        offline = " (wandb offline for the smoke)" if "wandb" in backend else ""
        return f"{rundir.METRICS}: {len(records)} records; trackers {', '.join(backend)}{offline}" if records else None

    def shown_evaluation(self) -> str | None:
        evals = [r for r in self.records() if "test_accuracy" in r]
        if not evals:
            return None
        which = " (the moving average's weights: eval.ema)" if self.cfg.eval.ema else ""
        shown = f"{len(evals)} evaluations of {self.test_images} test images{which}, accuracy {evals[-1]['test_accuracy']:.1%}"
        stop = self.cfg.train.early_stop
        if stop.metric:
            summary = self.run_dir.summary() or {}
            ended = (f"stopped early: {summary['early_stop']['reason']}" if "early_stop" in summary
                     else "ran to the last epoch")
            shown += f"; early stop watched {stop.metric} (patience capped to {stop.patience}): {ended}"
        return shown

    def shown_checkpoint(self) -> str | None:
        kept = checkpoint.list_checkpoints(self.run_dir.path, verify=True)
        if not kept:
            return None
        steps = ", ".join(str(c.step) for c in kept)
        shown = f"steps {steps} kept (checkpoint.keep={self.cfg.checkpoint.keep}), each matching its sha256"
        if self.cfg.train.ema.decay:
            if not checkpoint.load_state(kept[-1].path / checkpoint.STATE).get("ema"):
                raise PhaseFailed(Phase.CHECKPOINT, f"train.ema is on but checkpoint {kept[-1].path} holds no average")
            shown += ", with the EMA weights"
        return shown

    def shown_resume(self) -> str | None:
        records, steps = self.records(), self.first_summary.get("steps", 0)
        if not self.first_summary or not any(r["step"] > steps for r in records):
            return None
        if not self.covered or records[: self.covered] != self.first[: self.covered]:
            raise PhaseFailed(Phase.RESUME, f"epoch 1's records were not kept: the run restarted instead of resuming at "
                                            f"step {steps}")
        return f"at step {steps}: epoch 2 went on from epoch 1's last checkpoint, keeping the {self.covered} records it covers"

    def shown_final(self) -> str | None:
        run = self.run_dir
        summary = run.summary()
        if summary is None:
            return None
        load_weights(run / rundir.MODEL)  # weights_only: what predict and evaluate will load
        missing = [name for name in (rundir.LOSS_PLOT, rundir.CLASS_PLOT) if not (run / name).is_file()]
        if missing:
            raise PhaseFailed(Phase.FINAL, f"{', '.join(missing)} missing")
        return (f"{rundir.SUMMARY} (test accuracy {summary['test_accuracy']:.1%}), {rundir.MODEL} (loads; "
                f"{summary['weights']} weights), {rundir.LOSS_PLOT}, {rundir.CLASS_PLOT}")


# ---------------------------------------------------------------------------- which phase a failure belongs to

# The code each phase runs: functions and methods (their code objects) and whole modules. A failure
# belongs to the phase of the innermost frame in its traceback that runs one of them. The objects
# themselves, never their names: a renamed function fails this module's import, it cannot misfile.
PHASE_CODE: dict[Phase, tuple[Callable[..., Any] | ModuleType, ...]] = {
    Phase.DATA: (data, sources, Smoke.load_data),  # images.py, image_folders.py: through sources.py's frames
    Phase.RUN_DIR: (run_opening,),
    Phase.NET: (train.build_state, recipe.make_net, recipe.make_optimizer, recipe.build_optimizer, recipe.EMA.__init__,
                finetune),
    Phase.COMPILE: (Loop.warm_up,),
    # the mean training loss is the steps' too
    Phase.STEPS: (Loop.step, Loop.train_record, recipe.Step.__call__, recipe.EMA.after),
    Phase.RECORDS: (trackers, console),
    Phase.EVALUATION: (exact_eval, Loop.evaluate, Loop.watch),
    Phase.CHECKPOINT: (Loop.save, checkpoint.save),
    Phase.RESUME: (resume,),
    Phase.FINAL: (train.finish_run, train.make_summary, sys.modules[train.write_plots.__module__]),
}
_BY_CODE: dict[CodeType, Phase] = {f.__code__: phase for phase, parts in PHASE_CODE.items()
                                   for f in parts if not isinstance(f, ModuleType)}
_BY_MODULE: dict[str, Phase] = {m.__name__: phase for phase, parts in PHASE_CODE.items()
                                for m in parts if isinstance(m, ModuleType)}


def phase_of(error: BaseException) -> Phase | None:
    """The phase `error` was raised in (PHASE_CODE), or None when it was raised in no phase's code."""
    if isinstance(error, PhaseFailed):
        return error.phase
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):  # innermost first
        phase = _BY_CODE.get(frame.f_code) or _BY_MODULE.get(frame.f_globals.get("__name__", ""))
        if phase:
            return phase
    return None


def label(phase: Phase | None) -> str:
    return phase.value if phase else "other"


def one_line(error: BaseException) -> str:
    """A user error's own message; anything else, its type and the first line of its message; at most 300 characters."""
    text = str(error) if isinstance(error, (UserError, PhaseFailed)) else \
        f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    return text if len(text) <= 300 else text[:297] + "..."

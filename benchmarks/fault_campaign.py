"""The fault campaign of issue #16, "nothing silent, nothing lost": seeded random faults at exact
moments of a tiny training run (real signals and kills, injected by tests/run_with_faults.py),
each run restarted until it finishes, then compared with the uninterrupted run.

    python benchmarks/fault_campaign.py --trials 120 --seed 0 [--kinds step eval ...] [--jobs 2]
    python benchmarks/fault_campaign.py --seed 0 --only 17       # rerun trial 17 of that campaign

A trial is identical when the final test_loss, confusion matrix and weights are bit-identical to the
reference run's (1 rank, or 2 gloo ranks for `rank_kill`) and metrics.jsonl equals the reference's
(wall-clock fields aside), so every step is recorded exactly once. Before each restart the valid
checkpoints are listed (marker present, sha256 matching): every `resumed from` must name one of
them, and every invalid one present must be named in a warning. The table goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, append_table, train_launcher  # noqa: E402

from cifar_dist import checkpoint  # noqa: E402
from cifar_dist.rundir import MODEL, RunDir, load_weights  # noqa: E402

KINDS = ("step", "eval", "checkpoint", "decode", "damaged", "rank_kill")
SIGNALS = ("KILL", "TERM", "USR1")
DAMAGES = ("flip", "truncate", "no_marker")
EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 20, 7  # 1,280 images / 64 per step; a checkpoint every 7 steps
TOTAL = EPOCHS * STEPS_PER_EPOCH
# Checkpoints are written every EVERY steps and after each (per-epoch) evaluation.
SAVE_STEPS = sorted({*range(EVERY, TOTAL + 1, EVERY), *range(STEPS_PER_EPOCH, TOTAL + 1, STEPS_PER_EPOCH)})
# conftest's TINY with per-epoch evaluation; the medium net has dropout, so every RNG state must come back.
CONFIG = ["model.name=medium", "data.source=synthetic", "data.synthetic_train=1280", "data.synthetic_test=300",
          f"train.epochs={EPOCHS}", "train.batch_size=64", "train.lr=0.05", "train.warmup_epochs=0.5",
          "train.log_every=3", f"checkpoint.every_steps={EVERY}", "eval.every=1", "seed=5", "run.progress=lines"]
FAULT_RUNNER = str(ROOT / "tests" / "run_with_faults.py")
MAX_RESTARTS = 3  # one fault per trial: a second restart would already be a finding
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)")
TIMING = ("time", "images_per_second")  # wall-clock fields, different in any two runs


@dataclass
class Fault:
    kind: str
    spec: str  # CIFAR_DIST_FAULT for tests/run_with_faults.py
    reached: int  # steps trained when it strikes: a kill loses those since the last checkpoint
    ranks: int = 1
    damage: str = ""  # kind `damaged`: how the newest checkpoint is damaged after the stop


@dataclass
class Trial:
    index: int
    fault: Fault
    exit_codes: list[int]  # the faulted attempt's, then each restart's
    redone: int  # steps trained twice
    problems: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.problems


def draw(kind: str, rng: random.Random) -> Fault:
    """The fault of one trial: its moment and signal drawn from `rng`."""
    sig = rng.choice(SIGNALS)
    if kind == "step":  # the signal lands while batch s is fetched: s steps are done
        s = rng.randrange(TOTAL)
        return Fault(kind, f"signal_at:{sig}:{s // STEPS_PER_EPOCH}:{s % STEPS_PER_EPOCH}", s)
    if kind == "eval":
        k = rng.randint(1, EPOCHS)
        return Fault(kind, f"signal_eval:{sig}:{k}", k * STEPS_PER_EPOCH)
    if kind == "checkpoint":
        step = rng.choice(SAVE_STEPS)
        return Fault(kind, f"signal_save:{sig}:{step}:{rng.choice(('before_rename', 'before_marker'))}", step)
    if kind == "decode":
        return Fault(kind, f"signal_decode:{sig}", 0)
    if kind == "damaged":  # stopped after step EVERY at least, so an older checkpoint exists to fall back on
        s = rng.randrange(EVERY, TOTAL - 1)
        return Fault(kind, f"signal_at:USR1:{s // STEPS_PER_EPOCH}:{s % STEPS_PER_EPOCH}", s + 1,
                     damage=rng.choice(DAMAGES))
    if kind == "rank_kill":
        s, rank = rng.randrange(TOTAL), rng.randrange(2)
        return Fault(kind, f"signal_at:KILL:{s // STEPS_PER_EPOCH}:{s % STEPS_PER_EPOCH}:{rank}", s, ranks=2)
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")


def campaign_env(cache: Path) -> dict[str, str]:
    """The trials' environment: a shared data cache, no tracker network, one thread per process (2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "CIFAR_DIST_FAULT" and k != "WANDB_API_KEY"}
    env.update(CIFAR_DIST_CACHE=str(cache), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    return env


def execute(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def command(ranks: int, faulted: bool) -> list[str]:
    if not faulted:
        return train_launcher(ranks)
    return [*train_launcher(ranks)[:-2], FAULT_RUNNER] if ranks > 1 else [PY, FAULT_RUNNER]


def reference(ranks: int, work: Path, env: dict[str, str]) -> Path:
    """The uninterrupted run on `ranks` ranks."""
    run_dir = work / f"reference_{ranks}"
    proc = execute([*command(ranks, False), *CONFIG, f"run.dir={run_dir}"], env)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run on {ranks} rank(s) exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return run_dir


def run_trial(index: int, seed: int, kinds: Sequence[str], work: Path, references: dict[int, Path],
              env: dict[str, str]) -> Trial:
    """Trial `index` of campaign `seed`: kinds in turn, the moment drawn from (seed, index)."""
    fault = draw(kinds[index % len(kinds)], random.Random(f"{seed}:{index}"))
    run_dir = work / f"trial_{index:04d}"
    args = [*CONFIG, f"run.dir={run_dir}"]
    if fault.kind == "decode":  # an empty cache of its own, so the data really is decoded
        env = {**env, "CIFAR_DIST_CACHE": str(work / f"cache_{index:04d}")}
    first = execute([*command(fault.ranks, True), *args], {**env, "CIFAR_DIST_FAULT": fault.spec})
    trial = Trial(index, fault, [first.returncode], 0)
    reached = fault.reached
    if fault.damage and (valid := checkpoint.list_checkpoints(run_dir)):
        reached = valid[-1].step
        damage(valid[-1].path, fault.damage)
    resumed_at: list[int] = []
    for _ in range(MAX_RESTARTS):
        if RunDir(run_dir).summary():
            break
        resumed_at += restart(run_dir, [*command(fault.ranks, False), *args], env, trial)
    else:
        trial.problems.append(f"not finished after {MAX_RESTARTS} restarts")
    if len(trial.exit_codes) > 1:  # restarted: what was trained since the checkpoint it resumed from is redone
        trial.redone = max(0, reached - (resumed_at[0] if resumed_at else 0))
    trial.problems += compare(references[fault.ranks], run_dir)
    return trial


def restart(run_dir: Path, cmd: list[str], env: dict[str, str], trial: Trial) -> list[int]:
    """One restart; checks what it says it resumed from and that it named every invalid checkpoint.
    The steps it resumed from."""
    valid = {str(c.path) for c in checkpoint.list_checkpoints(run_dir)}
    present = sorted(str(d) for d in checkpoint.checkpoint_dir(run_dir).glob("step_*"))
    proc = execute(cmd, env)
    trial.exit_codes.append(proc.returncode)
    out = proc.stdout + proc.stderr
    steps = []
    for path, step in RESUMED.findall(out):
        steps.append(int(step))
        if path not in valid:
            trial.problems.append(f"resumed from {path}, which had no valid marker")
    trial.problems += [f"invalid checkpoint {d} not named in a warning" for d in present
                       if d not in valid and f"warning: checkpoint {d} " not in out]
    if proc.returncode != 0:
        trial.problems.append(f"a restart exited {proc.returncode}: {out.strip().splitlines()[-1:]}")
    return steps


def damage(ckpt: Path, how: str) -> None:
    """Damage a checkpoint between runs, as a bad disk or a half-copied folder would."""
    state = ckpt / checkpoint.STATE
    if how == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif how == "truncate":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        (ckpt / checkpoint.MARKER).unlink()


def compare(ref: Path, run_dir: Path) -> list[str]:
    """How the finished run differs from the reference (nothing: identical)."""
    theirs, ours = RunDir(ref).summary(), RunDir(run_dir).summary()
    if ours is None:
        return ["no summary.json"]
    problems = [f"{key} differs" for key in ("test_loss", "confusion_matrix", "steps") if ours[key] != theirs[key]]
    wa, wb = (load_weights(d / MODEL)["state_dict"] for d in (ref, run_dir))
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        problems.append("final weights differ")
    counts = Counter(r["step"] for r in RunDir(run_dir).metrics() if "train_loss" in r)
    problems += [f"step {s} recorded {n} times" for s, n in sorted(counts.items()) if n != 1]
    strip = [[{k: v for k, v in r.items() if k not in TIMING} for r in RunDir(d).metrics()] for d in (ref, run_dir)]
    if strip[0] != strip[1]:
        problems.append("metrics.jsonl differs from the reference's")
    return problems


def campaign(indices: Sequence[int], seed: int, kinds: Sequence[str], work: Path, jobs: int = 1) -> list[Trial]:
    env = campaign_env(work / "cache")
    chosen = {kinds[i % len(kinds)] for i in indices}
    references = {ranks: reference(ranks, work, env) for ranks in sorted({2 if k == "rank_kill" else 1 for k in chosen})}
    def one(index: int) -> Trial:
        trial = run_trial(index, seed, kinds, work, references, env)
        # A line per trial as it ends: a long campaign shows its progress, and a failure its rerun.
        print(f"trial {index} {trial.fault.spec}{' ' + trial.fault.damage if trial.fault.damage else ''}: "
              f"exit codes {trial.exit_codes}, {trial.redone} steps redone, "
              f"{'identical' if trial.identical else '; '.join(trial.problems)}", flush=True)
        return trial

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, indices))


def table(trials: list[Trial]) -> tuple[list[str], list[list[str]]]:
    header = ["kind", "trials", "identical", "steps redone (median, max)", "exit codes of the faulted run"]
    rows = []
    for kind in dict.fromkeys(t.fault.kind for t in trials):
        mine = [t for t in trials if t.fault.kind == kind]
        redone = [t.redone for t in mine]
        codes = Counter(t.exit_codes[0] for t in mine)
        rows.append([kind, str(len(mine)), str(sum(t.identical for t in mine)),
                     f"{statistics.median(redone):g}, {max(redone)}",
                     ", ".join(f"{describe(c)} x{n}" for c, n in sorted(codes.items()))])
    rows.append(["all", str(len(trials)), str(sum(t.identical for t in trials)), "", ""])
    return header, rows


def describe(code: int) -> str:
    """An exit code as subprocess reports it: negative for a process killed by a signal."""
    return f"{code} ({signal.Signals(-code).name})" if code < 0 else str(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--only", type=int, nargs="+", help="rerun these trials of the campaign (no table appended)")
    parser.add_argument("--jobs", type=int, default=1, help="trials at a time")
    parser.add_argument("--work", type=Path, help="keep the run dirs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    indices = args.only or list(range(args.trials))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trials = campaign(indices, args.seed, args.kinds, work, args.jobs)
    minutes = (time.monotonic() - start) / 60
    for t in trials:
        if not t.identical:
            print(f"trial {t.index} not identical; rerun: --seed {args.seed} --kinds {' '.join(args.kinds)} --only {t.index}")
    header, rows = table(trials)
    if args.only:
        print("\n".join(" | ".join(r) for r in [header, *rows]))
    else:
        notes = [f"`python benchmarks/fault_campaign.py --trials {args.trials} --seed {args.seed} --kinds "
                 f"{' '.join(args.kinds)} --jobs {args.jobs}`: {minutes:.0f} min",
                 f"config: {' '.join(CONFIG)} ({TOTAL} steps)",
                 "identical: bit-identical test_loss, confusion matrix and weights, metrics.jsonl equal to the "
                 "uninterrupted run's (every step once), every resume from a checkpoint valid at that moment, "
                 "every invalid one named in a warning",
                 f"not identical: {', '.join(str(t.index) for t in trials if not t.identical) or 'none'}"]
        append_table("Fault campaign (#16): seeded faults at random moments, restarted until done", notes, header, rows)
    return 0 if all(t.identical for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())

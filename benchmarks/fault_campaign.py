"""The fault campaign of issue #16, "nothing silent, nothing lost": seeded random faults at exact
moments of a tiny training run (real signals and kills, injected by tests/helpers/run_with_faults.py),
each run restarted until it finishes, then compared with the uninterrupted run.

    python benchmarks/fault_campaign.py --trials 120 --seed 0 [--kinds step eval ...] [--jobs 2] [--slurm]
    python benchmarks/fault_campaign.py --trials 30 --seed 0 --kinds run_dir_removed disk_full no_permission
    python benchmarks/fault_campaign.py --seed 0 --only 17       # rerun trial 17 of that campaign

--search adds the search kinds (search_faults.py, as root): a two-trial study whose workers'
clocks disagree (clock_skew), or whose journal cannot be written for seconds (journal_errors).

The storage kinds (as root) take the run's files away from it at a drawn step: `run_dir_removed`
deletes the run dir (and half the time makes it again, empty: replaced); `disk_full` fills the
small tmpfs the run dir lives on (`mount -t tmpfs`, one per trial); `no_permission` makes the run
dir and its checkpoints folder read-only while the run trains without root's right to override
that (`setpriv --bounding-set -dac_override`). The faulted run must stop with exit 2, one `error:`
line naming the cause and no traceback, leaving no temporary file; then the fault is undone (the
filler deleted, the permissions given back; a removed run dir stays removed) and the same command
run until it finishes identical to the uninterrupted run.

--slurm adds the kinds that need the dev cluster (slurm/dev-cluster.sh, started and stopped here,
as root): a one-point sweep on it is pre-empted (`scancel --signal=USR2`, Slurm's time-limit and
pre-emption signal), requeued by an administrator (`scontrol requeue`), or cancelled (`cifar-dist
sweep cancel`, then `resubmit --failed`) once it has trained a drawn number of steps, and driven
to the end.

A trial is identical when the final test_loss, confusion matrix and weights are bit-identical to the
reference run's (1 rank, or 2 gloo ranks for `rank_kill`; a plain run of the sweep point's
config for the Slurm kinds) and metrics.jsonl equals the reference's
(wall-clock fields aside), so every step is recorded exactly once. Before each restart the valid
checkpoints are listed (marker present, sha256 matching): every `resumed from` must name one of
them, and every invalid one present must be named in a warning. The table goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_faults  # noqa: E402
from common import PY, ROOT, append_table, train_launcher  # noqa: E402
from search_faults import SEARCH_KINDS  # noqa: E402

from cifar_dist import checkpoint  # noqa: E402
from cifar_dist.rundir import MODEL, RunDir, load_weights  # noqa: E402
from cifar_dist.sweep.record import load_record  # noqa: E402

KINDS = ("step", "eval", "checkpoint", "decode", "damaged", "rank_kill")
SLURM_KINDS = ("slurm_preempt", "slurm_requeue", "slurm_cancel")  # --slurm: a sweep point on the dev cluster
STORAGE_KINDS = ("run_dir_removed", "disk_full", "no_permission")  # as root: the run's files taken away from it
# What the one `error:` line of a storage kind's faulted run must say.
REFUSALS = {"run_dir_removed": "was removed or replaced while the run was writing in it",
            "disk_full": "(No space left on device)", "no_permission": "(Permission denied)"}
TMPFS_SIZE = "24m"  # disk_full: the run dir's file system; the run needs ~6 MB (3 checkpoints of 1.3 MB, model.pt, plots)
NO_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]  # root, but bound by file permissions
SIGNALS = ("KILL", "TERM", "USR1")
DAMAGES = ("flip", "truncate", "no_marker")
EPOCHS, STEPS_PER_EPOCH, EVERY = 2, 20, 7  # 1,280 images / 64 per step; a checkpoint every 7 steps
TOTAL = EPOCHS * STEPS_PER_EPOCH
# Checkpoints are written every EVERY steps and after each (per-epoch) evaluation.
SAVE_STEPS = sorted({*range(EVERY, TOTAL + 1, EVERY), *range(STEPS_PER_EPOCH, TOTAL + 1, STEPS_PER_EPOCH)})
# The tests' TINY (tests/helpers) with per-epoch evaluation; the medium net has dropout, so every RNG state must come back.
CONFIG = ["model.name=medium", "data.source=synthetic", "data.synthetic_train=1280", "data.synthetic_test=300",
          f"train.epochs={EPOCHS}", "train.batch_size=64", "train.lr=0.05", "train.warmup_epochs=0.5",
          "train.log_every=3", f"checkpoint.every_steps={EVERY}", "eval.every=1", "seed=5", "run.progress=lines"]
# A sweep point on the dev cluster trains 30 epochs (600 steps, ~20 s): a job takes seconds to
# start, and a Slurm command seconds to land, so the drawn step is where it is sent, not where it lands.
SLURM_EPOCHS = 30
SLURM_CONFIG = ["--config", "debug", *[c for c in CONFIG if not c.startswith("train.epochs=")],
                f"train.epochs={SLURM_EPOCHS}"]
SLURM_CONF = Path(os.environ.get("CIFAR_DIST_SLURM_DIR", "/tmp/cifar-dist-slurm")) / "slurm.conf"
CLUSTER_LOCK = "/tmp/cifar-dist-slurm-tests.lock"  # the tests' (tests/helpers/slurm.py): one dev cluster a machine
SWEEP = [PY, "-m", "cifar_dist.cli", "sweep"]
FAULT_RUNNER = str(ROOT / "tests" / "helpers" / "run_with_faults.py")
MAX_RESTARTS = 3  # one fault per trial: a second restart would already be a finding
RESUMED = re.compile(r"resumed from (\S+) \(step (\d+)")
TIMING = ("time", "images_per_second")  # wall-clock fields, different in any two runs


@dataclass
class Fault:
    kind: str
    spec: str  # CIFAR_DIST_FAULT for tests/helpers/run_with_faults.py
    reached: int  # steps trained when it strikes: a kill loses those since the last checkpoint
    ranks: int = 1
    damage: str = ""  # kind `damaged`: how the newest checkpoint is damaged after the stop


@dataclass
class Trial:
    index: int
    fault: Fault
    exit_codes: list[int | str]  # the faulted attempt's, then each restart's (Slurm kinds: the point's states)
    redone: int  # steps trained twice
    problems: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.problems


def draw(kind: str, rng: random.Random) -> Fault:
    """The fault of one trial: its moment and signal drawn from `rng`."""
    if kind in SEARCH_KINDS:  # drawn first: run_trial draws the same again from a fresh `rng`
        f = search_faults.draw(kind, rng, TOTAL)
        return Fault(kind, f.spec, f.reached)
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
    if kind in STORAGE_KINDS:  # while batch s is fetched: s steps done, the last checkpoint before them kept
        s = rng.randrange(TOTAL)
        at = f"{s // STEPS_PER_EPOCH}:{s % STEPS_PER_EPOCH}"
        spec = {"run_dir_removed": f"remove_dir:{at}" + rng.choice(("", ":replace")),
                "disk_full": f"fill_disk:{at}:FILLER", "no_permission": f"deny_writes:{at}"}[kind]
        return Fault(kind, spec, s)
    if kind in SLURM_KINDS:  # sent once the point has trained s steps, in its first 80%
        s = rng.randrange(10, SLURM_EPOCHS * STEPS_PER_EPOCH * 4 // 5)
        return Fault(kind, f"{kind.removeprefix('slurm_')} after step {s}", s)
    raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS + SLURM_KINDS + SEARCH_KINDS + STORAGE_KINDS)}")


def reference_key(kind: str) -> str:  # STORAGE_KINDS: the plain run's
    return "slurm" if kind in SLURM_KINDS else "search" if kind in SEARCH_KINDS else "2" if kind == "rank_kill" else "1"


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


def reference(key: str, work: Path, env: dict[str, str]) -> Path:
    """The uninterrupted run: on 1 or 2 ranks, or of the Slurm kinds' config on 1."""
    if key == "search":
        return search_faults.references(work, CONFIG, lambda cmd: execute(cmd, env), command(1, False))
    run_dir = work / f"reference_{key}"
    config = SLURM_CONFIG if key == "slurm" else CONFIG
    proc = execute([*command(2 if key == "2" else 1, False), *config, f"run.dir={run_dir}"], env)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run {key} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return run_dir


def run_trial(index: int, seed: int, kinds: Sequence[str], work: Path, references: dict[str, Path],
              env: dict[str, str]) -> Trial:
    """Trial `index` of campaign `seed`: kinds in turn, the moment drawn from (seed, index)."""
    fault = draw(kinds[index % len(kinds)], random.Random(f"{seed}:{index}"))
    if fault.kind in SLURM_KINDS:
        return run_slurm_trial(index, fault, work, references["slurm"], env)
    if fault.kind in SEARCH_KINDS:
        drawn = search_faults.draw(fault.kind, random.Random(f"{seed}:{index}"), TOTAL)
        happened, redone, problems = search_faults.run_study(index, drawn, work, CONFIG, references["search"], env,
                                                             SWEEP, compare)
        return Trial(index, fault, happened, redone, problems)
    run_dir = work / f"trial_{index:04d}"
    args = [*CONFIG, f"run.dir={run_dir}"]
    if fault.kind == "decode":  # an empty cache of its own, so the data really is decoded
        env = {**env, "CIFAR_DIST_CACHE": str(work / f"cache_{index:04d}")}
    if fault.kind in STORAGE_KINDS:
        return run_storage_trial(index, fault, work, references["1"], env)
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
    trial.problems += compare(references[reference_key(fault.kind)], run_dir)
    return trial


def run_storage_trial(index: int, fault: Fault, work: Path, reference: Path, env: dict[str, str]) -> Trial:
    """The run's files taken away at a drawn step (STORAGE_KINDS); the faulted run must refuse in
    one line, leaving nothing half-written; with the fault undone, restarts must end identical."""
    with storage(fault.kind, work / f"trial_{index:04d}") as root:
        run_dir, filler = root / "run", root / "filler"
        args = [*CONFIG, f"run.dir={run_dir}"]
        cmd = [*NO_OVERRIDE, *command(1, True)] if fault.kind == "no_permission" else command(1, True)
        first = execute([*cmd, *args], {**env, "CIFAR_DIST_FAULT": fault.spec.replace("FILLER", str(filler))})
        trial = Trial(index, fault, [first.returncode], 0)
        trial.problems += refusal_problems(fault.kind, first, run_dir)
        filler.unlink(missing_ok=True)  # the fault undone: space freed, permissions given back
        for d in (run_dir, run_dir / checkpoint.CHECKPOINTS):
            if d.is_dir():
                d.chmod(0o755)
        resumed_at: list[int] = []
        for _ in range(MAX_RESTARTS):
            if RunDir(run_dir).summary():
                break
            resumed_at += restart(run_dir, [*command(1, False), *args], env, trial)
        else:
            trial.problems.append(f"not finished after {MAX_RESTARTS} restarts")
        trial.redone = max(0, fault.reached - (resumed_at[0] if resumed_at else 0))
        trial.problems += compare(reference, run_dir)
    return trial


@contextlib.contextmanager
def storage(kind: str, root: Path) -> Iterator[Path]:
    """The folder a storage trial's run dir goes in: for `disk_full`, a tmpfs of its own, unmounted after."""
    root.mkdir(parents=True)
    if kind != "disk_full":
        yield root
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(root)], check=True,
                   capture_output=True, timeout=60)
    try:
        yield root
    finally:
        subprocess.run(["umount", str(root)], check=True, capture_output=True, timeout=60)


def refusal_problems(kind: str, proc: subprocess.CompletedProcess, run_dir: Path) -> list[str]:
    """How the faulted run of a storage kind failed to refuse in one line, leaving nothing half-written."""
    problems = []
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 2:
        problems.append(f"the faulted run exited {proc.returncode}, not 2")
    if "Traceback" in proc.stderr:
        problems.append("a traceback: " + " | ".join(lines[-2:])[-300:])
    if not lines or not lines[-1].startswith("error:") or REFUSALS[kind] not in lines[-1]:
        problems.append(f"its last line is not the refusal: {lines[-1:]}")
    leftovers = [str(p) for p in run_dir.rglob(".*tmp*")] if run_dir.is_dir() else []
    problems += [f"left behind: {p}" for p in leftovers]
    if kind == "run_dir_removed" and run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        problems.append(f"wrote into the replaced run dir: {sorted(p.name for p in run_dir.iterdir())}")
    return problems


def run_slurm_trial(index: int, fault: Fault, work: Path, reference: Path, env: dict[str, str]) -> Trial:
    """A one-point sweep on the dev cluster, stopped the way `fault.kind` says once it has trained
    `fault.reached` steps, then driven to the end as a user would: a requeued job started (rather
    than after Slurm's two-minute hold), a cancelled point resubmitted."""
    sweep_dir, spec = work / f"trial_{index:04d}", work / f"trial_{index:04d}.yaml"
    overrides = {k: yaml.safe_load(v) for k, v in (c.split("=", 1) for c in SLURM_CONFIG[2:])}
    spec.write_text(yaml.safe_dump({"name": f"fault-{index}", "cluster": "local", "base": "debug",
                                    "overrides": overrides, "resources": {"time_min": 30}}))
    trial = Trial(index, fault, [], 0)
    run_dir = sweep_dir / "runs" / "000"
    if (proc := execute([*SWEEP, str(spec), "--sweep-dir", str(sweep_dir)], env)).returncode != 0:
        trial.problems.append(f"submit exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return trial
    job = load_record(sweep_dir).points[0].job_id
    if not poll(lambda: newest_step(run_dir) >= fault.reached or RunDir(run_dir).summary(), 300):
        trial.problems.append(f"never reached step {fault.reached}")
    if fault.kind == "slurm_preempt":
        slurm(["scancel", "--signal=USR2", job], env)
    elif fault.kind == "slurm_requeue":
        slurm(["scontrol", "requeue", job], env)
    else:
        execute([*SWEEP, "cancel", str(sweep_dir)], env)
    # Stopped: the job leaves RUNNING; its checkpoint at the stop is then the newest valid one.
    poll(lambda: job_state(job, env) != "RUNNING", 120)
    poll(lambda: point_state(sweep_dir, env) not in ("running", "unknown"), 60)
    stopped_at = newest_step(run_dir)
    trial.exit_codes.append(point_state(sweep_dir, env))
    valid = {str(c.path) for c in checkpoint.list_checkpoints(run_dir)}
    if fault.kind == "slurm_cancel":
        resubmitted = execute([*SWEEP, "resubmit", str(sweep_dir), "--failed"], env)
        trial.exit_codes.append(f"resubmit {resubmitted.returncode}")
    else:  # requeued: start it now (Slurm re-holds it while it completes: keep asking), or requeue it again
        def started() -> bool:
            state = job_state(job, env)
            if state == "PENDING":
                slurm(["scontrol", "update", f"JobId={job}", "StartTime=now"], env)
            elif state in ("FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL"):
                slurm(["scontrol", "requeue", job], env)
            return state == "RUNNING" or bool(RunDir(run_dir).summary())
        poll(started, 300, every=1)
    waited = execute([*SWEEP, "wait", str(sweep_dir), "--poll", "1", "--timeout", "400"], env)
    trial.exit_codes.append(point_state(sweep_dir, env))
    if waited.returncode != 0:
        trial.problems.append(f"wait exited {waited.returncode}: {waited.stderr.strip()[-300:]}")
    logs = "".join(f.read_text(errors="replace") for f in sorted((sweep_dir / "submitit").glob("*_log.*")))
    resumed = RESUMED.findall(logs)
    trial.problems += [f"resumed from {path}, which had no valid marker" for path, _ in resumed if path not in valid]
    if not resumed and stopped_at < SLURM_EPOCHS * STEPS_PER_EPOCH:
        trial.problems.append(f"stopped at step {stopped_at}, never resumed")
    trial.redone = max(0, stopped_at - int(resumed[0][1])) if resumed else 0
    trial.problems += compare(reference, run_dir)
    return trial


def slurm(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """A Slurm command on the dev cluster; its answer is not checked: the job may have moved on."""
    return subprocess.run(cmd, env={**env, "SLURM_CONF": str(SLURM_CONF)}, capture_output=True, text=True, timeout=60)


def job_state(job: str, env: dict[str, str]) -> str:
    out = slurm(["scontrol", "show", "job", "-o", job], env).stdout
    return next((f.split("=", 1)[1] for f in out.split() if f.startswith("JobState=")), "UNKNOWN")


def point_state(sweep_dir: Path, env: dict[str, str]) -> str:
    proc = execute([*SWEEP, "status", str(sweep_dir), "--json"], env)
    return json.loads(proc.stdout)[0]["state"] if proc.returncode == 0 else "unknown"


def newest_step(run_dir: Path) -> int:
    return max((r.get("step", 0) for r in RunDir(run_dir).metrics()), default=0)


def poll(done, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


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
    references = {key: reference(key, work, env) for key in sorted({reference_key(k) for k in chosen})}
    def one(index: int) -> Trial:
        trial = run_trial(index, seed, kinds, work, references, env)
        # A line per trial as it ends: a long campaign shows its progress, and a failure its rerun.
        print(f"trial {index} {trial.fault.spec}{' ' + trial.fault.damage if trial.fault.damage else ''}: "
              f"exit codes {trial.exit_codes}, {trial.redone} steps redone, "
              f"{'identical' if trial.identical else '; '.join(trial.problems)}", flush=True)
        return trial

    with dev_cluster(any(k in SLURM_KINDS for k in chosen)), ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, indices))


@contextlib.contextmanager
def dev_cluster(needed: bool) -> Iterator[None]:
    """The dev cluster up for the Slurm kinds, taken down after; the tests' lock held throughout."""
    if not needed:
        yield
        return
    script = ["bash", str(ROOT / "slurm" / "dev-cluster.sh")]
    with open(CLUSTER_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([*script, "up"], check=True, capture_output=True, timeout=180)
        try:
            yield
        finally:
            subprocess.run([*script, "down"], check=True, capture_output=True, timeout=180)


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


def describe(code: int | str) -> str:
    """An exit code as subprocess reports it: negative for a process killed by a signal (a Slurm
    kind's: the point's state)."""
    return f"{code} ({signal.Signals(-code).name})" if isinstance(code, int) and code < 0 else str(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS + SLURM_KINDS + SEARCH_KINDS + STORAGE_KINDS,
                        default=list(KINDS))
    parser.add_argument("--slurm", action="store_true", help=f"add {', '.join(SLURM_KINDS)} (the dev cluster, as root)")
    parser.add_argument("--search", action="store_true", help=f"add {', '.join(SEARCH_KINDS)} (studies, as root)")
    parser.add_argument("--only", type=int, nargs="+", help="rerun these trials of the campaign (no table appended)")
    parser.add_argument("--jobs", type=int, default=1, help="trials at a time")
    parser.add_argument("--work", type=Path, help="keep the run dirs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.slurm:
        args.kinds += [k for k in SLURM_KINDS if k not in args.kinds]
    if args.search:
        args.kinds += [k for k in SEARCH_KINDS if k not in args.kinds]
    if set(args.kinds) & set(STORAGE_KINDS) and os.geteuid() != 0:
        parser.error(f"{', '.join(STORAGE_KINDS)} mount a tmpfs and drop root's rights: run as root")
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
                 *([f"Slurm kinds: a one-point sweep on the dev cluster (`cluster: local`) of {' '.join(SLURM_CONFIG)} "
                    f"({SLURM_EPOCHS * STEPS_PER_EPOCH} steps); their 'exit codes' are the point's state after the stop"]
                   if any(k in SLURM_KINDS for k in args.kinds) else []),
                 *([f"search kinds: a two-trial study on the local executor (grid over train.lr {search_faults.LRS}, no "
                    f"pruner, heartbeat_s {search_faults.HEARTBEAT_S}, grace_s {search_faults.GRACE_S}) of the same "
                    "config; identical: every trial complete, none failed or retried, `wait` 0, each trial bit-identical "
                    "to a plain run of its config; their 'exit codes' say what happened"]
                   if any(k in SEARCH_KINDS for k in args.kinds) else []),
                 "identical: bit-identical test_loss, confusion matrix and weights, metrics.jsonl equal to the "
                 "uninterrupted run's (every step once), every resume from a checkpoint valid at that moment, "
                 "every invalid one named in a warning",
                 f"not identical: {', '.join(str(t.index) for t in trials if not t.identical) or 'none'}"]
        append_table("Fault campaign (#16): seeded faults at random moments, restarted until done", notes, header, rows)
    return 0 if all(t.identical for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())

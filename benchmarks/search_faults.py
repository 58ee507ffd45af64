"""The fault campaign's search kinds (fault_campaign.py --search): a two-trial study on the local
executor (two real worker processes, one journal; grid sampler over train.lr, no pruner), hit by
- `clock_skew`: one worker's wall clock off by a drawn amount (a minute to a day, either way; every
  wall-clock read of its process, through tests/helpers/skewed_clock), the other's true, the second
  worker joining once the study has trained a drawn number of steps;
- `journal_errors`: the journal file read-only (a bind mount: EROFS for every writer, root too) for
  a drawn 1-8 s, from a drawn step on, while both workers train.
grace_s is 20 s with a heartbeat every second: a wall-clock judgement of staleness would fail live
trials under every skew drawn, and a heartbeat that died on a write error would lose its trial.
A trial is identical when every trial of the study completed, none failed or was retried, `wait`
exited 0, and each trial's run is bit-identical to a plain run of its config (`compare`).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from cifar_dist.rundir import RunDir

SEARCH_KINDS = ("clock_skew", "journal_errors")
LRS = (0.05, 0.1)  # the grid: one trial each
SKEWS_S = (-86400, -3600, -900, -60, 60, 900, 3600, 86400)
GRACE_S, HEARTBEAT_S = 20, 1
SKEWED_CLOCK = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "skewed_clock"


@dataclass
class SearchFault:
    kind: str
    reached: int  # steps the study has trained (both trials together) when it strikes
    skew_s: int = 0  # clock_skew: the skewed worker's clock minus the true time
    skewed: str = ""  # clock_skew: "first" (submitted) or "joining" (added by resubmit --workers 1)
    length_s: float = 0.0  # journal_errors: how long the journal stays read-only

    @property
    def spec(self) -> str:
        if self.kind == "clock_skew":
            return f"clock_skew:{self.skewed} worker {self.skew_s:+d} s, second worker after step {self.reached}"
        return f"journal_errors:read-only {self.length_s:.1f} s from step {self.reached}"


def draw(kind: str, rng: random.Random, total_steps: int) -> SearchFault:
    reached = rng.randrange(2 * total_steps * 3 // 4)
    if kind == "clock_skew":
        return SearchFault(kind, reached, skew_s=rng.choice(SKEWS_S), skewed=rng.choice(("first", "joining")))
    return SearchFault(kind, reached, length_s=round(rng.uniform(1, 8), 1))


def references(work: Path, config: list[str], run: Callable[[list[str]], subprocess.CompletedProcess],
               launcher: list[str]) -> Path:
    """Plain runs of the study's trials' configs (`--config debug` + the campaign's, each lr): their folder."""
    folder = work / "reference_search"
    for lr in LRS:
        proc = run([*launcher, "--config", "debug", *config, f"train.lr={lr}", f"run.dir={folder / f'lr_{lr}'}"])
        if proc.returncode != 0:
            raise RuntimeError(f"the reference run lr={lr} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return folder


def run_study(index: int, fault: SearchFault, work: Path, config: list[str], refs: Path, env: dict[str, str],
              sweep: list[str], compare: Callable[[Path, Path], list[str]]) -> tuple[list[str], int, list[str]]:
    """One trial of a search kind: (what happened, steps trained twice, problems)."""
    sweep_dir, spec = work / f"trial_{index:04d}", work / f"trial_{index:04d}.yaml"
    overrides = {k: yaml.safe_load(v) for k, v in (c.split("=", 1) for c in config)}
    spec.write_text(yaml.safe_dump({
        "name": f"fault-{index}", "cluster": "local", "base": "debug", "overrides": overrides,
        "search": {"trials": len(LRS), "workers": 1 if fault.kind == "clock_skew" else 2, "sampler": "grid",
                   "pruner": "none", "params": {"train.lr": {"choice": list(LRS)}}, "heartbeat_s": HEARTBEAT_S,
                   "grace_s": GRACE_S},
        "resources": {"time_min": 30}}))
    skewed = {**env, "PYTHONPATH": str(SKEWED_CLOCK), "CIFAR_DIST_TEST_CLOCK_SKEW_S": str(fault.skew_s)}

    def command(args: list[str], e: dict[str, str] = env) -> subprocess.CompletedProcess:
        return subprocess.run([*sweep, *args], env=e, capture_output=True, text=True, timeout=900)

    happened, problems = [], []
    first = command([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)],
                    skewed if fault.skewed == "first" else env)
    if first.returncode != 0:
        return [f"submit {first.returncode}"], 0, [f"submit exited {first.returncode}: {first.stderr.strip()[-300:]}"]
    if not _poll(lambda: _steps(sweep_dir) >= fault.reached, 600):
        problems.append(f"never reached step {fault.reached}")
    if fault.kind == "clock_skew":
        joined = command(["resubmit", str(sweep_dir), "--workers", "1"], skewed if fault.skewed == "joining" else env)
        happened.append(f"resubmit {joined.returncode}")
    else:
        happened.append(_read_only(sweep_dir / "study.journal", fault.length_s))
    waited = command(["wait", str(sweep_dir), "--poll", "1", "--timeout", "600"])
    happened.append(f"wait {waited.returncode}")
    if waited.returncode != 0:
        problems.append(f"wait exited {waited.returncode}: {waited.stderr.strip()[-300:]}")
    shown = command(["status", str(sweep_dir), "--json"])
    if shown.returncode != 0:
        return happened, 0, [*problems, f"status exited {shown.returncode}: {shown.stderr.strip()[-300:]}"]
    table = json.loads(shown.stdout)
    logs = "".join(f.read_text(errors="replace") for f in sorted((sweep_dir / "submitit").glob("*_log.*")))
    if fault.kind == "journal_errors":
        happened.append("writes refused and retried" if "cannot write (Read-only file system)" in logs
                        else "no write in the window")
    states = [t["state"] for t in table["trials"]]
    happened.append(" ".join(states))
    if states != ["complete"] * len(LRS):
        problems.append(f"trials ended {states}: {[t['note'] for t in table['trials'] if t['note']]}")
    if (workers := [w["state"] for w in table["workers"]]) != ["done"] * len(workers):
        problems.append(f"workers ended {workers}")
    redone = sum(_steps_of(sweep_dir / "runs" / t["trial"]) for t in table["trials"] if t["state"] == "fail")
    for t in table["trials"]:
        if t["state"] == "complete":
            lr = yaml.safe_load((sweep_dir / "runs" / t["trial"] / "config.yaml").read_text())["train"]["lr"]
            problems += [f"trial {t['trial']}: {p}" for p in compare(refs / f"lr_{lr}", sweep_dir / "runs" / t["trial"])]
    return happened, redone, problems


def _read_only(journal: Path, length_s: float) -> str:
    """The journal file read-only for `length_s` (a read-only bind mount of it over itself)."""
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(journal), str(journal)], capture_output=True, text=True,
                             timeout=30)
    if mounted.returncode != 0:
        raise RuntimeError(f"mount --bind -o ro {journal}: {mounted.stderr.strip()}")
    try:
        time.sleep(length_s)
    finally:
        subprocess.run(["umount", "--lazy", str(journal)], check=True, timeout=30)
    return f"read-only {length_s:g} s"


def _steps(sweep_dir: Path) -> int:
    runs = sweep_dir / "runs"
    return sum(_steps_of(d) for d in runs.iterdir()) if runs.is_dir() else 0


def _steps_of(run_dir: Path) -> int:
    return max((r.get("step", 0) for r in RunDir(run_dir).metrics()), default=0)


def _poll(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True

"""Studies for the search tests, with and without a cluster: a spec with a range whose ends are
hopeless, sampler seeds whose draws make the pruning certain, and the sweep command run in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

import psutil
import yaml

from cifar_dist.rundir import read_json
from cifar_dist.sweep import commands
from tests.helpers.slurm import TINY_OVERRIDES, newest_step

STEPS_PER_EPOCH = 20  # TINY: 1,280 synthetic images in steps of 64
# A range with hopeless ends: 1e-4 barely moves in a few epochs; 0.5 is too high for this tiny run.
HOPELESS_LR = {"train.lr": {"loguniform": ["1e-4", 0.5]}}
# The random sampler's draws from HOPELESS_LR for trials 0, 1, 2, 3 (worker.py seeds each ask with
# seed * 100003 + its number). Seed 10: 0.073, 0.089, 0.0035, 0.00011: trials 2 and 3 start only
# once trial 0 or 1 has ended an epoch, so their first evaluation, far worse, meets a better one at
# ASHA's rung and is pruned; the first trial evaluated at the rung is never pruned and completes.
GOOD_THEN_HOPELESS = 10
# Seed 11: 0.009, then 0.00014: one worker trains trial 0 to the end and trial 1 is pruned.
ONE_THEN_HOPELESS = 11


def search_spec(path: Path, name: str, search: dict, overrides: dict | None = None, **top) -> Path:
    search = {k: v for k, v in {"trials": 4, "params": HOPELESS_LR, **search}.items() if v is not None}  # None: left out
    spec = {"name": name, "cluster": "local", "base": "debug", "overrides": {**TINY_OVERRIDES, **(overrides or {})},
            "search": search,
            "resources": {"time_min": 10, "signal_delay_s": 30}, **top}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_command(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python jobs/submit.py ARGS` in this process, with `env` as its environment (restored after):
    the same code as the command, without an interpreter and torch start-up each time (seconds
    each). The first submit of each study runs the real command instead."""
    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = commands.main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def succeeded(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = sweep_command(args, env)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(sweep_dir: Path, env: dict) -> dict:
    return json.loads(succeeded(["status", str(sweep_dir), "--json"], env).stdout)


def trial_in_training(sweep_dir: Path, worker: str, steps: int) -> str | None:
    """The worker's current trial ("000", ...) once it has trained at least `steps` steps of it."""
    current = (read_json(sweep_dir / "workers" / worker / "current.json") or {}).get("trial")
    if current is None:
        return None
    name = f"{current:03d}"
    return name if newest_step(sweep_dir / "runs" / name) >= steps else None


def local_task_pid(job_id: str) -> int:
    """The task process of a local executor's job (its job id is the pid of the controller that started it)."""
    [task] = [p for p in psutil.Process(int(job_id)).children() if "submitit.core._submit" in p.cmdline()]
    return task.pid

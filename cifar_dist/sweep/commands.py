"""Slurm sweeps: spec -> validated points -> one submitit job array -> exit.

    python jobs/submit.py SPEC.yaml [--dry-run] [--cluster auto|slurm|local|debug] [--sweep-dir DIR] [--max-points N]
    python jobs/submit.py status SWEEP_DIR [--json]
    python jobs/submit.py wait SWEEP_DIR [--timeout S] [--poll S]
    python jobs/submit.py cancel SWEEP_DIR
    python jobs/submit.py resubmit SWEEP_DIR --failed

The spec's `cluster:` names a cluster *profile* (slurm/clusters/<name>.yaml: partitions, node
sizes, module loads, task environment). `--cluster` picks the submitit *executor*: `slurm`
(sbatch), `local` (processes on this machine, no Slurm), `debug` (in this process, one point
after another), or `auto` (default): Slurm when sbatch and srun are on PATH, else local.

Exit codes: 0 done; 1 the scheduler failed (or `wait`: some point did not finish); 2 a mistake
in the spec or the command line, reported in one line before anything is submitted or written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from submitit.local.debug import DebugExecutor, DebugJob
from submitit.local.local import LocalExecutor
from submitit.slurm.slurm import SlurmExecutor

from cifar_dist.sweep.profiles import ClusterError, Profile, apply_submit_environment, load_profile
from cifar_dist.sweep.record import (
    ACTIVE,
    RESUBMITTABLE,
    format_table,
    load_record,
    mark_cancelled,
    point_states,
    save_record,
    status_table,
    submitit_folder,
)
from cifar_dist.sweep.spec import MAX_POINTS, Point, Resources, Spec, check_fits, load_spec, make_points
from cifar_dist.sweep.strict import SpecError
from cifar_dist.sweep.task import TrainTask

EXECUTORS = ("auto", "slurm", "local", "debug")
COMMANDS = ("status", "wait", "cancel", "resubmit")
# Variables a job must not inherit from the shell it is submitted from: a sweep submitted from
# inside another job would otherwise join that job's allocation or process group.
INHERITED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class SubmitError(ClusterError):
    """The scheduler refused or failed; nothing of this submission is left behind."""


# ---------------------------------------------------------------------------- executors


def choose_executor(flag: str) -> tuple[str, str]:
    """(executor, a one-line note when it was chosen for lack of Slurm)."""
    if flag != "auto":
        return flag, ""
    if shutil.which("sbatch") and shutil.which("srun"):
        return "slurm", ""
    return "local", "no Slurm on this machine (sbatch/srun not on PATH): running the sweep with submitit's local executor"


def check_executor(kind: str, r: Resources) -> None:
    if kind in ("local", "debug") and r.nodes > 1:
        raise SpecError(f"resources.nodes: {r.nodes} nodes need Slurm; the {kind} executor runs on this machine only")
    if kind == "debug" and r.tasks_per_node > 1:
        raise SpecError("resources.tasks_per_node: the debug executor runs one rank in this process; use --cluster local")


def slurm_parameters(name: str, r: Resources, profile: Profile) -> dict[str, Any]:
    """SlurmExecutor parameters (sbatch options) for every point of the sweep."""
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks_per_node,  # one Slurm task per rank: per GPU, or per CPU rank
        "cpus_per_task": r.cpus_per_task,
        "time": r.time_min,
        "signal_delay_s": r.signal_delay_s,
        "additional_parameters": {"requeue": True},  # allow `scontrol requeue` where JobRequeue=0
    }
    optional = {
        "gpus_per_node": r.gpus_per_node or None,
        "mem": None if r.mem is None else (f"{int(r.mem)}GB" if r.mem == int(r.mem) else f"{int(r.mem * 1024)}MB"),
        "array_parallelism": r.array_parallelism,
        "partition": r.partition or (profile.partitions[0] if profile.partitions else None),
        "account": r.account or profile.account or None,
        "qos": r.qos or profile.qos or None,
        "constraint": r.constraint,
        "setup": list(profile.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


class _SbatchPreview(SlurmExecutor):
    """A SlurmExecutor that can be built without `srun`, only to render the sbatch script."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def sbatch_text(folder: Path, params: dict[str, Any], n_points: int) -> str:
    """The exact sbatch script submitit writes for this sweep (its own code renders it)."""
    ex = _SbatchPreview(folder)
    ex.update_parameters(**params)
    if n_points > 1:  # what SlurmExecutor does for a job array
        ex.parameters["map_count"] = n_points
    return ex._make_submission_file_text(ex._submitit_command_str, "preview")


@contextlib.contextmanager
def submission_environment() -> Iterator[None]:
    """submitit.helpers.clean_env() without dropping SLURM_CONF, which sbatch needs here."""
    drop = [k for k in os.environ if k in INHERITED or k.startswith(("SUBMITIT_", "SRUN_", "SBATCH_"))
            or (k.startswith(("SLURM_", "SLURMD_")) and k != "SLURM_CONF")]
    saved = {k: os.environ.pop(k) for k in drop}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Point this process's stdout/stderr at `log` while local jobs start: they inherit them, and
    must not hold the caller's terminal or pipes open after `submit` returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def submit_tasks(kind: str, folder: Path, name: str, r: Resources, profile: Profile, tasks: list[TrainTask]) -> list:
    """Submit one job per task, as one Slurm job array; the submitit jobs."""
    try:
        if kind == "slurm":
            ex = SlurmExecutor(folder, max_num_timeout=r.max_timeouts)
            ex.update_parameters(**slurm_parameters(name, r, profile))
            with submission_environment():
                return ex.submit_array(tasks)
        if kind == "local":
            ex = LocalExecutor(folder, max_num_timeout=r.max_timeouts)
            ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks_per_node, gpus_per_node=r.gpus_per_node,
                                 signal_delay_s=r.signal_delay_s)
            with submission_environment(), output_to(folder / "local-executor.log"):
                return ex.submit_array(tasks)
        return DebugExecutor(folder).submit_array(tasks)
    except Exception as e:  # sbatch's own message, whatever submitit wraps it in
        text = str(e).strip().splitlines()
        raise SubmitError(f"submission failed: {text[-1] if text else type(e).__name__}") from None


def make_tasks(sweep_dir: Path, points: list[dict[str, Any]], profile: Profile, r: Resources) -> list[TrainTask]:
    # The local executor starts every point at once; its tasks take turns: array_parallelism, or
    # as many points as this machine's cores hold.
    slots = r.array_parallelism or max(1, (os.cpu_count() or 1) // (r.tasks_per_node * r.cpus_per_task))
    return [TrainTask(p["config"], dict(profile.env), r.cpus_per_task, str(sweep_dir), slots) for p in points]


# ---------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    profile = load_profile(spec.cluster)
    check_fits(spec.resources, profile)
    kind, note = choose_executor(args.cluster)
    check_executor(kind, spec.resources)
    sweep_dir = Path(args.sweep_dir or Path("sweeps") / spec.name).absolute()
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise SpecError(f"--sweep-dir: {sweep_dir} exists and is not empty; resubmit with "
                        f"'python jobs/submit.py resubmit {sweep_dir} --failed' or choose another --sweep-dir")
    uid = uuid.uuid4().hex[:6]  # run ids stay unique (wandb) when a sweep name is reused
    points = make_points(spec, sweep_dir, uid, args.max_points)
    if args.dry_run:
        return dry_run(spec, profile, kind, sweep_dir, points)
    if note:
        print(note)
    if kind == "slurm":
        apply_submit_environment(profile)
    record = new_record(spec, profile, kind, uid, points)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(spec.path, sweep_dir / "spec.yaml")
        save_record(sweep_dir, record)
        jobs = submit_points(sweep_dir, record, record["points"], profile)
    except BaseException:
        if not any(p["job_id"] for p in record["points"]):
            shutil.rmtree(sweep_dir, ignore_errors=True)  # nothing half-written: no job exists for it
        raise
    print_submitted(sweep_dir, record, record["points"], kind, profile)
    run_debug_jobs(jobs)
    return 0


def new_record(spec: Spec, profile: Profile, kind: str, uid: str, points: list[Point]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "uid": uid,
        "profile": profile.name,
        "executor": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resources": dataclasses.asdict(spec.resources),
        "points": [{"name": p.name, "values": p.values, "describe": p.describe(), "run_id": p.run_id,
                    "run_dir": p.run_dir, "config": p.config, "job_id": None, "job_ids": []} for p in points],
        "submissions": [],
    }


def submit_points(sweep_dir: Path, record: dict[str, Any], points: list[dict[str, Any]], profile: Profile) -> list:
    """Submit `points` (entries of the record) as one array and record their job ids; the jobs."""
    r = Resources(**record["resources"])
    folder = submitit_folder(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = make_tasks(sweep_dir, points, profile, r)
    jobs = submit_tasks(record["executor"], folder, record["name"], r, profile, tasks)
    for point, job in zip(points, jobs):
        point["job_id"] = str(job.job_id)
        point["job_ids"].append(str(job.job_id))
    record["submissions"].append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "points": [p["name"] for p in points],
                                  "job_ids": [str(j.job_id) for j in jobs]})
    save_record(sweep_dir, record)
    return jobs


def run_debug_jobs(jobs: list) -> None:
    """The debug executor's jobs run when asked for their results: now, here, one after another."""
    for job in jobs:
        if isinstance(job, DebugJob):
            job.results()


def print_submitted(sweep_dir: Path, record: dict[str, Any], points: list[dict[str, Any]], kind: str,
                    profile: Profile) -> None:
    slurm = "one Slurm job array" if len(points) > 1 else "one Slurm job"
    where = {"slurm": f"{slurm} (profile {profile.name})", "local": "local processes (submitit local executor)",
             "debug": "this process (debug executor)"}[kind]
    print(f"{record['name']}: {len(points)} point(s) submitted as {where}")
    print(format_table([[p["name"], p["job_id"], p["run_id"], p["describe"]] for p in points],
                       ["point", "job", "run id", "values"]))
    print(f"sweep dir: {sweep_dir}\nstatus:    python jobs/submit.py status {sweep_dir}")


def dry_run(spec: Spec, profile: Profile, kind: str, sweep_dir: Path, points: list[Point]) -> int:
    print(f"{spec.name}: {len(points)} point(s), cluster profile {profile.name}, executor {kind}; dry run, "
          "nothing submitted")
    print(format_table([[p.name, p.run_id, p.describe()] for p in points], ["point", "run id", "values"]))
    print(f"sweep dir: {sweep_dir} (run dirs {sweep_dir / 'runs'}/<point>)")
    if kind == "slurm":
        params = slurm_parameters(spec.name, spec.resources, profile)
        print(f"--- sbatch script ({submitit_folder(sweep_dir)}/<job id>_submission.sh) ---")
        print(sbatch_text(submitit_folder(sweep_dir), params, len(points)), end="")
    else:
        print(f"(executor {kind}: no sbatch script; each point runs as {spec.resources.tasks_per_node} process(es) here)")
    return 0


# ---------------------------------------------------------------------------- status, wait, cancel, resubmit


def open_sweep(path: str) -> tuple[Path, dict[str, Any], Profile]:
    sweep_dir = Path(path).absolute()
    record = load_record(sweep_dir)
    profile = load_profile(record["profile"])
    if record["executor"] == "slurm":
        apply_submit_environment(profile)
    return sweep_dir, record, profile


def cmd_status(args: argparse.Namespace) -> int:
    sweep_dir, record, _ = open_sweep(args.sweep_dir)
    states = point_states(sweep_dir, record)
    if args.json:
        print(json.dumps([s.to_dict() for s in states], indent=1))
    else:
        print(f"{record['name']} ({record['executor']} executor, profile {record['profile']}): {sweep_dir}")
        print(status_table(states))
    return 0


# A point read as ended without a result is looked at again this much later before `wait` believes
# it: a requeued Slurm job was once read so for a moment, between its old and its new life (seen
# once in three CI runs; the state it showed was not caught).
SETTLE_SECONDS = 10.0


def cmd_wait(args: argparse.Namespace) -> int:
    sweep_dir, record, _ = open_sweep(args.sweep_dir)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen_over = False
    while True:
        states = point_states(sweep_dir, record)
        if not any(s.state in ACTIVE for s in states):
            if seen_over or all(s.state in ("done", "cancelled") for s in states):
                print(status_table(states))
                return 0 if all(s.state == "done" for s in states) else 1
            seen_over = True
            time.sleep(SETTLE_SECONDS)
            continue
        seen_over = False
        if deadline is not None and time.monotonic() >= deadline:
            print(status_table(states))
            print(f"wait: timed out after {args.timeout:g} s", file=sys.stderr)
            return 124
        time.sleep(args.poll)


def cmd_cancel(args: argparse.Namespace) -> int:
    sweep_dir, record, _ = open_sweep(args.sweep_dir)
    active = [s.job_id for s in point_states(sweep_dir, record) if s.state in ACTIVE]
    if not active:
        print("cancel: nothing queued or running")
        return 0
    mark_cancelled(sweep_dir, active)  # first: the tasks' SIGTERM handler must see it
    if record["executor"] == "slurm":
        proc = subprocess.run(["scancel", *active], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SubmitError(f"scancel failed: {proc.stderr.strip()}")
    elif record["executor"] == "local":
        for job_id in active:  # as submitit's LocalJob.cancel: SIGINT makes the controller kill its tasks
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job_id), signal.SIGINT)
    print(f"cancel: {len(active)} job(s): {' '.join(active)}")
    return 0


def cmd_resubmit(args: argparse.Namespace) -> int:
    if not args.failed:
        raise SpecError("resubmit: say which points: --failed (the failed, stopped and cancelled ones)")
    sweep_dir, record, profile = open_sweep(args.sweep_dir)
    names = {s.name for s in point_states(sweep_dir, record) if s.state in RESUBMITTABLE}
    points = [p for p in record["points"] if p["name"] in names]
    if not points:
        print("resubmit: no failed, stopped or cancelled points")
        return 0
    jobs = submit_points(sweep_dir, record, points, profile)  # same run dirs: each resumes from its checkpoints
    print_submitted(sweep_dir, record, points, record["executor"], profile)
    run_debug_jobs(jobs)
    return 0


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] in COMMANDS:
        parser = argparse.ArgumentParser(prog=f"python jobs/submit.py {argv[0]}")
        parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
        if argv[0] == "status":
            parser.add_argument("--json", action="store_true", help="one JSON object per point")
        if argv[0] == "wait":
            parser.add_argument("--timeout", type=float, help="give up after this many seconds (exit 124)")
            parser.add_argument("--poll", type=float, default=10.0, help="seconds between checks (default 10)")
        if argv[0] == "resubmit":
            parser.add_argument("--failed", action="store_true", help="the failed, stopped and cancelled points")
        args = parser.parse_args(argv[1:])
        args.command = argv[0]
        return args
    parser = argparse.ArgumentParser(prog="python jobs/submit.py", description=__doc__.split("\n\n")[0],
                                     epilog="also: status|wait|cancel|resubmit SWEEP_DIR (see the module docstring)")
    parser.add_argument("spec", metavar="SPEC.yaml", help="the sweep spec")
    parser.add_argument("--dry-run", action="store_true", help="print the points and the sbatch script; submit nothing")
    parser.add_argument("--cluster", choices=EXECUTORS, default="auto",
                        help="executor: slurm, local (no Slurm), debug (in this process); auto = slurm if sbatch is on PATH")
    parser.add_argument("--sweep-dir", help="default: sweeps/<name>")
    parser.add_argument("--max-points", type=int, default=MAX_POINTS, help=f"refuse larger sweeps (default {MAX_POINTS})")
    args = parser.parse_args(argv)
    args.command = "submit"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = {"submit": cmd_submit, "status": cmd_status, "wait": cmd_wait, "cancel": cmd_cancel,
               "resubmit": cmd_resubmit}[args.command]
    try:
        return command(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

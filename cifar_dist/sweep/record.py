"""The sweep directory: the record of what was submitted, and each point's state read back
without Slurm accounting (sacct fails on clusters without slurmdbd, the dev cluster included).

    <sweep dir>/sweep.json        name, profile, executor, resources, points (values, run id, run
                                  dir, resolved config, job ids), submissions
    <sweep dir>/spec.yaml         the spec as given
    <sweep dir>/runs/<point>/     each point's run dir (config.yaml, metrics.jsonl, checkpoints/, ...)
    <sweep dir>/submitit/         submitit's sbatch script, pickles and logs (<job id>_<task>_log.out)
    <sweep dir>/cancelled         job ids stopped by `cancel` (tasks read it to not requeue)
    <sweep dir>/slots/            the local executor's run slots (it starts every point at once)

A point's state comes from, in order: the queue (squeue, or the local executor's process), the
run dir (summary.json = done), submitit's result pickle of task 0 (an error = failed, the
stopped marker = stopped or cancelled), and else failed (the job vanished without a result).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths, pickle_load

from cifar_dist.sweep.profiles import ClusterError
from cifar_dist.sweep.strict import SpecError
from cifar_dist.sweep.task import CANCELLED, SLOTS, STOPPED

RECORD = "sweep.json"
ACTIVE = ("pending", "running", "requeued")
RESUBMITTABLE = ("failed", "stopped", "cancelled")  # `resubmit --failed` takes these


class QueueError(ClusterError):
    """The scheduler could not be asked (squeue failed)."""


# ---------------------------------------------------------------------------- the record


def load_record(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / RECORD
    if not path.is_file():
        raise SpecError(f"{sweep_dir}: not a sweep dir (no {RECORD})")
    return json.loads(path.read_text())


def save_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    """Atomically: a reader (status in another shell) never sees half a record."""
    tmp = sweep_dir / f".{RECORD}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, sweep_dir / RECORD)


def submitit_folder(sweep_dir: Path) -> Path:
    return sweep_dir / "submitit"


def mark_cancelled(sweep_dir: Path, job_ids: list[str]) -> None:
    with open(sweep_dir / CANCELLED, "a") as f:
        f.write("".join(f"{j}\n" for j in job_ids))


def cancelled_ids(sweep_dir: Path) -> set[str]:
    path = sweep_dir / CANCELLED
    return set(path.read_text().split()) if path.exists() else set()


# ---------------------------------------------------------------------------- the queue


def queue_states(sweep_dir: Path, executor: str, job_ids: list[str]) -> dict[str, str]:
    """{job id: pending | running | requeued} for the jobs still queued or running."""
    if executor == "slurm":
        return slurm_queue(set(job_ids))
    if executor == "local":  # alive and waiting for a run slot = pending
        return {j: "running" if (sweep_dir / SLOTS / f"{j}.running").exists() else "pending"
                for j in job_ids if local_job_alive(j)}
    return {}  # debug: ran inside the submitting process, nothing is queued


def slurm_queue(job_ids: set[str]) -> dict[str, str]:
    # One squeue for all of this user's jobs (-r: one line per array task; --states=all: also the
    # short REQUEUED step a requeued job passes through, which squeue hides by default). Asking
    # for the ids with -j fails as a whole once one of them has left the queue.
    cmd = ["squeue", "-h", "-r", "--states=all", "-u", getpass.getuser(), "-O", "JobArrayID:64,State:32,RestartCnt:16"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QueueError(f"squeue failed: {e}") from None
    if proc.returncode != 0:
        raise QueueError(f"squeue failed: {last_line(proc.stderr or proc.stdout)}")
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in job_ids:
            state = _slurm_state(parts[1], int(parts[2]) if parts[2].isdigit() else 0)
            if state:
                out[parts[0]] = state
    return out


# Slurm states of a job that is not over; every other state (COMPLETED, FAILED, CANCELLED,
# TIMEOUT, NODE_FAIL, ...) is final, and the run dir and result pickles tell the rest.
RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")
REQUEUED = ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT")


def _slurm_state(state: str, restarts: int) -> str | None:
    if state == "PENDING":
        return "requeued" if restarts else "pending"
    if state in REQUEUED:
        return "requeued"
    return "running" if state in RUNNING else None


def local_job_alive(job_id: str) -> bool:
    """The local executor's job id is the pid of its controller process."""
    try:
        cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False
    return b"submitit.local._local" in cmdline


# ---------------------------------------------------------------------------- point states


@dataclass
class PointState:
    name: str
    job_id: str
    state: str  # pending | running | requeued | done | stopped | cancelled | failed
    step: int | None  # the newest training record's step
    accuracy: float | None  # final test accuracy when done, else the newest evaluation's
    note: str  # why it failed or stopped, or ""
    values: str  # the swept values, for display

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def point_states(sweep_dir: Path, record: dict[str, Any]) -> list[PointState]:
    points = record["points"]
    queue = queue_states(sweep_dir, record["executor"], [p["job_id"] for p in points if p.get("job_id")])
    cancelled = cancelled_ids(sweep_dir)
    return [_point_state(sweep_dir, p, queue, cancelled) for p in points]


def _point_state(sweep_dir: Path, point: dict[str, Any], queue: dict[str, str], cancelled: set[str]) -> PointState:
    job_id = point.get("job_id") or ""
    run_dir = Path(point["run_dir"])
    step, accuracy = progress(run_dir)
    state, note = _state_from_files(sweep_dir, job_id, run_dir, cancelled)
    if job_id in queue:
        state, note = queue[job_id], ""
    if state == "done":
        accuracy = json.loads((run_dir / "summary.json").read_text())["test_accuracy"]
    return PointState(point["name"], job_id, state, step, accuracy, note, point["describe"])


def _state_from_files(sweep_dir: Path, job_id: str, run_dir: Path, cancelled: set[str]) -> tuple[str, str]:
    if (run_dir / "summary.json").is_file():
        return "done", ""
    if not job_id:
        return "failed", "never submitted"
    is_cancelled = job_id in cancelled or job_id.split("_")[0] in cancelled
    outcome = _task0_result(sweep_dir, job_id)
    if outcome is None:
        if is_cancelled:
            return "cancelled", ""
        log = JobPaths(submitit_folder(sweep_dir), job_id=job_id, task_id=0).stderr
        return "failed", f"ended without a result (killed, out of time or lost); see {log}"
    kind, value = outcome
    if kind == "success" and isinstance(value, dict) and value.get("status") == STOPPED:
        reason = value.get("reason", "")
        return ("cancelled", "") if reason == "cancelled" or is_cancelled else ("stopped", f"checkpointed, {reason}")
    if kind == "error":
        return ("cancelled" if is_cancelled else "failed"), last_line(str(value))
    return "failed", "finished without a summary.json"


def _task0_result(sweep_dir: Path, job_id: str) -> tuple[str, Any] | None:
    path = JobPaths(submitit_folder(sweep_dir), job_id=job_id, task_id=0).result_pickle
    if not path.exists():
        return None
    try:
        return pickle_load(path)
    except Exception as e:  # an unreadable pickle is reported, not fatal to `status`
        return "error", f"unreadable result {path}: {e}"


def last_line(trace: str) -> str:
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "failed"


def progress(run_dir: Path) -> tuple[int | None, float | None]:
    """(newest step, newest test accuracy) from metrics.jsonl; a torn last line is skipped."""
    path = run_dir / "metrics.jsonl"
    step = accuracy = None
    if not path.exists():
        return step, accuracy
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step", step)
        accuracy = record.get("test_accuracy", accuracy)
    return step, accuracy


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def status_table(states: list[PointState]) -> str:
    rows = [[s.name, s.job_id or "-", s.state, "-" if s.step is None else str(s.step),
             "-" if s.accuracy is None else f"{s.accuracy:.2%}", s.values, s.note] for s in states]
    counts = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return format_table(rows, ["point", "job", "state", "step", "test acc", "values", "note"]) + f"\n{summary}"

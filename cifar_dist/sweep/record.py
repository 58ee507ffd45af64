"""The sweep directory: the record of what was submitted, and each point's state read back
without Slurm accounting (sacct fails on clusters without slurmdbd, the dev cluster included).

    <sweep dir>/sweep.json        name, profile (and its file), executor, resources, points (values,
                                  run id, run dir, resolved config, job ids), submissions
    <sweep dir>/spec.yaml         the spec as given
    <sweep dir>/runs/<point>/     each point's run dir (config.yaml, metrics.jsonl, checkpoints/, ...)
    <sweep dir>/submitit/         submitit's sbatch script, pickles and logs (<job id>_<task>_log.out)
    <sweep dir>/cancelled         job ids stopped by `cancel` (tasks read it to not requeue)
    <sweep dir>/slots/            the local executor's run slots (it starts every point at once)

A point's state comes from, in order: the queue (its executor's `queue_states`), the
run dir (summary.json = done), submitit's result pickle of task 0 (an error = failed, the
stopped marker = stopped or cancelled), and else failed (the job vanished without a result).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_dist.errors import UserError
from cifar_dist.rundir import SUMMARY, RunDir, write_atomic
from cifar_dist.sweep import submitit_compat

RECORD = "sweep.json"
ACTIVE = ("pending", "running", "requeued")
RESUBMITTABLE = ("failed", "stopped", "cancelled")  # `resubmit --failed` takes these
STOPPED = "stopped"  # the "status" of the marker a task returns when it stopped without finishing
DONE = "done.json"  # written, last, by a task whose folder is not a run dir (a search worker): it is done
CANCELLED = "cancelled"  # <sweep dir>/cancelled: job ids `cancel` stopped (one a line)


# ---------------------------------------------------------------------------- the record


def load_record(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / RECORD
    if not path.is_file():
        raise UserError(f"{sweep_dir}: not a sweep dir (no {RECORD})")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged, not a sweep record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("points"), list):
        raise UserError(f"{path}: damaged, not a sweep record (no points)")
    return record


def save_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    """Atomically and durably: a reader (status in another shell) never sees half a record."""
    write_atomic(sweep_dir / RECORD, json.dumps(record, indent=1))


def submitit_folder(sweep_dir: Path) -> Path:
    return sweep_dir / "submitit"


def mark_cancelled(sweep_dir: Path, job_ids: list[str]) -> None:
    with open(sweep_dir / CANCELLED, "a") as f:
        f.write("".join(f"{j}\n" for j in job_ids))


def cancelled_ids(sweep_dir: Path) -> set[str]:
    path = sweep_dir / CANCELLED
    return set(path.read_text().split()) if path.exists() else set()


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


def job_ids(record: dict[str, Any]) -> list[str]:
    """The newest job id of every point that has one."""
    return [p["job_id"] for p in record["points"] if p.get("job_id")]


def point_states(sweep_dir: Path, record: dict[str, Any], queue: dict[str, str]) -> list[PointState]:
    """Every point's state; `queue` is the executor's {job id: state} for the jobs still queued."""
    cancelled = cancelled_ids(sweep_dir)
    return [_point_state(sweep_dir, p, queue, cancelled) for p in record["points"]]


def _point_state(sweep_dir: Path, point: dict[str, Any], queue: dict[str, str], cancelled: set[str]) -> PointState:
    job_id = point.get("job_id") or ""
    run_dir = Path(point["run_dir"])
    step, accuracy = progress(run_dir)
    state, note = _state_from_files(sweep_dir, job_id, run_dir, cancelled)
    if job_id in queue:
        state, note = queue[job_id], ""
    if state == "done":
        accuracy = (RunDir(run_dir).summary() or {}).get("test_accuracy")
    return PointState(point["name"], job_id, state, step, accuracy, note, point["describe"])


def _state_from_files(sweep_dir: Path, job_id: str, run_dir: Path, cancelled: set[str]) -> tuple[str, str]:
    if (run_dir / SUMMARY).is_file() or (run_dir / DONE).is_file():
        return "done", ""
    if not job_id:
        return "failed", "never submitted"
    is_cancelled = job_id in cancelled or job_id.split("_")[0] in cancelled
    outcome = submitit_compat.task_result(submitit_folder(sweep_dir), job_id)
    if outcome is None:
        if is_cancelled:
            return "cancelled", ""
        log = submitit_compat.task_log(submitit_folder(sweep_dir), job_id)
        return "failed", f"ended without a result (killed, out of time or lost); see {log}"
    kind, value = outcome
    if kind == "success" and isinstance(value, dict) and value.get("status") == STOPPED:
        reason = value.get("reason", "")
        return ("cancelled", "") if reason == "cancelled" or is_cancelled else ("stopped", f"checkpointed, {reason}")
    if kind == "error":
        return ("cancelled" if is_cancelled else "failed"), last_line(str(value))
    return "failed", f"finished without a {SUMMARY}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "failed"


def progress(run_dir: Path) -> tuple[int | None, float | None]:
    """(newest step, newest test accuracy) from metrics.jsonl."""
    step = accuracy = None
    for record in RunDir(run_dir).metrics():
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

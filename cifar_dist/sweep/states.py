"""Each point's state, read back without Slurm accounting (sacct fails on clusters without
slurmdbd, the dev cluster included).

A point is done only when its run dir's summary.json and config.yaml are its own (the record's
run id and config hash) and the point's recorded job returned that summary (submitit's result
pickle of task 0); a run dir holding anything else is a mismatch (or cancelled, where `cancel` killed
the job between its run's summary and its result), never done. Otherwise its state
comes from the queue (its executor's `queue_states`), then the result pickle (an error = failed,
the stopped marker = stopped or cancelled), and else failed (the job vanished without a result).
A run that `train.early_stop` ended wrote its summary like any other: done, its note says why.
A study's worker (worker.py) has no run dir: it is done when its recorded job returned the
worker's DONE result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_dist import schema
from cifar_dist.config import Config
from cifar_dist.errors import ConfigError
from cifar_dist.result_keys import config_hash
from cifar_dist.rundir import CONFIG, SUMMARY, RunDir, RunDirError
from cifar_dist.sweep import submitit_compat
from cifar_dist.sweep.record import PointEntry, SweepRecord, WorkerEntry
from cifar_dist.sweep.sweepdir import cancelled_ids, submitit_folder, was_cancelled
from cifar_dist.tables import format_table

ACTIVE = ("pending", "running", "requeued")
RESUBMITTABLE = ("failed", "stopped", "cancelled", "mismatch")  # `resubmit --failed` takes these (a mismatch: unless `foreign`)
MISMATCH = "mismatch"  # the run dir holds a result that is not this point's (never shown as done)
STOPPED = "stopped"  # the "status" of the marker a task returns when it stopped without finishing
DONE = "done"  # the "status" of what a search worker returns when its study needs nothing more from it


@dataclass
class PointState:
    name: str
    job_id: str
    state: str  # pending | running | requeued | done | stopped | cancelled | failed | mismatch
    step: int | None  # the newest training record's step
    accuracy: float | None  # final test accuracy when done, else the newest evaluation's
    note: str  # why it failed or stopped, or ""
    values: str  # the swept values, for display

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def point_states(sweep_dir: Path, record: SweepRecord, queue: dict[str, str]) -> list[PointState]:
    """Every point's state; `queue` is the executor's {job id: state} for the jobs still queued."""
    cancelled = cancelled_ids(sweep_dir)
    states = [_worker_state(sweep_dir, p, queue, cancelled) if isinstance(p, WorkerEntry) else
              _point_state(sweep_dir, p, queue, cancelled) for p in record.points]
    cut_short = {name for s in record.cut_short() for name in s.points}
    for state in states:
        if not state.job_id and state.name in cut_short:
            state.note = "its submission ended before the scheduler took a job (or is under way); resubmit --failed submits it"
    return states


def _worker_state(sweep_dir: Path, worker: WorkerEntry, queue: dict[str, str], cancelled: set[str]) -> PointState:
    """A search worker has no run dir of its own: its job's word alone."""
    job_id = worker.job_id or ""
    outcome = submitit_compat.task_result(submitit_folder(sweep_dir), job_id) if job_id else None
    if _worker_done(worker, outcome):
        return PointState(worker.name, job_id, "done", None, None, "", "")
    if job_id in queue:
        return PointState(worker.name, job_id, queue[job_id], None, None, "", "")
    state, note = _ended(sweep_dir, job_id, outcome, was_cancelled(job_id, cancelled))
    return PointState(worker.name, job_id, state, None, None, note, "")


def _point_state(sweep_dir: Path, point: PointEntry, queue: dict[str, str], cancelled: set[str]) -> PointState:
    job_id = point.job_id or ""
    run_dir = Path(point.run_dir)
    step, accuracy = progress(run_dir)
    outcome = submitit_compat.task_result(submitit_folder(sweep_dir), job_id) if job_id else None
    finished = (run_dir / SUMMARY).is_file()
    if finished:
        foreign_run = foreign(point, run_dir)
        if foreign_run:  # another run's progress and result: none of it is shown as this point's
            return PointState(point.name, job_id, MISMATCH, None, None, foreign_run, point.describe)
        if _returned_by_job(point, outcome):  # done, also while Slurm still shows its job COMPLETING
            summary = RunDir(run_dir).summary()
            early = summary.get("early_stop")  # train.early_stop ended it: done, and the note says why
            note = f"stopped early at step {early['step']}: {early['reason']}" if early else ""
            return PointState(point.name, job_id, "done", step, summary["test_accuracy"], note, point.describe)
    is_cancelled = was_cancelled(job_id, cancelled)
    if job_id in queue:
        state, note = queue[job_id], ""
    elif finished and is_cancelled:
        # `cancel` landed between the run's last file and its job's result: its own run, never shown as done
        state, note = "cancelled", f"after its run wrote {SUMMARY}; `resubmit --failed` confirms it from its final checkpoint"
    elif finished:
        why = "no result" if outcome is None else last_line(str(outcome[1]))
        state, note = MISMATCH, f"{SUMMARY} not returned by job {job_id or '(none)'} ({why})"
    else:
        state, note = _ended(sweep_dir, job_id, outcome, is_cancelled)
    return PointState(point.name, job_id, state, step, accuracy, note, point.describe)


def foreign(point: PointEntry, run_dir: Path) -> str:
    """Why the finished run in `run_dir` is not this point's (another run id or config), or ""."""
    try:
        summary = RunDir(run_dir).summary() or {}
        saved = _hash(schema.read_yaml_mapping(run_dir / CONFIG, "run config"))
    except (RunDirError, ConfigError) as e:
        return f"run dir unreadable: {e}"
    if summary.get("run_id") != point.run_id:
        return f"run dir holds run {summary.get('run_id')}, not {point.run_id}"
    if saved != _hash(point.config):
        return f"run dir holds another config (hash {saved}, recorded {_hash(point.config)})"
    return ""


def _returned_by_job(point: PointEntry, outcome: tuple[str, Any] | None) -> bool:
    """Whether the point's recorded job returned this point's summary (rank 0's result pickle)."""
    if outcome is None:
        return False
    kind, value = outcome
    return kind == "success" and isinstance(value, dict) and value.get("run_id") == point.run_id


def _worker_done(worker: WorkerEntry, outcome: tuple[str, Any] | None) -> bool:
    """Whether the worker's recorded job returned that it is done."""
    if outcome is None:
        return False
    kind, value = outcome
    return kind == "success" and isinstance(value, dict) and value.get("status") == DONE and value.get("worker") == worker.name


def _hash(config: dict[str, Any]) -> str:
    """result_keys.config_hash of a config as saved, without validating it again (its data may have moved)."""
    cfg = Config()
    schema.update(cfg, config)
    return config_hash(cfg)


def _ended(sweep_dir: Path, job_id: str, outcome: tuple[str, Any] | None, is_cancelled: bool) -> tuple[str, str]:
    """The state of a point whose job has left the queue without a summary."""
    if not job_id:
        return "failed", "never submitted"
    if outcome is None:
        if is_cancelled:
            return "cancelled", ""
        log = submitit_compat.task_log(submitit_folder(sweep_dir), job_id)
        return "failed", f"ended without a result (killed, out of time or lost); see {log}"
    kind, value = outcome
    if kind == "success" and isinstance(value, dict) and value.get("status") == STOPPED:
        reason = value.get("reason", "")
        if reason.startswith("cancelled") or is_cancelled:
            return "cancelled", ""
        return "stopped", f"checkpointed, {reason}"
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


def status_table(states: list[PointState]) -> str:
    rows = [[s.name, s.job_id or "-", s.state, "-" if s.step is None else str(s.step),
             "-" if s.accuracy is None else f"{s.accuracy:.2%}", s.values, s.note] for s in states]
    counts = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return format_table(rows, ["point", "job", "state", "step", "test acc", "values", "note"]) + f"\n{summary}"

"""The sweep directory: the record of what was submitted, and each point's state read back
without Slurm accounting (sacct fails on clusters without slurmdbd, the dev cluster included).

    <sweep dir>/sweep.json        name, profile (and its file), executor, resources, points (values,
                                  run id, run dir, resolved config, job ids), submissions
    <sweep dir>/spec.yaml         the spec as given
    <sweep dir>/runs/<point>/     each point's run dir (config.yaml, metrics.jsonl, checkpoints/, ...)
    <sweep dir>/submitit/         submitit's sbatch script, pickles and logs (<job id>_<task>_log.out)
    <sweep dir>/cancelled         job ids stopped by `cancel` (tasks read it to not requeue)
    <sweep dir>/sweep.lock        flocked by the command changing the record (submit, resubmit,
                                  cancel); names its holder
    <sweep dir>/slots/            the local executor's run slots (it starts every point at once)

A point is done only when its run dir's summary.json and config.yaml are its own (the record's
run id and config hash) and the point's recorded job returned that summary (submitit's result
pickle of task 0); a run dir holding anything else is a mismatch (or cancelled, where `cancel` killed
the job between its run's summary and its result), never done. Otherwise its state
comes from the queue (its executor's `queue_states`), then the result pickle (an error = failed,
the stopped marker = stopped or cancelled), and else failed (the job vanished without a result).
A run that `train.early_stop` ended wrote its summary like any other: done, its note says why.
A study's points are its workers (search.py: study.journal, runs/<trial>/, workers/<worker>/): a
worker has no run dir, and is done when its recorded job returned the worker's DONE result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_dist import schema
from cifar_dist.config import Config, config_hash
from cifar_dist.errors import ConfigError, UserError
from cifar_dist.rundir import CONFIG, SUMMARY, RunDir, RunDirError, write_atomic
from cifar_dist.sweep import submitit_compat
from cifar_dist.tables import format_table

RECORD = "sweep.json"
LOCK = "sweep.lock"
ACTIVE = ("pending", "running", "requeued")
RESUBMITTABLE = ("failed", "stopped", "cancelled", "mismatch")  # `resubmit --failed` takes these (a mismatch: unless `foreign`)
MISMATCH = "mismatch"  # the run dir holds a result that is not this point's (never shown as done)
STOPPED = "stopped"  # the "status" of the marker a task returns when it stopped without finishing
DONE = "done"  # the "status" of what a search worker returns when its study needs nothing more from it
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


@contextlib.contextmanager
def changing(sweep_dir: Path, command: str, new: bool = False) -> Iterator[bool]:
    """Hold the sweep dir for `command` while it changes the record and the jobs (submit,
    resubmit, cancel); a second such command meanwhile fails at once, naming the holder, having
    done nothing. `new`: make the sweep dir, which must not exist or be empty; of two submits
    into one dir exactly one gets past this (mkdir, then an exclusive create of the lock file).
    Yields whether this command made the folder (for `discard`)."""
    if new:
        created = _claim(sweep_dir)
    else:
        created = False
        if not (sweep_dir / RECORD).is_file():
            load_record(sweep_dir)  # the one-line "not a sweep dir" error, before any file is made here
    f = open(sweep_dir / LOCK, "a+")  # noqa: SIM115 - held until the block ends
    try:
        # A new dir's claimant blocks: anyone holding it now is a command about to find no record.
        fcntl.flock(f, fcntl.LOCK_EX if new else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another command"
        f.close()
        raise UserError(f"{sweep_dir}: busy, {holder} is changing this sweep; nothing done, "
                        "run it again when that has finished") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{command} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})\n")
        f.flush()
        yield created
    finally:
        f.close()


def check_free(sweep_dir: Path) -> None:
    """A new sweep goes only into a folder that does not exist or is empty."""
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise _taken(sweep_dir)


def _taken(sweep_dir: Path) -> UserError:
    return UserError(f"--sweep-dir: {sweep_dir} exists and is not empty; resubmit with "
                     f"'python jobs/submit.py resubmit {sweep_dir} --failed' or choose another --sweep-dir")


def _claim(sweep_dir: Path) -> bool:
    """Make `sweep_dir` this command's (True: it made the folder), or raise as check_free does."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        sweep_dir.mkdir()
        created = True
    except FileExistsError:
        check_free(sweep_dir)
        created = False
    try:  # an empty folder may be seen as free by two submits; only one creates the lock file
        os.close(os.open(sweep_dir / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise _taken(sweep_dir) from None
    return created


def discard(sweep_dir: Path, created: bool) -> None:
    """Take back a new sweep dir whose submission failed before any job existed."""
    if created:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        return
    for p in sweep_dir.iterdir():  # the folder was there, empty: leave it so
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def submitit_folder(sweep_dir: Path) -> Path:
    return sweep_dir / "submitit"


def mark_cancelled(sweep_dir: Path, job_ids: list[str]) -> None:
    with open(sweep_dir / CANCELLED, "a") as f:
        f.write("".join(f"{j}\n" for j in job_ids))


def cancelled_ids(sweep_dir: Path) -> set[str]:
    path = sweep_dir / CANCELLED
    return set(path.read_text().split()) if path.exists() else set()


def was_cancelled(job_id: str, listed: set[str]) -> bool:
    """Whether `cancel` stopped this job: listed itself, or its array (an array task is ARRAY_TASK)."""
    return job_id in listed or job_id.split("_")[0] in listed


# ---------------------------------------------------------------------------- point states


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
    outcome = submitit_compat.task_result(submitit_folder(sweep_dir), job_id) if job_id else None
    if _worker_done(point, outcome):  # a search worker (search.py): no run dir of its own, its job's word alone
        return PointState(point["name"], job_id, "done", None, None, "", point["describe"])
    finished = (run_dir / SUMMARY).is_file()
    if finished:
        foreign_run = foreign(point, run_dir)
        if foreign_run:  # another run's progress and result: none of it is shown as this point's
            return PointState(point["name"], job_id, MISMATCH, None, None, foreign_run, point["describe"])
        if _returned_by_job(point, outcome):  # done, also while Slurm still shows its job COMPLETING
            summary = RunDir(run_dir).summary()
            early = summary.get("early_stop")  # train.early_stop ended it: done, and the note says why
            note = f"stopped early at step {early['step']}: {early['reason']}" if early else ""
            return PointState(point["name"], job_id, "done", step, summary["test_accuracy"], note, point["describe"])
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
    return PointState(point["name"], job_id, state, step, accuracy, note, point["describe"])


def foreign(point: dict[str, Any], run_dir: Path) -> str:
    """Why the finished run in `run_dir` is not this point's (another run id or config), or ""."""
    try:
        summary = RunDir(run_dir).summary() or {}
        saved = _hash(schema.read_yaml_mapping(run_dir / CONFIG, "run config"))
    except (RunDirError, ConfigError) as e:
        return f"run dir unreadable: {e}"
    if summary.get("run_id") != point["run_id"]:
        return f"run dir holds run {summary.get('run_id')}, not {point['run_id']}"
    if saved != _hash(point["config"]):
        return f"run dir holds another config (hash {saved}, recorded {_hash(point['config'])})"
    return ""


def _returned_by_job(point: dict[str, Any], outcome: tuple[str, Any] | None) -> bool:
    """Whether the point's recorded job returned this point's summary (rank 0's result pickle)."""
    if outcome is None:
        return False
    kind, value = outcome
    return kind == "success" and isinstance(value, dict) and value.get("run_id") == point["run_id"]


def _worker_done(point: dict[str, Any], outcome: tuple[str, Any] | None) -> bool:
    """Whether the point is a search worker whose recorded job returned that it is done."""
    if outcome is None:
        return False
    kind, value = outcome
    return (kind == "success" and isinstance(value, dict) and value.get("status") == DONE
            and value.get("worker") == point["name"])


def _hash(config: dict[str, Any]) -> str:
    """config.config_hash of a config as saved, without validating it again (its data may have moved)."""
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

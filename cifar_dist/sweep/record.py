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
A study's points are its workers (search.py: study.journal, runs/<trial>/, workers/<worker>/): a
worker has no run dir, and is done when its recorded job returned the worker's DONE result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_dist import schema
from cifar_dist.config import Config, config_hash
from cifar_dist.errors import ConfigError, UserError
from cifar_dist.rundir import CONFIG, SUMMARY, TRIAL, RunDir, RunDirError, read_json, write_atomic, write_json
from cifar_dist.sweep import submitit_compat
from cifar_dist.sweep.spec import Resources, Search
from cifar_dist.tables import format_table

RECORD = "sweep.json"
LOCK = "sweep.lock"
ACTIVE = ("pending", "running", "requeued")
RESUBMITTABLE = ("failed", "stopped", "cancelled", "mismatch")  # `resubmit --failed` takes these (a mismatch: unless `foreign`)
MISMATCH = "mismatch"  # the run dir holds a result that is not this point's (never shown as done)
STOPPED = "stopped"  # the "status" of the marker a task returns when it stopped without finishing
DONE = "done"  # the "status" of what a search worker returns when its study needs nothing more from it
CANCELLED = "cancelled"  # <sweep dir>/cancelled: job ids `cancel` stopped (one a line)


# ---------------------------------------------------------------------------- the records


@dataclass
class PointEntry:
    """A point of a grid/random sweep: its values, run and resolved config, and the jobs it ran as."""

    kind: str = "point"
    name: str = ""  # "000", "001", ...: its run dir's name
    values: dict[str, Any] = field(default_factory=dict)  # the swept keys' values
    describe: str = ""  # the values as text, for display
    run_id: str = ""
    run_dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the resolved, validated config (Config.to_dict)
    job_id: str | None = None  # the newest job's id; None before it is submitted
    job_ids: list[str] = field(default_factory=list)  # every job it was submitted as, oldest first


@dataclass
class WorkerEntry:
    """A worker of a study (search.py): an array task that trains the study's trials, no run dir of its own."""

    kind: str = "worker"
    name: str = ""  # "w0", "w1", ...
    job_id: str | None = None
    job_ids: list[str] = field(default_factory=list)


Entry = PointEntry | WorkerEntry
ENTRIES: dict[str, type[Entry]] = {"point": PointEntry, "worker": WorkerEntry}


@dataclass
class Submission:
    time: str = ""
    points: list[str] = field(default_factory=list)  # the entries' names
    job_ids: list[str] = field(default_factory=list)


@dataclass
class SweepRecord:
    """sweep.json: what was submitted, and where its jobs went. A study's record also holds its
    settings and the config every trial starts from; its entries are workers."""

    name: str = ""
    uid: str = ""  # in every run id: ids stay unique (wandb) when a sweep's name is reused
    profile: str = ""  # the cluster profile's name ...
    profile_path: str = ""  # ... and the file it was read from
    executor: str = ""  # a key of executors.EXECUTORS
    created: str = ""
    # Where the submit command ran: relative data paths in the spec are relative to it (spec.PATH_KEYS).
    submitted_from: str = ""
    resources: Resources = field(default_factory=Resources)
    points: list[Entry] = field(default_factory=list)
    submissions: list[Submission] = field(default_factory=list)
    search: Search | None = None  # a study's settings; None for a grid/random sweep
    base_config: Config | None = None  # a study's: every trial's config before its values

    @property
    def is_study(self) -> bool:
        return self.search is not None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data if self.is_study else {k: v for k, v in data.items() if k not in ("search", "base_config")}


@dataclass
class TrialRecord:
    """trial.json in a trial's run dir: how the trial ended (its worker writes it; status and compare read it)."""

    number: int = 0
    state: str = ""  # complete | pruned | fail
    value: float | None = None  # the metric's final value (Optuna's)
    metric: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # the trial's values
    note: str = ""  # why it was pruned or failed
    label: str = ""  # the values as text


def load_record(sweep_dir: Path) -> SweepRecord:
    path = sweep_dir / RECORD
    if not path.is_file():
        raise UserError(f"{sweep_dir}: not a sweep dir (no {RECORD})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged, not a sweep record ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise UserError(f"{path}: damaged, not a sweep record (no points)")
    try:
        study = "search" in data
        entries = [_entry(e, study, f"points[{i}].") for i, e in enumerate(data.pop("points"))]
        data.pop("world_size", None)  # a study's ranks per trial, as its resources say; written by earlier versions
        record = schema.build(SweepRecord, data)
    except ConfigError as e:
        raise UserError(f"{path}: damaged, not a sweep record ({e})") from None
    record.points = entries
    return record


def _entry(data: Any, study: bool, where: str) -> Entry:
    if isinstance(data, dict) and "kind" not in data:
        # Saved before entries had a kind: a study's are its workers, saved as points with empty
        # values, run id and config, which a worker does not have.
        kind = "worker" if study else "point"
        data = {k: v for k, v in data.items() if kind == "point" or k in dataclasses.asdict(WorkerEntry())}
        data["kind"] = kind
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in ENTRIES:
        raise ConfigError(f"{where}kind: expected one of {', '.join(ENTRIES)}, got {kind!r}")
    return schema.build(ENTRIES[kind], data, where)


def save_record(sweep_dir: Path, record: SweepRecord) -> None:
    """Atomically and durably: a reader (status in another shell) never sees half a record."""
    write_atomic(sweep_dir / RECORD, json.dumps(record.to_dict(), indent=1))


def load_trial(run_dir: Path) -> TrialRecord | None:
    """A trial's trial.json, None before the trial ended."""
    data = read_json(run_dir / TRIAL)
    if data is None:
        return None
    try:
        return schema.build(TrialRecord, data)
    except ConfigError as e:
        raise RunDirError(f"{run_dir / TRIAL}: damaged ({e})") from None


def save_trial(run_dir: Path, trial: TrialRecord) -> None:
    write_json(run_dir / TRIAL, dataclasses.asdict(trial))


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


def job_ids(record: SweepRecord) -> list[str]:
    """The newest job id of every point that has one."""
    return [p.job_id for p in record.points if p.job_id]


def point_states(sweep_dir: Path, record: SweepRecord, queue: dict[str, str]) -> list[PointState]:
    """Every point's state; `queue` is the executor's {job id: state} for the jobs still queued."""
    cancelled = cancelled_ids(sweep_dir)
    return [_worker_state(sweep_dir, p, queue, cancelled) if isinstance(p, WorkerEntry) else
            _point_state(sweep_dir, p, queue, cancelled) for p in record.points]


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
            return PointState(point.name, job_id, "done", step, RunDir(run_dir).summary()["test_accuracy"], "",
                              point.describe)
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

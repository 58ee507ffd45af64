"""The sweep dir's records: sweep.json (what was submitted, where its jobs went) and a trial's
trial.json (how it ended), as typed dataclasses read by the one strict loader (schema.build) and
written atomically (rundir.write_atomic). The sweep dir's layout: sweepdir.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_dist import schema
from cifar_dist.config import Config
from cifar_dist.errors import ConfigError, UserError
from cifar_dist.rundir import TRIAL, RunDirError, read_json, write_atomic, write_json
from cifar_dist.sweep.resources import Resources
from cifar_dist.sweep.spec import Search

RECORD = "sweep.json"


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
    """A worker of a study (worker.py): an array task that trains the study's trials, no run dir of its own."""

    kind: str = "worker"
    name: str = ""  # "w0", "w1", ...
    job_id: str | None = None
    job_ids: list[str] = field(default_factory=list)


Entry = PointEntry | WorkerEntry
ENTRIES: dict[str, type[Entry]] = {"point": PointEntry, "worker": WorkerEntry}


@dataclass
class Submission:
    """One submit or resubmit. Saved before the scheduler is asked, without job ids (the intent),
    and again with them: a submission without job ids was cut short (or is under way), and its
    jobs, if the scheduler took them, are found in submitit's files (submission.find_jobs)."""

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

    def job_ids(self) -> list[str]:
        """The newest job id of every entry that has one."""
        return [p.job_id for p in self.points if p.job_id]

    def cut_short(self) -> list[Submission]:
        """The submissions whose job ids were never recorded."""
        return [s for s in self.submissions if not s.job_ids]

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
    worker: str = ""  # the worker that trained it
    retry_of: int | None = None  # the failed trial it retried, if a retry


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
        data.pop("world_size", None)  # a study's ranks per trial, kept once: in resources (a record with it loads)
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

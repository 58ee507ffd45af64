"""The one place that goes beyond Optuna's public API: heartbeats for its journal storage, and
the trial ids (`Trial._trial_id`, `Study._study_id`) its storage methods take.

Optuna fails and retries the trials of dead workers through heartbeats (`fail_stale_trials`,
`RetryHeartbeatStaleTrialCallback`), but only `RDBStorage` (a database server, or SQLite, which
locks badly on shared file systems) implements its `BaseHeartbeat` interface; `JournalStorage`
with a file backend, which works on any shared file system, does not. `HeartbeatJournalStorage`
adds it: a heartbeat is a trial system attribute that changes at every beat (a count, never a
time: the nodes' clocks may disagree by minutes), and a trial is stale once a worker looking at it
has seen that attribute stay the same for `grace_s` by its own monotonic clock. A trial whose
worker was stopped for a requeue (its checkpoint written, its job coming back) is marked suspended
and never called stale, so a pre-empted trial is resumed by its own worker instead of being retried.

Its journal file (`SafeJournalFileBackend`) is appended whole lines or nothing, and a write that
fails (a full disk, a file system read-only for a moment) is tried again for up to `grace_s`, said
in one line when it starts failing and one when it works again (not tenacity: as for `ask_queue` in
commands.py, its last pause ends exactly at the limit and it speaks twice, which tenacity needs more code for).
The rest of cifar_dist/sweep/ passes Trial objects to the functions and methods below and
reads the system attributes it keeps (the worker, suspended) through them.

Tested with Optuna 5.1 (constraints.txt); pyproject.toml pins `>=4.9,<6` (the callback and its getter
have these names from 4.9 on).
tests/unit/test_search.py runs a stale trial through Optuna's own `fail_stale_trials` and the retry
callback against the installed Optuna, so a release that changes `BaseHeartbeat` fails there.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT = "cifar_dist:heartbeat"  # system attr: "<writer>:<count>", new at each beat of the trial's worker
SUSPENDED = "cifar_dist:suspended"  # system attr: true while the trial's worker waits for its requeue
WORKER = "cifar_dist:worker"  # system attr: the name of the worker that runs the trial
RETRIED_FROM = "failed_trial"  # system attr (Optuna's retry callback's): the number of the failed trial a retry retries


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (its number counts within the study; the storage wants this)."""
    return trial._trial_id


def running_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """The study's trial `number` as a Trial to report to and tell, as `study.ask()` returns one."""
    return optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


class SafeJournalFileBackend(JournalFileBackend):
    """Optuna's journal file, appended whole lines or nothing. A line cut short (a full disk, a
    writer killed mid-write) would make every line after it unreadable, so a failed append is cut
    back, and a torn last line left by a killed writer is cut off before the next append (under
    the journal's lock: no writer is at it then). An append that fails is tried again for up to
    `retry_for_s` seconds, with one line on stderr as it starts failing and one when it works again."""

    def __init__(self, path: str, retry_for_s: float) -> None:
        super().__init__(path)
        self.retry_for_s = retry_for_s

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode()
        start, pause, said = time.monotonic(), 0.5, False
        while True:
            try:
                self._append(data)
            except OSError as e:
                waited = time.monotonic() - start
                if waited >= self.retry_for_s:
                    raise
                if not said:
                    print(f"study journal {self._file_path}: cannot write ({e.strerror or e}); trying again for up to "
                          f"{self.retry_for_s:g} s", file=sys.stderr, flush=True)
                    said = True
                time.sleep(min(pause, self.retry_for_s - waited))
                pause = min(2 * pause, 5.0)
                continue
            if said:
                print(f"study journal {self._file_path}: written again after {time.monotonic() - start:.0f} s",
                      file=sys.stderr, flush=True)
            return

    def _append(self, data: bytes) -> None:
        with get_lock_file(self._lock):
            fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND)
            try:
                end = os.fstat(fd).st_size
                if end and os.pread(fd, 1, end - 1) != b"\n":  # a torn last line, never read by anyone
                    end = end - len(os.pread(fd, end, 0).rpartition(b"\n")[2])
                    os.ftruncate(fd, end)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, end)
                    raise
            finally:
                os.close(fd)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage whose running trials are failed (and retried, up to `max_retries`
    times) once a worker asking for trials has seen no heartbeat of theirs for `grace_s` seconds."""

    def __init__(self, path: str, *, heartbeat_s: int, grace_s: int, max_retries: int) -> None:
        super().__init__(SafeJournalFileBackend(path, retry_for_s=grace_s))
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
        self._writer, self._beats = uuid.uuid4().hex[:8], itertools.count()
        # trial id -> (its heartbeat attr, this process's monotonic time when it was first seen so)
        self._seen: dict[int, tuple[Any, float]] = {}

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT, f"{self._writer}:{next(self._beats)}")

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """The running trials whose heartbeat this process has seen unchanged for `grace_s` (its own
        monotonic clock: no other node's time is compared). A trial seen for the first time is
        never stale: a worker that starts looking gives every trial a full `grace_s`."""
        now, seen, stale = time.monotonic(), {}, []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if is_suspended(t):
                continue
            beat = t.system_attrs.get(HEARTBEAT)
            before = self._seen.get(trial_id(t))
            seen[trial_id(t)] = before if before is not None and before[0] == beat else (beat, now)
            if now - seen[trial_id(t)][1] > self.grace_s:
                stale.append(trial_id(t))
        self._seen = seen
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._retry

    # ---- a worker's trials, by Trial object

    def beat(self, trial: optuna.Trial) -> None:
        """The trial's worker is alive now."""
        self.record_heartbeat(trial_id(trial))

    def claim(self, trial: optuna.Trial, worker: str) -> None:
        """`worker` runs the trial from now on (a new one, or its own resumed after a requeue)."""
        self.beat(trial)
        self.set_trial_system_attr(trial_id(trial), SUSPENDED, False)
        self.set_trial_system_attr(trial_id(trial), WORKER, worker)

    def suspend(self, trial: optuna.Trial) -> None:
        """The trial waits for its worker's requeue (checkpoint written): never called stale meanwhile."""
        self.set_trial_system_attr(trial_id(trial), SUSPENDED, True)

    def frozen(self, trial: optuna.Trial) -> FrozenTrial:
        """The trial as the storage holds it now (state, value, params)."""
        return self.get_trial(trial_id(trial))


def is_suspended(trial: FrozenTrial) -> bool:
    return bool(trial.system_attrs.get(SUSPENDED))


def worker_of(trial: FrozenTrial) -> str:
    """The worker that runs or ran the trial, "" if none said so."""
    return trial.system_attrs.get(WORKER, "")


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's own: stale trials -> FAIL, then the retry callback enqueues each again (WAITING)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the failed trial this one retries, if it is a retry."""
    return trial.system_attrs.get(RETRIED_FROM)

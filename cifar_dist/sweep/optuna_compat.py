"""The one place that goes beyond Optuna's public API: heartbeats for its journal storage, and
the trial ids (`Trial._trial_id`, `Study._study_id`) its storage methods take.

Optuna fails and retries the trials of dead workers through heartbeats (`fail_stale_trials`,
`RetryHeartbeatStaleTrialCallback`), but only `RDBStorage` (a database server, or SQLite, which
locks badly on shared file systems) implements its `BaseHeartbeat` interface; `JournalStorage`
with a file backend, which works on any shared file system, does not. `HeartbeatJournalStorage`
adds it: a heartbeat is a trial system attribute holding the time, and a trial whose worker was
stopped for a requeue (its checkpoint written, its job coming back) is marked suspended and never
called stale, so a pre-empted trial is resumed by its own worker instead of being retried.
The rest of cifar_dist/sweep/ passes Trial objects to the functions and methods below and
reads the system attributes it keeps (the worker, suspended) through them.

Tested with Optuna 5.1 (constraints.txt); pyproject.toml pins `>=4.9,<6` (the callback and its getter
have these names from 4.9 on).
tests/unit/test_search.py runs a stale trial through Optuna's own `fail_stale_trials` and the retry
callback against the installed Optuna, so a release that changes `BaseHeartbeat` fails there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT = "cifar_dist:heartbeat"  # system attr: time.time() of the trial's worker's last heartbeat
SUSPENDED = "cifar_dist:suspended"  # system attr: true while the trial's worker waits for its requeue
WORKER = "cifar_dist:worker"  # system attr: the name of the worker that runs the trial


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (its number counts within the study; the storage wants this)."""
    return trial._trial_id


def running_trial(study: optuna.Study, number: int) -> optuna.Trial:
    """The study's trial `number` as a Trial to report to and tell, as `study.ask()` returns one."""
    return optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage whose running trials are failed (and retried, up to `max_retries`
    times) once no heartbeat has come for `grace_s` seconds."""

    def __init__(self, path: str, *, heartbeat_s: int, grace_s: int, max_retries: int) -> None:
        super().__init__(JournalFileBackend(path))
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [trial_id(t) for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if not is_suspended(t) and now - last_heard(t) > self.grace_s]

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


def last_heard(trial: FrozenTrial) -> float:
    """When the trial's worker was last heard of: its newest heartbeat, else the trial's start."""
    start = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return float(trial.system_attrs.get(HEARTBEAT, start))


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's own: stale trials -> FAIL, then the retry callback enqueues each again (WAITING)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retried_from(trial: FrozenTrial) -> int | None:
    """The number of the failed trial this one retries, if it is a retry."""
    return trial.system_attrs.get("failed_trial")

"""The one place that goes beyond Optuna's public API: heartbeats for its journal storage.

Optuna fails and retries the trials of dead workers through heartbeats (`fail_stale_trials`,
`RetryHeartbeatStaleTrialCallback`), but only `RDBStorage` (a database server, or SQLite, which
locks badly on shared file systems) implements its `BaseHeartbeat` interface; `JournalStorage`
with a file backend, which works on any shared file system, does not. `HeartbeatJournalStorage`
adds it: a heartbeat is a trial system attribute holding the time, and a trial whose worker was
stopped for a requeue (its checkpoint written, its job coming back) is marked suspended and never
called stale, so a pre-empted trial is resumed by its own worker instead of being retried.

Tested with Optuna 5.0; pyproject.toml pins `>=4.9,<6` (4.9 renamed the callback and its getter).
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


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage whose running trials are failed (and retried, up to `max_retries`
    times) once no heartbeat has come for `grace_s` seconds."""

    def __init__(self, path: str, heartbeat_s: int, grace_s: int, max_retries: int) -> None:
        super().__init__(JournalFileBackend(path))
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retries)

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if not t.system_attrs.get(SUSPENDED) and now - last_heard(t) > self.grace_s]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._retry


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

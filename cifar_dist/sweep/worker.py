"""A study's worker: one array task (every rank of it runs `SearchTask`) that trains trials until
the study (study.py) needs no more.

It loops on rank 0's decision:
1. its own unfinished trial first (a requeued worker resumes it exactly, from its checkpoints);
2. else, under a lock, Optuna fails the trials of dead workers (their heartbeat seen unchanged for
   `grace_s` by this worker's own clock) and queues their retries; the worker takes a queued retry,
   or asks a new trial while fewer than `trials` are complete, pruned, running or queued;
3. else, while another worker's trial is alive, it waits (that trial may still need a retry);
   otherwise the study needs nothing more and the worker ends.
It trains the trial with `train(cfg, on_eval)`: every evaluation is reported, and a pruned
trial stops at that step boundary (pruned.json says at which step and why). Then it tells the
study and asks again. A pre-emption checkpoints, marks the trial suspended (never called stale)
and requeues the worker; `cancel` leaves trials suspended, `resubmit --failed` resumes them.
A worker that stalled past `grace_s` (its trial failed and retried by another meanwhile) learns it
from its heartbeat, stops that trial at its next evaluation (trial.json: fail) and asks for another.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from cifar_dist.config import config_from_dict
from cifar_dist.rundir import PRUNED, RunDir, read_json, write_atomic
from cifar_dist.sweep.optuna_compat import HeartbeatJournalStorage, fail_stale_trials, is_suspended, retried_from, running_trial
from cifar_dist.sweep.points import point_config, values_text
from cifar_dist.sweep.record import TrialRecord, load_record, save_trial
from cifar_dist.sweep.states import DONE
from cifar_dist.sweep.study import BUDGET, checked_trials, load_study, open_storage, suggest, trial_dir, trial_name, worker_dir

CURRENT = "current.json"  # in a worker's folder: {"trial": number or null}
WAIT = "wait"  # rank 0's answer while other workers' trials are still alive
STALE = "failed by the study: no heartbeat for grace_s (a stalled worker); retried"


class Heartbeat:
    """A thread that says the worker of one trial at a time is alive, every `every_s` seconds. A
    beat the journal would not take (its own retries ran out) is said in one line and tried again
    at the next; the thread ends only when stopped, or when the study has failed its trial meanwhile
    (this worker was not heard of for grace_s: a stall): then `taken` is set, and the worker stops
    the trial at its next evaluation and asks for another."""

    def __init__(self, storage: HeartbeatJournalStorage, every_s: int):
        self.storage, self.every_s = storage, every_s
        self._stop: threading.Event | None = None
        self.taken = threading.Event()

    def start(self, trial: optuna.Trial) -> None:
        self.stop()
        stop = self._stop = threading.Event()
        taken = self.taken = threading.Event()
        name = trial_name(trial.number)

        def beat() -> None:
            while not stop.wait(self.every_s):
                try:
                    self.storage.beat(trial)
                except UpdateFinishedTrialError:
                    if not stop.is_set():  # not told by this worker: failed as stale
                        print(f"heartbeat: trial {name} was failed by the study while this worker was not heard of "
                              f"(grace_s); it stops at its next evaluation", file=sys.stderr, flush=True)
                        taken.set()
                    return
                except Exception as e:  # the next beat may get through: never end silently
                    print(f"heartbeat: trial {name}'s heartbeat not written ({type(e).__name__}: {e}); trying again "
                          f"in {self.every_s} s", file=sys.stderr, flush=True)

        threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}").start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None


class Worker:
    """Rank 0's side of a worker: the study, its current trial, its heartbeat, its reports."""

    def __init__(self, sweep_dir: Path, name: str):
        self.sweep_dir, self.name = sweep_dir, name
        self.record = load_record(sweep_dir)
        assert self.record.search is not None and self.record.base_config is not None, "not a study's record"
        self.search, self.base = self.record.search, self.record.base_config
        self.storage = open_storage(sweep_dir, self.search)
        self.folder = worker_dir(sweep_dir, name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trial: optuna.Trial | None = None  # the trial being trained
        self.heartbeat = Heartbeat(self.storage, self.search.heartbeat_s)

    # ---- choosing the next trial

    def next(self) -> dict[str, Any] | str | None:
        """{"number", "config"} of the trial to train next, WAIT, or None: the study needs nothing more."""
        while (number := self._current()) is not None:
            if order := self._resume(number):
                return order

        lock = JournalFileSymlinkLock(str(self.sweep_dir / BUDGET))  # asks one at a time: the count holds
        lock.acquire()
        try:
            study = load_study(self.sweep_dir, self.record, storage=self.storage)
            fail_stale_trials(study)
            trials = checked_trials(self.sweep_dir, study)  # a journal that lost trials would hand out their numbers again
            taken = sum(t.state.name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING") for t in trials)
            if taken < self.search.trials or any(t.state.name == "WAITING" for t in trials):
                # A fresh sampler seed per ask: every worker's sampler would otherwise draw the same values.
                return self._take(load_study(self.sweep_dir, self.record, storage=self.storage,
                                             seed=self.search.seed * 100_003 + len(trials)))
        finally:
            lock.release()
        alive = [t for t in trials if t.state.name == "RUNNING" and not is_suspended(t)]
        return WAIT if alive else None

    def _take(self, study: optuna.Study) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")  # we beat ourselves
            trial = study.ask()
        self.storage.claim(trial, self.name)
        try:
            suggest(trial, self.search)
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
        self._set_current(trial.number)
        return self._start(trial)

    def _resume(self, number: int) -> dict[str, Any] | None:
        """This worker's unfinished trial: resumed if still running; else (told already, or failed
        as stale while this worker was away and retried elsewhere) let go."""
        trial = running_trial(load_study(self.sweep_dir, self.record, storage=self.storage), number)
        try:
            if self.storage.frozen(trial).state == TrialState.RUNNING:
                self.storage.claim(trial, self.name)
                run = RunDir(trial_dir(self.sweep_dir, number))
                if ended := run.summary() or read_json(run / PRUNED):  # it ended before the study was told
                    self.trial = trial
                    self.ended(ended)
                    return None
                return self._start(trial)
        except UpdateFinishedTrialError:  # failed as stale just now: its retry is another worker's
            pass
        self._set_current(None)
        return None

    def _start(self, trial: optuna.Trial) -> dict[str, Any]:
        self.trial = trial
        self.heartbeat.start(trial)
        name = trial_name(trial.number)
        config = point_config(self.base, dict(trial.params), sweep=self.record.name, uid=self.record.uid, name=name,
                              run_dir=trial_dir(self.sweep_dir, trial.number), resources=self.record.resources,
                              submitted_from=Path(self.record.submitted_from),
                              where=f"trial {name} ({values_text(trial.params)})")
        print(f"{self.name}: trial {name} ({values_text(trial.params)})", flush=True)
        return {"number": trial.number, "config": config.to_dict()}

    # ---- during and after training

    def report(self, record: dict[str, Any]) -> str | None:
        """the loop's EvalHook: report the evaluation; the reason to stop when the pruner says so."""
        assert self.trial is not None
        if self.heartbeat.taken.is_set():
            return STALE
        value, epoch = record[self.search.metric], int(round(record["epoch"]))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is already reported")  # a resumed trial redoes an evaluation
                self.trial.report(value, epoch)
        except UpdateFinishedTrialError:
            return STALE
        if self.trial.should_prune():
            return f"pruned by {self.search.pruner} after epoch {epoch}: {self.search.metric} {value:.4f}"
        return None

    def ended(self, result: dict[str, Any]) -> None:
        """Tell the study how the trial ended (train's summary, with "pruned" if it was), and record it in its run dir."""
        pruned = "pruned" in result
        self._tell_study(TrialState.PRUNED if pruned else TrialState.COMPLETE, result["pruned"]["reason"] if pruned else "",
                   None if pruned else result[self.search.metric])

    def failed(self, why: str, state: TrialState = TrialState.FAIL) -> None:
        """The trial ended without a result: diverged (told as pruned: a hopeless value, a signal to the
        sampler) or an error (failed; the study asks another trial in its place)."""
        self._tell_study(state, why)

    def _tell_study(self, state: TrialState, note: str, value: float | None = None) -> None:
        assert self.trial is not None
        self.heartbeat.stop()
        # skip_if_finished: this worker stalled past grace_s and the study failed the trial (and
        # retried it) meanwhile; Optuna would raise ValueError ("Cannot tell a FAIL trial").
        frozen = self.trial.study.tell(self.trial, value, state=state, skip_if_finished=True)
        if frozen.state != state:
            state, note = frozen.state, STALE
        self._finish(state.name.lower(), note)

    def _finish(self, state: str, note: str) -> None:
        assert self.trial is not None
        frozen = self.storage.frozen(self.trial)
        run_dir = trial_dir(self.sweep_dir, self.trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_trial(run_dir, TrialRecord(number=frozen.number, state=state, value=frozen.value, metric=self.search.metric,
                                        params=frozen.params, note=note, label=values_text(frozen.params), worker=self.name,
                                        retry_of=retried_from(frozen)))
        self._set_current(None)
        self.trial = None

    def suspend(self) -> None:
        """Stopped for a requeue (checkpoint written): the trial waits for this worker, never called stale."""
        self.heartbeat.stop()
        if self.trial is not None:
            with contextlib.suppress(UpdateFinishedTrialError):  # failed as stale meanwhile: its retry is another's
                self.storage.suspend(self.trial)

    # ---- the worker's own file

    def _current(self) -> int | None:
        return (read_json(self.folder / CURRENT) or {}).get("trial")

    def _set_current(self, number: int | None) -> None:
        write_atomic(self.folder / CURRENT, json.dumps({"trial": number}))


def run_worker(sweep_dir: Path, name: str) -> dict[str, Any]:
    """Every rank of a worker: trials until the study needs no more. Raises `Stopped` on a signal
    (rank 0 has suspended its trial); returns {"status": DONE, "worker": name, "trials": [numbers trained]},
    which `status` reads as this worker done (states.py)."""
    # Here, not with the module: the sweep commands (status, wait, cancel) read studies without torch.
    from cifar_dist.distributed import Distributed, install_stop_handlers
    from cifar_dist.loop import NonFiniteLoss, Stopped
    from cifar_dist.train import train

    install_stop_handlers()
    record = load_record(sweep_dir)
    assert record.search is not None and record.base_config is not None, "not a study's record"
    dist = Distributed(record.base_config.train.device)
    worker = Worker(sweep_dir, name) if dist.is_main else None
    trained: list[int] = []
    try:
        while True:
            if dist.stop_requested():  # a stop signal reached a rank: all ranks stop here
                raise Stopped(f"worker {name}, between trials")
            order = dist.broadcast(dist.main_only(lambda: worker.next()))
            if order == WAIT:
                time.sleep(min(10, record.search.heartbeat_s))
                continue
            if order is None:
                return {"status": DONE, "worker": name, "trials": trained}
            try:  # every rank passes the hook (they all join its broadcast); rank 0's is called
                result = train(config_from_dict(order["config"]), on_eval=worker.report if worker else _ignore, dist=dist)
            except NonFiniteLoss as e:
                dist.main_only(lambda e=e: worker.failed(f"diverged: {e}", TrialState.PRUNED))
            except Stopped:
                dist.main_only(lambda: worker.suspend())
                raise
            except Exception as e:  # the trial fails (not retried: an error would recur); the worker with it
                if worker is not None and worker.trial is not None:
                    worker.failed(f"{type(e).__name__}: {e}")
                raise
            else:
                dist.main_only(lambda result=result: worker.ended(result))
            trained.append(order["number"])
    finally:
        dist.close()


def _ignore(record: dict[str, Any]) -> None:
    return None

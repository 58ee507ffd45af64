"""Hyperparameter search: an Optuna study in the sweep dir, run by Slurm array tasks ("workers").

    <sweep dir>/study.journal       the study: Optuna's journal file (no database server; works on a
                                    shared file system; opens in optuna-dashboard)
    <sweep dir>/runs/<trial>/       each trial's run dir, fixed when the trial is asked; trial.json
                                    when it ends (state, value, params), pruned.json if it was pruned
    <sweep dir>/workers/<worker>/   a worker's folder; current.json names its unfinished trial
    <sweep dir>/budget.lock         held (Optuna's symlink lock on the shared file system) by the
                                    worker asking a trial, so that the study never overshoots `trials`

Each worker (one array task: every rank of it runs `SearchTask`) loops on rank 0's decision:
1. its own unfinished trial first (a requeued worker resumes it exactly, from its checkpoints);
2. else, under a lock, Optuna fails the trials of dead workers (no heartbeat for `grace_s`) and
   queues their retries; the worker takes a queued retry, or asks a new trial while fewer than
   `trials` are complete, pruned, running or queued;
3. else, while another worker's trial is alive, it waits (that trial may still need a retry);
   otherwise the study needs nothing more and the worker ends.
It trains the trial with `train(cfg, on_eval)`: every evaluation is reported, and a pruned
trial stops at that step boundary (pruned.json says at which step and why). Then it tells the
study and asks again. A pre-emption checkpoints, marks the trial suspended (never called stale)
and requeues the worker; `cancel` leaves trials suspended, `resubmit --failed` resumes them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages.journal import JournalFileSymlinkLock
from optuna.trial import TrialState

from cifar_dist.config import Config, config_from_dict
from cifar_dist.rundir import PRUNED, RunDir, read_json, write_atomic
from cifar_dist.sweep.optuna_compat import SUSPENDED, HeartbeatJournalStorage, fail_stale_trials, retried_from
from cifar_dist.sweep.record import DONE, PointState, SweepRecord, TrialRecord, WorkerEntry, load_record, load_trial, save_trial
from cifar_dist.sweep.spec import Search, Spec, base_config, describe, point_config
from cifar_dist.tables import format_table

JOURNAL = "study.journal"
WORKERS = "workers"
RUNS = "runs"  # the trials' run dirs, as a sweep's points' (spec.make_points)
BUDGET = "budget"  # Optuna's JournalFileSymlinkLock adds ".lock"
CURRENT = "current.json"  # in a worker's folder: {"trial": number or null}
WAIT = "wait"  # rank 0's answer while other workers' trials are still alive
WORKER_ATTR = "cifar_dist:worker"  # trial system attr: the worker that runs it
STALE = "failed by the study: no heartbeat for grace_s (a stalled worker); retried"
optuna.logging.set_verbosity(logging.WARNING)  # not a line per trial: the workers' logs say more


# ---------------------------------------------------------------------------- submit time


def make_workers(first: int, n: int) -> list[WorkerEntry]:
    """Workers w<first>..: the sweep record's entries."""
    return [WorkerEntry(name=f"w{i}") for i in range(first, first + n)]


def worker_dir(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / WORKERS / name


def trial_dir(sweep_dir: Path, number: int) -> Path:
    """A trial's run dir, fixed when the trial is asked."""
    return sweep_dir / RUNS / trial_name(number)


def study_base_config(spec: Spec, sweep_dir: Path, uid: str) -> Config:
    """The config every trial of the study starts from, kept in the sweep record. Each parameter's
    extremes (and every choice) are applied to it as the first trial's and validated first, so a
    range that makes an invalid config is refused before anything is submitted."""
    assert spec.search is not None
    base = base_config(spec)
    for key, d in spec.search.distributions.items():
        for value in d.args:
            point_config(base, {key: value}, sweep=spec.name, uid=uid, name=trial_name(0), run_dir=trial_dir(sweep_dir, 0),
                         resources=spec.resources, submitted_from=Path.cwd(), where=f"search.params: {key}={value}")
    return base


def create_study(sweep_dir: Path, record: SweepRecord) -> None:
    assert record.search is not None
    optuna.create_study(study_name=record.name, storage=_storage(sweep_dir, record.search),
                        direction=record.search.direction)


def describe_search(s: Search) -> str:
    params = ", ".join(f"{k}: {json.dumps(v)}" for k, v in s.params.items())
    return (f"study: {s.trials} trials, {s.metric} ({s.direction}d), sampler {s.sampler}, pruner {s.pruner} "
            f"(after {s.min_epochs} epoch(s)); params {params}")


# ---------------------------------------------------------------------------- the study


def _storage(sweep_dir: Path, search: Search) -> HeartbeatJournalStorage:
    return HeartbeatJournalStorage(str(sweep_dir / JOURNAL), search.heartbeat_s, search.grace_s, search.max_retries)


def _sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler == "grid":
        return optuna.samplers.GridSampler({k: d.args for k, d in search.distributions.items()}, seed=seed)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna's default of 10 random start-up trials, fewer in a small study; constant_liar: trials
    # running on other workers count as pending, so concurrent workers do not ask the same values.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, search.trials // 3)),
                                      constant_liar=True)


def _pruner(search: Search, max_epochs: int) -> optuna.pruners.BasePruner:
    p, low, rf = search.pruner, search.min_epochs, search.reduction_factor
    if p == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=rf)
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=max_epochs, reduction_factor=rf)
    if p == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=low - 1)
    return optuna.pruners.NopPruner()


def load_study(sweep_dir: Path, record: SweepRecord, storage: HeartbeatJournalStorage | None = None,
               seed: int = 0) -> optuna.Study:
    search, base = record.search, record.base_config
    assert search is not None and base is not None, "not a study's record"
    return optuna.load_study(study_name=record.name, storage=storage or _storage(sweep_dir, search),
                             sampler=_sampler(search, seed), pruner=_pruner(search, base.train.epochs))


def trial_name(number: int) -> str:
    return f"{number:03d}"


def suggest(trial: optuna.Trial, search: Search) -> None:
    """Give the trial its values: drawn by the sampler, or fixed (a retry keeps its failed trial's)."""
    for key, d in search.distributions.items():
        if d.kind == "choice":
            trial.suggest_categorical(key, d.args)
        elif d.kind == "int":
            trial.suggest_int(key, *d.args)
        else:
            trial.suggest_float(key, *d.args, log=d.kind == "loguniform")


# ---------------------------------------------------------------------------- the worker (rank 0)


class Worker:
    """Rank 0's side of a worker: the study, its current trial, its heartbeat, its reports."""

    def __init__(self, sweep_dir: Path, name: str):
        self.sweep_dir, self.name = sweep_dir, name
        self.record = load_record(sweep_dir)
        assert self.record.search is not None, "not a study's record"
        self.search = self.record.search
        self.storage = _storage(sweep_dir, self.search)
        self.folder = worker_dir(sweep_dir, name)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.trial: Any = None  # the optuna Trial being trained
        self.heartbeat: threading.Event | None = None

    # ---- choosing the next trial

    def next(self) -> dict[str, Any] | str | None:
        """{"number", "config"} of the trial to train next, WAIT, or None: the study needs nothing more."""
        while (number := self._current()) is not None:
            if order := self._resume(number):
                return order

        lock = JournalFileSymlinkLock(str(self.sweep_dir / BUDGET))  # asks one at a time: the count holds
        lock.acquire()
        try:
            study = load_study(self.sweep_dir, self.record, self.storage)
            fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            taken = sum(t.state.name in ("COMPLETE", "PRUNED", "RUNNING", "WAITING") for t in trials)
            if taken < self.search.trials or any(t.state.name == "WAITING" for t in trials):
                # A fresh sampler seed per ask: every worker's sampler would otherwise draw the same values.
                return self._take(load_study(self.sweep_dir, self.record, self.storage,
                                             self.search.seed * 100_003 + len(trials)))
        finally:
            lock.release()
        alive = [t for t in trials if t.state.name == "RUNNING" and not t.system_attrs.get(SUSPENDED)]
        return WAIT if alive else None

    def _take(self, study: Any) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")  # we beat ourselves
            trial = study.ask()
        self.storage.record_heartbeat(trial._trial_id)
        self.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.name)
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
        study = load_study(self.sweep_dir, self.record, self.storage)
        trial = optuna.trial.Trial(study, self.storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        try:
            if self.storage.get_trial(trial._trial_id).state == TrialState.RUNNING:
                self.storage.record_heartbeat(trial._trial_id)
                self.storage.set_trial_system_attr(trial._trial_id, SUSPENDED, False)
                self.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, self.name)
                run = RunDir(trial_dir(self.sweep_dir, number))
                if ended := run.summary() or read_json(run / PRUNED):  # it ended before the study was told
                    self.trial = trial
                    self.told(ended)
                    return None
                return self._start(trial)
        except UpdateFinishedTrialError:  # failed as stale just now: its retry is another worker's
            pass
        self._set_current(None)
        return None

    def _start(self, trial: Any) -> dict[str, Any]:
        self.trial = trial
        self._beat(trial._trial_id)
        name = trial_name(trial.number)
        assert self.record.base_config is not None
        config = point_config(self.record.base_config, dict(trial.params), sweep=self.record.name, uid=self.record.uid,
                              name=name, run_dir=trial_dir(self.sweep_dir, trial.number), resources=self.record.resources,
                              submitted_from=Path(self.record.submitted_from), where=f"trial {name} ({describe(trial.params)})")
        print(f"{self.name}: trial {name} ({describe(trial.params)})", flush=True)
        return {"number": trial.number, "config": config.to_dict()}

    # ---- during and after training

    def report(self, record: dict[str, Any]) -> str | None:
        """train's EvalHook: report the evaluation; the reason to stop when the pruner says so."""
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

    def told(self, result: dict[str, Any]) -> None:
        """Tell the study how the trial ended (train's summary, with "pruned" if it was), and record it in its run dir."""
        pruned = "pruned" in result
        self._tell(TrialState.PRUNED if pruned else TrialState.COMPLETE, result["pruned"]["reason"] if pruned else "",
                   None if pruned else result[self.search.metric])

    def failed(self, why: str, state: TrialState = TrialState.FAIL) -> None:
        """The trial ended without a result: diverged (told as pruned: a hopeless value, a signal to the
        sampler) or an error (failed; the study asks another trial in its place)."""
        self._tell(state, why)

    def _tell(self, state: TrialState, note: str, value: float | None = None) -> None:
        self._stop_beat()
        try:
            self.trial.study.tell(self.trial, value, state=state)
        except UpdateFinishedTrialError:  # this worker stalled past grace_s: the study failed the trial and retried it
            state, note = TrialState.FAIL, STALE
        self._finish(state.name.lower(), note)

    def _finish(self, state: str, note: str) -> None:
        frozen = self.storage.get_trial(self.trial._trial_id)
        run_dir = trial_dir(self.sweep_dir, self.trial.number)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_trial(run_dir, TrialRecord(number=frozen.number, state=state, value=frozen.value, metric=self.search.metric,
                                        params=frozen.params, note=note, label=describe(frozen.params)))
        self._set_current(None)
        self.trial = None

    def suspend(self) -> None:
        """Stopped for a requeue (checkpoint written): the trial waits for this worker, never called stale."""
        self._stop_beat()
        if self.trial is not None:
            self.storage.set_trial_system_attr(self.trial._trial_id, SUSPENDED, True)

    # ---- the worker's own files and heartbeat

    def _current(self) -> int | None:
        return (read_json(self.folder / CURRENT) or {}).get("trial")

    def _set_current(self, number: int | None) -> None:
        write_atomic(self.folder / CURRENT, json.dumps({"trial": number}))

    def _beat(self, trial_id: int) -> None:
        """A heartbeat thread for the trial: it says this worker is alive every heartbeat_s seconds."""
        self._stop_beat()
        stop = self.heartbeat = threading.Event()

        def beat() -> None:
            while not stop.wait(self.search.heartbeat_s):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # the trial was failed as stale meanwhile (a long stall): nothing left to keep alive
                    return

        threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial_id}").start()

    def _stop_beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.set()
            self.heartbeat = None


def run_worker(sweep_dir: Path, name: str) -> dict[str, Any]:
    """Every rank of a worker: trials until the study needs no more. Raises `Stopped` on a signal
    (rank 0 has suspended its trial); returns {"status": DONE, "worker": name, "trials": [numbers trained]},
    which `status` reads as this worker done (record.py)."""
    # Here, not with the module: the sweep commands (status, wait, cancel) read studies without torch.
    from cifar_dist.distributed import Distributed, install_stop_handlers
    from cifar_dist.train import NonFiniteLoss, Stopped, train

    install_stop_handlers()
    record = load_record(sweep_dir)
    assert record.search is not None and record.base_config is not None, "not a study's record"
    dist = Distributed(record.base_config.train.device)
    worker = Worker(sweep_dir, name) if dist.is_main else None
    trained: list[int] = []
    try:
        while True:
            if dist.agree(False)[0]:
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
                dist.main_only(lambda result=result: worker.told(result))
            trained.append(order["number"])
    finally:
        dist.close()


def _ignore(record: dict[str, Any]) -> None:
    return None


# ---------------------------------------------------------------------------- status


def trial_table(sweep_dir: Path, record: SweepRecord, workers: list[PointState]) -> dict[str, Any]:
    """Every trial's state, epochs and result; epochs trained in all; the best trial."""
    assert record.search is not None, "not a study's record"
    study = load_study(sweep_dir, record)
    metric = record.search.metric
    ended = {w.name: w.state for w in workers if w.state not in ("pending", "running", "requeued")}
    rows = []
    for t in study.get_trials(deepcopy=False):
        state = t.state.name.lower()
        worker = t.system_attrs.get(WORKER_ATTR, "")
        note = ended_trial.note if (ended_trial := load_trial(trial_dir(sweep_dir, t.number))) else ""
        if state == "running" and t.system_attrs.get(SUSPENDED):
            state = "suspended"
            note = f"checkpointed; worker {worker} {ended.get(worker, 'requeued')}" + (
                ": resubmit --failed resumes it" if worker in ended else "")
        elif state == "running" and worker in ended:
            note = f"worker {worker} {ended[worker]}: without its heartbeat the study fails and retries this trial"
        if (origin := retried_from(t)) is not None:
            note = f"retry of {trial_name(origin)}" + (f"; {note}" if note else "")
        rows.append({"trial": trial_name(t.number), "state": state, "epochs": _epochs(sweep_dir, t.number),
                     metric: t.value if t.state.name == "COMPLETE" else _last(t), "worker": worker,
                     "values": describe(t.params), "note": note})
    done = [r for r in rows if r["state"] == "complete"]
    sign = 1 if record.search.direction == "maximize" else -1
    best = max(done, key=lambda r: sign * r[metric]) if done else None
    return {"trials": rows, "epochs": round(sum(r["epochs"] for r in rows), 2), "best": best,
            "wanted": record.search.trials}


def _last(trial: Any) -> float | None:
    return trial.intermediate_values[trial.last_step] if trial.last_step is not None else None


def _epochs(sweep_dir: Path, number: int) -> float:
    return RunDir(trial_dir(sweep_dir, number)).epochs_trained()


def status_text(table: dict[str, Any], metric: str) -> str:
    counts: dict[str, int] = {}
    for r in table["trials"]:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    head = (f"trials: {table['wanted']} wanted; " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + f"; {table['epochs']:g} epochs trained")
    best = table["best"]
    head += (f"\nbest: trial {best['trial']}, {metric} {best[metric]:.4f} ({best['values']})" if best
             else "\nbest: none complete yet")
    rows = [[r["trial"], r["state"], f"{r['epochs']:g}", "-" if r[metric] is None else f"{r[metric]:.4f}", r["worker"],
             r["values"], r["note"]] for r in table["trials"]]
    return head + "\n" + format_table(rows, ["trial", "state", "epochs", metric, "worker", "values", "note"])


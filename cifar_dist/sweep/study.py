"""Hyperparameter search: an Optuna study in the sweep dir, run by Slurm array tasks ("workers", worker.py).

    <sweep dir>/study.journal       the study: Optuna's journal file (no database server; works on a
                                    shared file system; opens in optuna-dashboard)
    <sweep dir>/runs/<trial>/       each trial's run dir, fixed when the trial is asked; trial.json
                                    when it ends (record.TrialRecord), pruned.json if it was pruned
    <sweep dir>/workers/<worker>/   a worker's folder; current.json names its unfinished trial
    <sweep dir>/budget.lock         held (Optuna's symlink lock on the shared file system) by the
                                    worker asking a trial, so that the study never overshoots `trials`

This module makes the study at submit time, opens it with its sampler and pruner, and reads it
back for `status`: every trial's state, epochs and result, and the best trial. A journal that cannot
be read, or that lost trials its run dirs show (journal.py), is one line naming `repair`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import optuna

from cifar_dist.config import Config
from cifar_dist.errors import UserError
from cifar_dist.rundir import TRIAL, RunDir
from cifar_dist.sweep.optuna_compat import HeartbeatJournalStorage, is_suspended, retried_from, worker_of
from cifar_dist.sweep.points import base_config, point_config, values_text
from cifar_dist.sweep.record import SweepRecord, WorkerEntry, load_trial
from cifar_dist.sweep.spec import Search, Spec
from cifar_dist.sweep.states import ACTIVE, PointState
from cifar_dist.sweep.sweepdir import RUNS, run_dir
from cifar_dist.tables import format_table

JOURNAL = "study.journal"
WORKERS = "workers"
BUDGET = "budget"  # Optuna's JournalFileSymlinkLock adds ".lock"
optuna.logging.set_verbosity(logging.WARNING)  # not a line per trial: the workers' logs say more


class JournalError(UserError):
    """The study journal cannot be read, or holds fewer trials than the trials' own records show."""

    def __init__(self, sweep_dir: Path, problem: str):
        self.problem = problem
        super().__init__(f"{sweep_dir / JOURNAL}: {problem}; `python jobs/submit.py repair {sweep_dir}` rebuilds it "
                         "from the trials' records")


# ---------------------------------------------------------------------------- submit time


def make_workers(first: int, n: int) -> list[WorkerEntry]:
    """Workers w<first>..: the sweep record's entries."""
    return [WorkerEntry(name=f"w{i}") for i in range(first, first + n)]


def worker_dir(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / WORKERS / name


def trial_name(number: int) -> str:
    return f"{number:03d}"


def trial_dir(sweep_dir: Path, number: int) -> Path:
    """A trial's run dir, fixed when the trial is asked."""
    return run_dir(sweep_dir, trial_name(number))


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
    assert record.search is not None, "not a study's record"
    optuna.create_study(study_name=record.name, storage=open_storage(sweep_dir, record.search),
                        direction=record.search.direction)


def describe_search(s: Search) -> str:
    params = ", ".join(f"{k}: {json.dumps(v)}" for k, v in (s.params or {}).items())
    return (f"study: {s.trials} trials, {s.metric} ({s.direction}d), sampler {s.sampler}, pruner {s.pruner} "
            f"(after {s.min_epochs} epoch(s)); params {params}")


# ---------------------------------------------------------------------------- the study


def open_storage(sweep_dir: Path, search: Search, name: str = JOURNAL) -> HeartbeatJournalStorage:
    return HeartbeatJournalStorage(str(sweep_dir / name), heartbeat_s=search.heartbeat_s, grace_s=search.grace_s,
                                   max_retries=search.max_retries)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its `study.stop()` once the last grid point is told: that
    works only inside `study.optimize` (a RuntimeError in a worker, which asks and tells), and the
    workers' own count of trials already ends the study."""

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: optuna.trial.TrialState,
                    values: Any) -> None:
        return None


def _sampler(search: Search, seed: int) -> optuna.samplers.BaseSampler:
    if search.sampler == "grid":
        return _GridSampler({k: d.args for k, d in search.distributions.items()}, seed=seed)
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


def load_study(sweep_dir: Path, record: SweepRecord, *, storage: HeartbeatJournalStorage | None = None,
               seed: int = 0) -> optuna.Study:
    """The study with its sampler (seeded with `seed`) and pruner; `storage`: an open one to share."""
    search, base = record.search, record.base_config
    assert search is not None and base is not None, "not a study's record"
    try:
        return optuna.load_study(study_name=record.name, storage=storage or open_storage(sweep_dir, search),
                                 sampler=_sampler(search, seed), pruner=_pruner(search, base.train.epochs))
    except (KeyError, ValueError) as e:  # empty (no study in it), or a line that is not JSON
        raise JournalError(sweep_dir, f"damaged, no readable study in it ({type(e).__name__}: {e})") from None


def trials_on_disk(sweep_dir: Path) -> list[int]:
    """The numbers of the trials that have a run dir (made once the trial was asked)."""
    runs = sweep_dir / RUNS
    return sorted(int(d.name) for d in runs.iterdir() if d.name.isdigit()) if runs.is_dir() else []


def checked_trials(sweep_dir: Path, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, checked against their run dirs: a run dir the journal does not know, or
    a trial.json of a trial it shows unfinished, means the journal lost lines (JournalError). The
    run dirs are read first: a worker writes the journal before either."""
    numbers = trials_on_disk(sweep_dir)
    ended = {n: t.state for n in numbers if (t := load_trial(trial_dir(sweep_dir, n)))}
    trials = study.get_trials(deepcopy=False)
    if unknown := [n for n in numbers if n >= len(trials)]:
        raise JournalError(sweep_dir, f"truncated: it holds {len(trials)} trial(s), but runs/ holds trial(s) "
                                      f"{_some(unknown)}")
    if untold := [t for t in trials if t.number in ended and not t.state.is_finished()]:
        t = untold[0]
        raise JournalError(sweep_dir, f"truncated: trial {trial_name(t.number)} ended ({ended[t.number]}, its "
                                      f"{TRIAL}) but the journal still has it {t.state.name.lower()}")
    return trials


def all_ended(sweep_dir: Path, record: SweepRecord) -> bool:
    """Whether a study has its trials: `trials` of them complete or pruned (a worker killed on the
    way, whose trial was retried by another, lost nothing of it)."""
    if record.search is None:
        return False
    trials = checked_trials(sweep_dir, load_study(sweep_dir, record))
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) >= record.search.trials


def _some(numbers: list[int], shown: int = 3) -> str:
    names = ", ".join(trial_name(n) for n in numbers[:shown])
    return names + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")


def suggest(trial: optuna.Trial, search: Search) -> None:
    """Give the trial its values: drawn by the sampler, or fixed (a retry keeps its failed trial's)."""
    for key, d in search.distributions.items():
        if d.kind == "choice":
            trial.suggest_categorical(key, d.args)
        elif d.kind == "int":
            trial.suggest_int(key, *d.args)
        else:
            trial.suggest_float(key, *d.args, log=d.kind == "loguniform")


# ---------------------------------------------------------------------------- status


def trial_table(sweep_dir: Path, record: SweepRecord, workers: list[PointState]) -> dict[str, Any]:
    """Every trial's state, epochs and result; epochs trained in all; the best trial."""
    assert record.search is not None, "not a study's record"
    metric = record.search.metric
    ended = {w.name: w.state for w in workers if w.state not in ACTIVE}
    rows = []
    for t in checked_trials(sweep_dir, load_study(sweep_dir, record)):
        state, note = _trial_state(sweep_dir, t, ended)
        rows.append({"trial": trial_name(t.number), "state": state, "epochs": _epochs(sweep_dir, t.number),
                     metric: t.value if t.state.name == "COMPLETE" else _last(t), "worker": worker_of(t),
                     "values": values_text(t.params), "note": note})
    done = [r for r in rows if r["state"] == "complete"]
    sign = 1 if record.search.direction == "maximize" else -1
    best = max(done, key=lambda r: sign * r[metric]) if done else None
    return {"trials": rows, "epochs": round(sum(r["epochs"] for r in rows), 2), "best": best,
            "wanted": record.search.trials}


def _trial_state(sweep_dir: Path, t: optuna.trial.FrozenTrial, ended: dict[str, str]) -> tuple[str, str]:
    """(state, note) of a trial; `ended`: the state of every worker no longer queued or running."""
    state, worker = t.state.name.lower(), worker_of(t)
    note = ended_trial.note if (ended_trial := load_trial(trial_dir(sweep_dir, t.number))) else ""
    if state == "running" and is_suspended(t):
        state = "suspended"
        note = f"checkpointed; worker {worker} {ended.get(worker, 'requeued')}" + (
            ": resubmit --failed resumes it" if worker in ended else "")
    elif state == "running" and worker in ended:
        note = f"worker {worker} {ended[worker]}: without its heartbeat the study fails and retries this trial"
    if (origin := retried_from(t)) is not None:
        note = f"retry of {trial_name(origin)}" + (f"; {note}" if note else "")
    return state, note


def _last(trial: optuna.trial.FrozenTrial) -> float | None:
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

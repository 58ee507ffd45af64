"""Rebuilding a study's journal from the trials' own records (`python jobs/submit.py repair`).

A journal that cannot be read, or that lost lines (a file restored from an older copy, a disk that
dropped its tail), is found by study.checked_trials; every trial it held also left a run dir, and an
ended one its trial.json. The new journal holds, in trial-number order:
- the old journal's trials, as far as its lines can be read;
- over them, every trial that ended by its trial.json (state, value, values), with the evaluations
  of its metrics.jsonl where the journal no longer has them (the pruner compares them);
- a trial known by its run dir alone (it was training): suspended for the worker whose current.json
  names it (`resubmit --failed` resumes it from its checkpoints), else failed, so that the study asks
  another in its place.
The old journal is kept beside it (study.journal.damaged-<time>).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from cifar_dist import schema
from cifar_dist.errors import ConfigError
from cifar_dist.rundir import CONFIG, RunDir, read_json
from cifar_dist.sweep.optuna_compat import RETRIED_FROM, SUSPENDED, WORKER
from cifar_dist.sweep.record import SweepRecord, TrialRecord, load_trial
from cifar_dist.sweep.spec import Distribution, Search
from cifar_dist.sweep.study import JOURNAL, WORKERS, open_storage, trial_dir, trials_on_disk
from cifar_dist.sweep.worker import CURRENT


def rebuild(sweep_dir: Path, record: SweepRecord) -> str:
    """Write the study's journal anew from what can be read of it and the trials' records; what was done, in a line."""
    search = record.search
    assert search is not None, "not a study's record"
    old = readable_trials(sweep_dir, record)
    on_disk = trials_on_disk(sweep_dir)
    waiting = _current_trials(sweep_dir)
    new_path = sweep_dir / f".{JOURNAL}.rebuilt"
    new_path.unlink(missing_ok=True)
    study = optuna.create_study(study_name=record.name, storage=open_storage(new_path.parent, search, new_path.name),
                                direction=search.direction)
    counts = {"from the journal": 0, "from their trial.json": 0, "from their run dir alone": 0}
    for number in range(max([len(old), *(n + 1 for n in on_disk)])):
        held = old[number] if number < len(old) else None
        ended = load_trial(trial_dir(sweep_dir, number))
        if ended is not None and (held is None or not held.state.is_finished()):
            study.add_trial(_ended_trial(sweep_dir, number, search, ended, held))
            counts["from their trial.json"] += 1
        elif held is not None:
            study.add_trial(held)
            counts["from the journal"] += 1
        else:
            study.add_trial(_unrecorded_trial(sweep_dir, number, search, waiting.get(number)))
            counts["from their run dir alone"] += 1
    journal = sweep_dir / JOURNAL
    kept = journal.with_name(f"{JOURNAL}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    if journal.exists():
        journal.rename(kept)
    new_path.rename(journal)
    done = ", ".join(f"{n} {how}" for how, n in counts.items() if n)
    return (f"{JOURNAL} rebuilt with {sum(counts.values())} trial(s) ({done or 'none'})"
            + (f"; the old one kept as {kept.name}" if kept.exists() else ""))


def readable_trials(sweep_dir: Path, record: SweepRecord) -> list[FrozenTrial]:
    """The journal's trials as far as its lines can be read (a copy up to the first line that is
    not whole JSON); none if not even the study's creation can be."""
    whole = []
    path = sweep_dir / JOURNAL
    for line in (path.read_bytes() if path.exists() else b"").splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("a torn line")
            json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            break
        whole.append(line)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / JOURNAL
        copy.write_bytes(b"".join(whole))
        try:
            return optuna.load_study(study_name=record.name, storage=open_storage(copy.parent, record.search)).get_trials()
        except (KeyError, ValueError):
            return []


def _ended_trial(sweep_dir: Path, number: int, search: Search, ended: TrialRecord, held: FrozenTrial | None) -> FrozenTrial:
    state = TrialState[ended.state.upper()]
    attrs = held.system_attrs if held else {WORKER: ended.worker, **({} if ended.retry_of is None else
                                                                       {RETRIED_FROM: ended.retry_of})}
    return create_trial(state=state, value=ended.value if state == TrialState.COMPLETE else None, params=ended.params,
                        distributions=_distributions(search, ended.params),
                        intermediate_values=held.intermediate_values if held else _evaluations(sweep_dir, number, search),
                        system_attrs=attrs)


def _unrecorded_trial(sweep_dir: Path, number: int, search: Search, worker: str | None) -> FrozenTrial:
    params = _params(sweep_dir, number, search)
    attrs = {WORKER: worker, SUSPENDED: True} if worker else {}
    return create_trial(state=TrialState.RUNNING if worker else TrialState.FAIL, params=params,
                        distributions=_distributions(search, params),
                        intermediate_values=_evaluations(sweep_dir, number, search), system_attrs=attrs)


def _distributions(search: Search, params: dict[str, Any]) -> dict[str, BaseDistribution]:
    return {key: _distribution(search.distributions[key]) for key in params if key in search.distributions}


def _distribution(d: Distribution) -> BaseDistribution:
    """The Optuna distribution of a search parameter, as study.suggest asks it."""
    if d.kind == "choice":
        return CategoricalDistribution(d.args)
    if d.kind == "int":
        return IntDistribution(*d.args)
    return FloatDistribution(*d.args, log=d.kind == "loguniform")


def _evaluations(sweep_dir: Path, number: int, search: Search) -> dict[int, float]:
    """{epoch: the metric} of the trial's evaluations, as its worker reported them."""
    return {int(round(r["epoch"])): r[search.metric] for r in RunDir(trial_dir(sweep_dir, number)).metrics()
            if search.metric in r and "epoch" in r}


def _params(sweep_dir: Path, number: int, search: Search) -> dict[str, Any]:
    """The trial's values, read back from its run dir's config.yaml (none if it has none)."""
    try:
        config = schema.read_yaml_mapping(trial_dir(sweep_dir, number) / CONFIG, "run config")
    except ConfigError:
        return {}
    params = {}
    for key in search.distributions:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            params[key] = value
    return params


def _current_trials(sweep_dir: Path) -> dict[int, str]:
    """{trial number: worker} of each worker's unfinished trial (its current.json)."""
    found = {}
    for folder in sorted((sweep_dir / WORKERS).glob("*")):
        number = (read_json(folder / CURRENT) or {}).get("trial")
        if isinstance(number, int):
            found[number] = folder.name
    return found

"""Search (#18) in-process: the spec's `search:` block and its mistakes, a study's dry run, train's
evaluation hook, Optuna's heartbeat and retry on the journal file storage. Studies end to end on the
local executor: tests/e2e/test_search.py; on Slurm: tests/slurm/test_search_slurm.py. optuna-dashboard
in a browser is slurm/check_dashboard.py (it needs chromium and optuna-dashboard, which the project
does not install)."""


from __future__ import annotations

import time

import optuna
import pytest

from cifar_dist.config import load_config
from cifar_dist.rundir import PRUNED, SUMMARY, RunDir, read_json
from cifar_dist.sweep import commands
from cifar_dist.sweep.optuna_compat import HEARTBEAT, SUSPENDED, HeartbeatJournalStorage, fail_stale_trials, trial_id
from cifar_dist.sweep.spec import load_spec
from cifar_dist.train import train
from tests.helpers import TINY
from tests.helpers.search import STEPS_PER_EPOCH, search_spec

# ---------------------------------------------------------------------------- the spec


def test_search_block_reads_with_defaults(tmp_path):
    spec = load_spec(search_spec(tmp_path / "s.yaml", "s", {"workers": 2, "sampler": "random"}))
    s = spec.search
    assert (s.trials, s.workers, s.metric, s.direction, s.sampler, s.pruner) == (4, 2, "test_accuracy", "maximize",
                                                                                 "random", "asha")
    assert s.params == {"train.lr": {"loguniform": [1e-4, 0.5]}}, "1e-4 as written, a number"
    assert (s.distributions["train.lr"].kind, s.distributions["train.lr"].args) == ("loguniform", [1e-4, 0.5])
    assert spec.grid == {} and spec.random is None


@pytest.mark.parametrize(("search", "top", "message"), [
    ({"trials": None}, {}, "search.trials: missing"),
    ({"trails": 3}, {}, "search.trails: unknown key"),
    ({"sampler": "cmaes"}, {}, "search.sampler: must be one of tpe, random, grid, got 'cmaes'"),
    ({"pruner": "asha2"}, {}, "search.pruner: must be one of asha, hyperband, median, none"),
    ({"metric": "train_loss"}, {}, "search.metric: must be one of test_accuracy, test_loss"),
    ({"workers": 0}, {}, "search.workers: must be >= 1, got 0"),
    ({"workers": 100000, "trials": 2}, {}, "search.workers: 100000 workers for 2 trials; a worker trains one trial at a "
                                           "time, so give at most as many workers as trials"),
    ({"params": {}}, {}, "search.params: empty"),
    ({"params": {"train.lr": {"normal": [0, 1]}}}, {}, "search.params.train.lr: unknown distribution 'normal'"),
    ({"sampler": "grid"}, {}, "search.params.train.lr: the grid sampler takes {choice: [...]} only"),
    ({"sampler": "grid", "trials": 3, "params": {"seed": {"choice": [0, 1]}}}, {}, "search.trials: 3, but the grid has 2"),
    ({"heartbeat_s": 30, "grace_s": 60}, {}, "search.grace_s: 60 s must exceed two heartbeats"),
    ({"params": {"run.dir": {"choice": ["a"]}}}, {}, "run.dir: set by the sweep"),
    ({}, {"sweep": {"grid": {"seed": [0]}}}, "sweep, search: give one"),
    ({"params": {"train.lrr": {"uniform": [0.1, 0.2]}}}, {}, "search.params: train.lrr=0.1: train.lrr: unknown key"),
    ({"params": {"train.warmup_epochs": {"uniform": [0.0, 50]}}}, {},
     "search.params: train.warmup_epochs=50.0: train.warmup_epochs: must be in [0, train.epochs]"),
])
def test_search_mistakes_are_one_line_and_submit_nothing(tmp_path, capsys, search, top, message):
    path = search_spec(tmp_path / "bad.yaml", "bad", search, **top)
    assert commands.main([str(path), "--executor", "local", "--sweep-dir", str(tmp_path / "sw")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1 and out.err.startswith("error: ") and message in out.err, out.err
    assert not (tmp_path / "sw").exists()


def test_dry_run_of_a_study_shows_its_workers_as_one_array(tmp_path, capsys):
    path = search_spec(tmp_path / "s.yaml", "drs", {"workers": 3, "trials": 9})
    assert commands.main([str(path), "--dry-run", "--executor", "slurm", "--sweep-dir", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("drs: 3 worker(s), cluster profile local, executor slurm; dry run, nothing submitted\n")
    assert 'study: 9 trials, test_accuracy (maximized), sampler tpe, pruner asha (after 1 epoch(s)); params train.lr: ' \
           '{"loguniform": [0.0001, 0.5]}' in out
    assert "#SBATCH --array=0-2" in out and not (tmp_path / "sw").exists()


# ---------------------------------------------------------------------------- the pieces


def test_train_hook_stops_a_run_at_an_evaluation(tmp_path, cache_dir, monkeypatch):
    """Every evaluation reaches the hook; a reason stops the run there: pruned.json (no summary.json)
    says at which step and why, and train returns that summary."""
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    cfg = load_config("debug", [*TINY, "train.epochs=3", f"run.dir={tmp_path / 'run'}"])
    seen = []

    def hook(record: dict) -> str | None:
        seen.append((record["epoch"], record["test_accuracy"]))
        return "hopeless" if record["epoch"] == 2 else None

    result = train(cfg, on_eval=hook)
    run = RunDir(tmp_path / "run")
    assert [e for e, _ in seen] == [1, 2]
    assert result["pruned"] == {"step": 2 * STEPS_PER_EPOCH, "epoch": 2, "reason": "hopeless"}
    assert result["steps"] == 2 * STEPS_PER_EPOCH
    assert read_json(run / PRUNED) == result and not (run / SUMMARY).exists()
    assert result["test_accuracy"] == seen[-1][1]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # ask() outside optimize(), as the workers do
def test_journal_heartbeats_fail_and_retry_only_dead_workers_trials(tmp_path):
    """Against the installed Optuna: its own fail_stale_trials and retry callback, on our storage."""
    storage = HeartbeatJournalStorage(str(tmp_path / "j.journal"), heartbeat_s=1, grace_s=10, max_retries=1)
    study = optuna.create_study(study_name="hb", storage=storage, direction="maximize")
    alive, dead, away = (study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(3))
    for t in (alive, dead, away):
        storage.record_heartbeat(trial_id(t))
    long_ago = time.time() - 60
    storage.set_trial_system_attr(trial_id(dead), HEARTBEAT, long_ago)
    storage.set_trial_system_attr(trial_id(away), HEARTBEAT, long_ago)
    storage.set_trial_system_attr(trial_id(away), SUSPENDED, True)  # pre-empted: waits for its worker's requeue
    fail_stale_trials(study)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["RUNNING", "FAIL", "RUNNING", "WAITING"]
    retry = study.get_trials()[3]
    assert retry.params == dead.params and retry.system_attrs["failed_trial"] == dead.number
    # max_retries=1: the retry, dead in turn, is failed but not retried again.
    popped = study.ask()
    assert popped.number == retry.number
    storage.set_trial_system_attr(trial_id(popped), HEARTBEAT, long_ago)
    fail_stale_trials(study)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "FAIL", "RUNNING", "FAIL"]

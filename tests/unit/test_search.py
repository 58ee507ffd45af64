"""Search (#18) in-process: the spec's `search:` block and its mistakes, a study's dry run, train's
evaluation hook, Optuna's heartbeat and retry on the journal file storage. Studies end to end on the
local executor: tests/e2e/test_search.py; on Slurm: tests/slurm/test_search_slurm.py. optuna-dashboard
in a browser is slurm/check_dashboard.py (it needs chromium and optuna-dashboard, which the project
does not install)."""


from __future__ import annotations

import datetime
import json
import resource
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cifar_dist.config import load_config
from cifar_dist.rundir import PRUNED, SUMMARY, TRIAL, RunDir, read_json
from cifar_dist.sweep import commands, journal, optuna_compat, study
from cifar_dist.sweep.optuna_compat import HEARTBEAT, HeartbeatJournalStorage, fail_stale_trials, trial_id
from cifar_dist.sweep.record import SweepRecord, load_record, save_record
from cifar_dist.sweep.spec import load_spec
from cifar_dist.sweep.worker import STALE, Worker
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


@pytest.fixture
def looking_clock(monkeypatch):
    """The monotonic clock of this process (the worker looking at the trials), moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(optuna_compat.time, "monotonic", lambda: now[0])
    return now


def float_trial(study: optuna.Study) -> optuna.Trial:
    return study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # ask() outside optimize(), as the workers do
def test_journal_heartbeats_fail_and_retry_only_trials_seen_silent_for_grace(tmp_path, looking_clock):
    """Against the installed Optuna: its own fail_stale_trials and retry callback, on our storage.
    One storage is the trials' worker, another the worker looking at them: a trial is stale once
    the looker has seen its heartbeat unchanged for grace_s by its own clock."""
    path = str(tmp_path / "j.journal")
    worker = HeartbeatJournalStorage(path, heartbeat_s=1, grace_s=10, max_retries=1)
    study = optuna.create_study(study_name="hb", storage=worker, direction="maximize")
    alive, dead, away = (float_trial(study) for _ in range(3))
    for t in (alive, dead, away):
        worker.beat(t)
    worker.suspend(away)  # pre-empted: waits for its worker's requeue
    looker = HeartbeatJournalStorage(path, heartbeat_s=1, grace_s=10, max_retries=1)
    looking = optuna.load_study(study_name="hb", storage=looker)
    fail_stale_trials(looking)
    looking_clock[0] += 10
    worker.beat(alive)
    fail_stale_trials(looking)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"] * 3, "unchanged for grace_s, not longer"
    looking_clock[0] += 0.5
    fail_stale_trials(looking)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "FAIL", "RUNNING", "WAITING"]
    retry = study.get_trials()[3]
    assert retry.params == dead.params and retry.system_attrs["failed_trial"] == dead.number
    # max_retries=1: the retry, silent in turn, is failed but not retried again.
    popped = study.ask()
    assert popped.number == retry.number
    worker.beat(popped)
    for _ in range(2):
        fail_stale_trials(looking)
        looking_clock[0] += 11
        worker.beat(alive)
    fail_stale_trials(looking)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "FAIL", "RUNNING", "FAIL"]


def test_no_wall_clock_makes_a_trial_stale(tmp_path, looking_clock):
    """Workers whose clocks disagree by hours: a trial whose start was stamped by a clock a day behind,
    and one whose heartbeat holds a time 15 minutes ahead (as a worker of an earlier version wrote
    it), are not stale to a worker that has just started looking; the one that beats never is."""
    path = str(tmp_path / "j.journal")
    storage = HeartbeatJournalStorage(path, heartbeat_s=1, grace_s=10, max_retries=1)
    study_ = optuna.create_study(study_name="sk", storage=storage, direction="maximize")
    x = {"x": optuna.distributions.FloatDistribution(0, 1)}
    day_ago = datetime.datetime.now() - datetime.timedelta(days=1)
    study_.add_trial(optuna.trial.FrozenTrial(number=0, trial_id=0, state=TrialState.RUNNING, value=None, params={"x": 0.5},
                                              distributions=x, datetime_start=day_ago, datetime_complete=None,
                                              user_attrs={}, system_attrs={}, intermediate_values={}))
    ahead = float_trial(study_)
    storage.set_trial_system_attr(trial_id(ahead), HEARTBEAT, time.time() + 900)
    behind = optuna.trial.Trial(study_, trial_id(study_.trials[0]))
    looking = optuna.load_study(study_name="sk", storage=HeartbeatJournalStorage(path, heartbeat_s=1, grace_s=10,
                                                                                 max_retries=1))
    for _ in range(3):
        fail_stale_trials(looking)
        looking_clock[0] += 6
        storage.beat(behind)
    assert [t.state.name for t in study_.get_trials()] == ["RUNNING", "FAIL", "WAITING"], "only the silent one, after grace_s"


def test_a_failed_append_leaves_the_journal_as_it_was(tmp_path):
    """A file size limit (RLIMIT_FSIZE: the kernel refuses the write past it, as a full disk does)
    lets an append write half its line and fails it: the half line is cut back, so the journal stays
    readable; a torn last line (a writer killed mid-line) is cut off by the next append."""
    path = tmp_path / "j.journal"
    backend = optuna_compat.SafeJournalFileBackend(str(path), retry_for_s=0)
    backend.append_logs([{"op": 1}])
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 5, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            backend.append_logs([{"op": 2, "long": "x" * 100}])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert path.read_bytes() == before
    with open(path, "ab") as f:
        f.write(b'{"op": 3, "torn')
    backend.append_logs([{"op": 4}])
    assert [json.loads(line)["op"] for line in path.read_text().splitlines()] == [1, 4]
    assert [log["op"] for log in optuna_compat.SafeJournalFileBackend(str(path), retry_for_s=0).read_logs(0)] == [1, 4]


# ---------------------------------------------------------------------------- a worker whose trial was taken


@pytest.fixture
def one_worker(tmp_path):
    """A study of two trials in a sweep dir, as submit leaves it, and its worker w0 (rank 0's side)."""
    return made_study(tmp_path, {"trials": 2, "sampler": "random", "heartbeat_s": 1, "grace_s": 5, "pruner": "none"})


def made_study(tmp_path, search: dict) -> tuple:
    spec = load_spec(search_spec(tmp_path / "s.yaml", "taken", search))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    record = SweepRecord(name="taken", uid="abc123", profile="local", executor="local", resources=spec.resources,
                         search=spec.search, submitted_from=str(tmp_path), points=study.make_workers(0, 1),
                         base_config=study.study_base_config(spec, sweep_dir, "abc123"))
    save_record(sweep_dir, record)
    study.create_study(sweep_dir, record)
    return sweep_dir, Worker(sweep_dir, "w0")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_worker_whose_trial_was_failed_stops_it_and_asks_for_another(one_worker, capfd):
    """This worker stalled past grace_s and another failed its trial (Optuna's fail_stale_trials, retry
    queued): its heartbeat learns it, the trial stops at its next evaluation, the study is told
    nothing more (no "Cannot tell a FAIL trial"), trial.json says why, and the worker takes the retry."""
    sweep_dir, worker = one_worker
    order = worker.next()
    assert order["number"] == 0
    other = HeartbeatJournalStorage(str(sweep_dir / study.JOURNAL), heartbeat_s=1, grace_s=5, max_retries=3)
    assert other.set_trial_state_values(trial_id(worker.trial), TrialState.FAIL)  # as fail_stale_trials does
    other.get_heartbeat_stale_trial_callback()(optuna.load_study(study_name="taken", storage=other),
                                                other.get_trial(trial_id(worker.trial)))
    assert worker.heartbeat.taken.wait(timeout=60), "the heartbeat never learnt that its trial was failed"
    assert "heartbeat: trial 000 was failed by the study" in capfd.readouterr().err
    stop = worker.report({"test_accuracy": 0.5, "epoch": 1.0})
    assert stop == STALE
    worker.ended({"test_accuracy": 0.5, "pruned": {"step": 20, "epoch": 1, "reason": stop}})
    record = read_json(sweep_dir / "runs" / "000" / TRIAL)
    assert (record["state"], record["note"]) == ("fail", STALE)
    again = worker.next()
    assert again["number"] == 1 and again["config"]["train"]["lr"] == order["config"]["train"]["lr"], "the retry"
    worker.heartbeat.stop()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_tell_that_meets_a_failed_trial_records_it_as_failed(one_worker):
    """The trial was failed as stale between its last evaluation and its end: the worker's tell is
    skipped (Optuna would raise ValueError), and the trial is recorded as failed, not complete."""
    sweep_dir, worker = one_worker
    worker.next()
    worker.heartbeat.stop()
    worker.storage.set_trial_state_values(trial_id(worker.trial), TrialState.FAIL)
    worker.ended({"test_accuracy": 0.7})
    assert read_json(sweep_dir / "runs" / "000" / TRIAL)["state"] == "fail"
    assert optuna.load_study(study_name="taken", storage=worker.storage).trials[0].state == TrialState.FAIL


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_grid_study_tells_its_last_grid_point(tmp_path):
    """Optuna's grid sampler stops the study once its grid is told, which works only inside
    study.optimize: the worker (ask and tell) would die on the last trial, before its trial.json."""
    sweep_dir, worker = made_study(tmp_path, {"trials": 1, "sampler": "grid", "pruner": "none",
                                              "params": {"train.lr": {"choice": [0.05]}}})
    assert worker.next()["number"] == 0
    worker.ended({"test_accuracy": 0.5})
    assert read_json(sweep_dir / "runs" / "000" / TRIAL)["state"] == "complete"
    assert worker.next() is None


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_rebuilt_journal_gives_a_trial_known_by_its_run_dir_back_to_its_worker(tmp_path):
    """The journal emptied while w0 trained trial 000 (its run dir holds its config, no trial.json):
    the rebuilt journal holds that trial suspended for w0, with its values, and w0, restarted,
    resumes it rather than asking a new one."""
    sweep_dir, worker = made_study(tmp_path, {"trials": 2, "sampler": "random", "pruner": "none"})
    order = worker.next()
    worker.heartbeat.stop()
    run_dir = sweep_dir / "runs" / "000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(order["config"]))
    (sweep_dir / study.JOURNAL).write_bytes(b"")
    record = load_record(sweep_dir)
    with pytest.raises(study.JournalError, match="damaged, no readable study in it"):
        study.load_study(sweep_dir, record)
    assert journal.rebuild(sweep_dir, record).startswith("study.journal rebuilt with 1 trial(s) (1 from their run dir alone)")
    [trial] = study.load_study(sweep_dir, record).trials
    assert trial.state == TrialState.RUNNING and trial.params == {"train.lr": order["config"]["train"]["lr"]}
    assert optuna_compat.is_suspended(trial) and optuna_compat.worker_of(trial) == "w0"
    again = Worker(sweep_dir, "w0").next()
    assert again["number"] == 0 and again["config"] == order["config"]

"""Search (#18) without a cluster: the spec's `search:` block and its mistakes, train's evaluation
hook, Optuna's heartbeat and retry on the journal file storage, studies end to end on the local
executor (pruning, a worker added to a running study, trial names and groups, compare, a worker of
two ranks) and the benchmark's plumbing. Each study is as small as shows its behaviour: two
epochs per trial (ASHA's first rung, at epoch 1, is the only one where a trial can be pruned),
a random sampler whose seed fixes every trial's values, and values whose order makes the pruning
certain whatever the workers' timing. optuna-dashboard in a browser is slurm/check_dashboard.py
(it needs chromium and optuna-dashboard, which the project does not install)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import PY, TINY
from PIL import Image
from slurm_fixtures import TINY_OVERRIDES, slurm_env, submitted

from cifar_dist.compare import CURVES_PNG, PARAM_PANEL, PARAMS_PNG, compare_main, load_runs
from cifar_dist.config import load_config
from cifar_dist.rundir import CONFIG, PRUNED, SUMMARY, TRIAL, RunDir, read_json
from cifar_dist.sweep import commands
from cifar_dist.sweep.optuna_compat import HEARTBEAT, SUSPENDED, HeartbeatJournalStorage, fail_stale_trials
from cifar_dist.sweep.spec import load_spec
from cifar_dist.train import train

# A range with hopeless ends: 1e-4 barely moves in a few epochs; 0.5 is too high for this tiny run.
HOPELESS_LR = {"train.lr": {"loguniform": ["1e-4", 0.5]}}
STEPS_PER_EPOCH = 20  # TINY: 1,280 synthetic images in steps of 64
# The random sampler's draws from HOPELESS_LR for trials 0, 1, 2, 3 (search.py seeds each ask with
# seed * 100003 + its number). Seed 10: 0.073, 0.089, 0.0035, 0.00011: trials 2 and 3 start only
# once trial 0 or 1 has ended an epoch, so their first evaluation, far worse, meets a better one at
# ASHA's rung and is pruned; the first trial evaluated at the rung is never pruned and completes.
GOOD_THEN_HOPELESS = 10
# Seed 11: 0.009, then 0.00014: one worker trains trial 0 to the end and trial 1 is pruned.
ONE_THEN_HOPELESS = 11


def search_spec(path: Path, name: str, search: dict, overrides: dict | None = None, **top) -> Path:
    search = {k: v for k, v in {"trials": 4, "params": HOPELESS_LR, **search}.items() if v is not None}  # None: left out
    spec = {"name": name, "cluster": "local", "base": "debug", "overrides": {**TINY_OVERRIDES, **(overrides or {})},
            "search": search,
            "resources": {"time_min": 10, "signal_delay_s": 30}, **top}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep_command(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python jobs/submit.py ARGS` in this process, with `env` as its environment (restored after):
    the same code as the command, without an interpreter and torch start-up each time (seconds on
    a loaded 2-core machine). The first submit of each study runs the real command instead."""
    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = commands.main(args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def succeeded(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = sweep_command(args, env)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def status(sweep_dir: Path, env: dict) -> dict:
    return json.loads(succeeded(["status", str(sweep_dir), "--json"], env).stdout)


# ---------------------------------------------------------------------------- the spec


def test_search_block_reads_with_defaults(tmp_path):
    spec = load_spec(search_spec(tmp_path / "s.yaml", "s", {"workers": 2, "sampler": "random"}))
    s = spec.search
    assert (s.trials, s.workers, s.metric, s.direction, s.sampler, s.pruner) == (4, 2, "test_accuracy", "maximize",
                                                                                 "random", "asha")
    assert (s.params["train.lr"].kind, s.params["train.lr"].args) == ("loguniform", [1e-4, 0.5]), "1e-4 as written"
    assert spec.grid == {} and spec.random is None


@pytest.mark.parametrize(("search", "top", "message"), [
    ({"trials": None}, {}, "search.trials: missing"),
    ({"trails": 3}, {}, "search.trails: unknown key"),
    ({"sampler": "cmaes"}, {}, "search.sampler: must be one of tpe, random, grid, got 'cmaes'"),
    ({"pruner": "asha2"}, {}, "search.pruner: must be one of asha, hyperband, median, none"),
    ({"metric": "train_loss"}, {}, "search.metric: must be one of test_accuracy, test_loss"),
    ({"workers": 0}, {}, "search.workers: must be >= 1, got 0"),
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
        storage.record_heartbeat(t._trial_id)
    long_ago = time.time() - 60
    storage.set_trial_system_attr(dead._trial_id, HEARTBEAT, long_ago)
    storage.set_trial_system_attr(away._trial_id, HEARTBEAT, long_ago)
    storage.set_trial_system_attr(away._trial_id, SUSPENDED, True)  # pre-empted: waits for its worker's requeue
    fail_stale_trials(study)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["RUNNING", "FAIL", "RUNNING", "WAITING"]
    retry = study.get_trials()[3]
    assert retry.params == dead.params and retry.system_attrs["failed_trial"] == dead.number
    # max_retries=1: the retry, dead in turn, is failed but not retried again.
    popped = study.ask()
    assert popped.number == retry.number
    storage.set_trial_system_attr(popped._trial_id, HEARTBEAT, long_ago)
    fail_stale_trials(study)
    assert [t.state.name for t in study.get_trials()] == ["RUNNING", "FAIL", "RUNNING", "FAIL"]


# ---------------------------------------------------------------------------- a study on the local executor

# Its tests on one pytest-xdist worker (`make test` runs two): the module's study is made once.
one_study = pytest.mark.xdist_group("search-study")


@pytest.fixture(scope="module")
def study(cache_dir, tmp_path_factory):
    """Four trials of two epochs: one worker submitted, a second added by `resubmit --workers 1`
    while the first trains."""
    tmp = tmp_path_factory.mktemp("study")
    env = slurm_env(cache_dir, tmp)
    # heartbeat_s: a worker with nothing left to ask waits this long (at most 10 s) between looks at
    # the other's last trial; grace_s: long enough that no live trial is called stale on a loaded machine.
    spec = search_spec(tmp / "st.yaml", "st", {"trials": 4, "workers": 1, "sampler": "random", "seed": GOOD_THEN_HOPELESS,
                                               "heartbeat_s": 1, "grace_s": 60},
                       overrides={"train.epochs": 2})
    sweep_dir = tmp / "sweep"
    out = submitted([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env, tmp)
    assert "st: 1 worker(s) submitted" in out.stdout
    out = succeeded(["resubmit", str(sweep_dir), "--workers", "1"], env)
    assert "st: 1 worker(s) submitted" in out.stdout and "w1" in out.stdout
    succeeded(["wait", str(sweep_dir), "--poll", "0.5", "--timeout", "300"], env)
    return sweep_dir, env


@one_study
def test_a_study_prunes_hopeless_trials_and_ends_with_its_trials(study):
    sweep_dir, env = study
    table = status(sweep_dir, env)
    states = [t["state"] for t in table["trials"]]
    assert len(states) == 4 and states.count("complete") + states.count("pruned") == 4, table["trials"]
    assert states[2:] == ["pruned", "pruned"] and "complete" in states[:2], table["trials"]
    assert [(w["name"], w["state"]) for w in table["workers"]] == [("w0", "done"), ("w1", "done")]
    assert {t["worker"] for t in table["trials"]} == {"w0", "w1"}, "the added worker took trials of the same study"
    for t in table["trials"]:
        run = RunDir(sweep_dir / "runs" / t["trial"])
        record = read_json(run / TRIAL)
        assert record["state"] == t["state"] and record["label"] == t["values"]
        if t["state"] == "pruned":
            pruned = read_json(run / PRUNED)
            assert re.fullmatch(r"pruned by asha after epoch 1: test_accuracy 0\.\d{4}", pruned["pruned"]["reason"])
            assert pruned["pruned"]["step"] == STEPS_PER_EPOCH and not (run / SUMMARY).exists()
            assert t["epochs"] == 1
        else:
            assert run.summary()["steps"] == 2 * STEPS_PER_EPOCH and t["epochs"] == 2
    assert table["epochs"] == sum(t["epochs"] for t in table["trials"]) < 8, "pruning saved epochs"
    best = max((t for t in table["trials"] if t["state"] == "complete"), key=lambda t: t["test_accuracy"])
    assert table["best"] == best
    text = succeeded(["status", str(sweep_dir)], env).stdout
    assert f"best: trial {best['trial']}, test_accuracy {best['test_accuracy']:.4f}" in text
    assert f"4 wanted; {states.count('complete')} complete, {states.count('pruned')} pruned" in text


@one_study
def test_trials_are_named_and_grouped_by_the_study(study):
    """tracking.group is the study's name and run.name the trial with its values (test_tracking.py
    shows both reach wandb as its group and display name)."""
    sweep_dir, _ = study
    for run_dir in sorted((sweep_dir / "runs").iterdir()):
        config = yaml.safe_load((run_dir / CONFIG).read_text())
        lr = read_json(run_dir / TRIAL)["params"]["train.lr"]
        assert config["tracking"]["group"] == "st" and config["run"]["name"] == f"st/{run_dir.name} train.lr={lr:.4g}"
        assert config["train"]["lr"] == lr and config["run"]["dir"] == str(run_dir)


@one_study
def test_resubmit_workers_counts_from_one(study):
    sweep_dir, env = study
    proc = sweep_command(["resubmit", str(sweep_dir), "--workers", "-1"], env)
    assert (proc.returncode, proc.stderr) == (2, "error: --workers: must be >= 1, got -1\n")


@one_study
def test_compare_on_a_study_ranks_trials_and_plots_each_parameter(study, tmp_path, capsys):
    sweep_dir, env = study
    assert compare_main([str(sweep_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = status(sweep_dir, env)
    best = table["best"]
    assert f"best trial: {best['trial']}, test_accuracy {best['test_accuracy']:.4f}: {best['values']}\n" in out
    assert f"its config: {sweep_dir / 'runs' / best['trial'] / CONFIG}" in out
    ranked = out.split("rank  trial")[1].splitlines()[1:5]
    assert [line.split()[1] for line in ranked][0] == best["trial"]
    assert [line.split()[2] for line in ranked] == sorted((t["state"] for t in table["trials"]), key=lambda s: s != "complete")
    with Image.open(tmp_path / PARAMS_PNG) as img:
        assert img.size == (round(100 * PARAM_PANEL[0]), round(100 * PARAM_PANEL[1])), "one panel: train.lr"
    assert (tmp_path / CURVES_PNG).is_file()
    names = {r.label: r.name for r in load_runs(sorted((sweep_dir / "runs").iterdir()))}
    assert names == {t["trial"]: t["values"] for t in table["trials"]}, "curves are named by the swept values"


def test_a_worker_of_two_ranks_trains_and_stops_its_trials_as_one(tmp_path, cache_dir):
    """Rank 0 alone talks to the study; both ranks train each trial it picks and both stop where
    the pruner says (a rank that went on would hang the other in its next collective)."""
    env = slurm_env(cache_dir, tmp_path)
    spec = search_spec(tmp_path / "two.yaml", "two", {"trials": 2, "sampler": "random", "seed": ONE_THEN_HOPELESS},
                       overrides={"train.epochs": 2},
                       resources={"tasks_per_node": 2, "time_min": 10, "signal_delay_s": 30})
    sweep_dir = tmp_path / "sweep"
    succeeded([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env)
    succeeded(["wait", str(sweep_dir), "--poll", "0.5", "--timeout", "300"], env)
    table = status(sweep_dir, env)
    assert [t["state"] for t in table["trials"]] == ["complete", "pruned"], table["trials"]
    for t in table["trials"]:
        run = RunDir(sweep_dir / "runs" / t["trial"])
        assert (run.summary() or read_json(run / PRUNED))["world_size"] == 2


def test_bench_search_compares_the_methods_in_one_table(tmp_path, env):
    """benchmarks/bench_search.py's plumbing on tiny synthetic studies (the real run uses the JPEG archive)."""
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([PY, "benchmarks/bench_search.py", "--seeds", "1", "--trials", "2", "--epochs", "2",
                           "--train-subset", "0", "--methods", "random", "tpe-asha", "random-asha",
                           "--extra", "data.synthetic_train=640", "data.synthetic_test=200"],
                          env={**env, "CIFAR_DIST_RESULTS": str(results)}, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = results.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows] == ["method", "random search, every trial to the end", "TPE + ASHA",
                                    "random search + ASHA (random search's trials, pruned)"]
    assert rows[1][2] == "4 (1 run)" and rows[1][3] == "2+0", "random search trains every trial to the end"
    for row in rows[2:]:
        assert sum(map(int, row[3].split("+"))) == 2 and float(row[2].split()[0]) <= 4
    assert len(re.findall(r"goal \(within 0\.5 points, at most 1/3 of the epochs\): (met|not met)", text)) == 2
    kept = re.search(r"random search \+ ASHA kept random search's winning trial in ([01]) of 1 studies", text)
    pruned_any = rows[3][3] != "2+0"
    assert kept and (kept[1] == "1" or pruned_any), "only pruning can lose random search's winner"

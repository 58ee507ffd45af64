"""Search (#18) without a cluster: the spec's `search:` block and its mistakes, train's evaluation
hook, Optuna's heartbeat and retry on the journal file storage, a study end to end on the local
executor (pruning, wandb groups, more workers, compare), and the study in optuna-dashboard seen
by a headless browser."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import PY, TINY
from PIL import Image
from slurm_fixtures import TINY_OVERRIDES, slurm_env, submit, submitted, wait_for
from wandb_records import run_records

from cifar_dist.config import load_config
from cifar_dist.report import CURVES_PNG, PARAM_PANEL, PARAMS_PNG, load_runs
from cifar_dist.rundir import CONFIG, PRUNED, SUMMARY, TRIAL, RunDir, read_json
from cifar_dist.sweep import commands
from cifar_dist.sweep.optuna_compat import HEARTBEAT, SUSPENDED, HeartbeatJournalStorage, fail_stale_trials
from cifar_dist.sweep.spec import load_spec
from cifar_dist.train import train

# A range with hopeless ends: 1e-4 barely moves in 4 epochs; 0.5 is too high for this tiny run.
HOPELESS_LR = {"train.lr": {"loguniform": ["1e-4", 0.5]}}


def search_spec(path: Path, name: str, search: dict, overrides: dict | None = None, **top) -> Path:
    search = {k: v for k, v in {"trials": 4, "params": HOPELESS_LR, **search}.items() if v is not None}  # None: left out
    spec = {"name": name, "cluster": "local", "base": "debug", "overrides": {**TINY_OVERRIDES, **(overrides or {})},
            "search": search,
            "resources": {"time_min": 10, "signal_delay_s": 30}, **top}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def status(sweep_dir: Path, env: dict) -> dict:
    proc = submit(["status", str(sweep_dir), "--json"], env, sweep_dir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


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
    cfg = load_config("debug", [*TINY, "train.epochs=4", f"run.dir={tmp_path / 'run'}"])
    seen = []

    def hook(record: dict) -> str | None:
        seen.append((record["epoch"], record["test_accuracy"]))
        return "hopeless" if record["epoch"] == 2 else None

    result = train(cfg, on_eval=hook)
    run = RunDir(tmp_path / "run")
    assert [e for e, _ in seen] == [1, 2]
    assert result["pruned"] == {"step": 40, "epoch": 2, "reason": "hopeless"} and result["steps"] == 40
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


@pytest.fixture(scope="module")
def study(cache_dir, tmp_path_factory):
    """Two local workers, six trials of a range with hopeless ends, wandb offline."""
    tmp = tmp_path_factory.mktemp("study")
    env = slurm_env(cache_dir, tmp)
    spec = search_spec(tmp / "st.yaml", "st", {"trials": 6, "workers": 2, "seed": 1},
                       overrides={"train.epochs": 4, "tracking.backend": "wandb"})
    sweep_dir = tmp / "sweep"
    out = submitted([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env, tmp)
    assert "st: 2 worker(s) submitted" in out.stdout
    proc = submit(["wait", str(sweep_dir), "--poll", "1", "--timeout", "400"], env, tmp, timeout=460)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sweep_dir, env


def test_a_study_prunes_hopeless_trials_and_ends_with_its_trials(study):
    sweep_dir, env = study
    table = status(sweep_dir, env)
    states = [t["state"] for t in table["trials"]]
    assert len(states) == 6 and states.count("complete") + states.count("pruned") == 6, states
    assert states.count("pruned") >= 1 and states.count("complete") >= 1, states
    assert [w["state"] for w in table["workers"]] == ["done", "done"]
    assert {t["worker"] for t in table["trials"]} <= {"w0", "w1"}
    for t in table["trials"]:
        run = RunDir(sweep_dir / "runs" / t["trial"])
        record = read_json(run / TRIAL)
        assert record["state"] == t["state"] and record["label"] == t["values"]
        if t["state"] == "pruned":
            pruned = read_json(run / PRUNED)
            assert re.fullmatch(r"pruned by asha after epoch \d: test_accuracy 0\.\d{4}", pruned["pruned"]["reason"])
            assert pruned["pruned"]["step"] == 20 * pruned["pruned"]["epoch"] < 80 and not (run / SUMMARY).exists()
            assert t["epochs"] == pruned["pruned"]["epoch"]
        else:
            assert run.summary()["steps"] == 80 and t["epochs"] == 4
    assert table["epochs"] == sum(t["epochs"] for t in table["trials"]) < 24, "pruning saved epochs"
    best = max((t for t in table["trials"] if t["state"] == "complete"), key=lambda t: t["test_accuracy"])
    assert table["best"] == best
    text = submit(["status", str(sweep_dir)], env, sweep_dir).stdout
    assert f"best: trial {best['trial']}, test_accuracy {best['test_accuracy']:.4f}" in text
    assert f"6 wanted; {states.count('complete')} complete, {states.count('pruned')} pruned" in text


def test_trials_are_grouped_in_wandb_with_their_values(study):
    sweep_dir, _ = study
    run_dir = sweep_dir / "runs" / "000"
    config = yaml.safe_load((run_dir / CONFIG).read_text())
    (info,) = run_records(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    logged = {item.key: json.loads(item.value_json) for item in info.config.update}
    lr = read_json(run_dir / TRIAL)["params"]["train.lr"]
    assert info.run_group == "st" and info.display_name == f"st/000 train.lr={lr:.4g}"
    assert logged["train"]["lr"] == config["train"]["lr"] == lr


def test_more_workers_join_the_same_study(study):
    """resubmit --workers adds workers; with every trial taken they find nothing to do and end."""
    sweep_dir, env = study
    out = submitted(["resubmit", str(sweep_dir), "--workers", "1"], env, sweep_dir)
    assert "1 worker(s) submitted" in out.stdout
    proc = submit(["wait", str(sweep_dir), "--poll", "1", "--timeout", "120"], env, sweep_dir, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = status(sweep_dir, env)
    assert [(w["name"], w["state"]) for w in table["workers"]] == [("w0", "done"), ("w1", "done"), ("w2", "done")]
    assert len(table["trials"]) == 6 and "w2" not in {t["worker"] for t in table["trials"]}
    bad = submit(["resubmit", str(sweep_dir), "--workers", "-1"], env, sweep_dir)
    assert bad.returncode == 2 and bad.stderr == "error: --workers: must be >= 1, got -1\n"


def test_compare_on_a_study_ranks_trials_and_plots_each_parameter(study, tmp_path):
    sweep_dir, env = study
    proc = subprocess.run([PY, "-m", "cifar_dist.cli", "compare", str(sweep_dir), "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = status(sweep_dir, env)
    best = table["best"]
    assert f"best trial: {best['trial']}, test_accuracy {best['test_accuracy']:.4f}: {best['values']}\n" in proc.stdout
    assert f"its config: {sweep_dir / 'runs' / best['trial'] / CONFIG}" in proc.stdout
    ranked = proc.stdout.split("rank  trial")[1].splitlines()[1:7]
    assert [line.split()[1] for line in ranked][0] == best["trial"]
    assert [line.split()[2] for line in ranked] == sorted((t["state"] for t in table["trials"]), key=lambda s: s != "complete")
    with Image.open(tmp_path / PARAMS_PNG) as img:
        assert img.size == (round(100 * PARAM_PANEL[0]), round(100 * PARAM_PANEL[1])), "one panel: train.lr"
    assert (tmp_path / CURVES_PNG).is_file()
    names = {r.label: r.name for r in load_runs(sorted((sweep_dir / "runs").iterdir()))}
    assert names == {t["trial"]: t["values"] for t in table["trials"]}, "curves are named by the swept values"


# ---------------------------------------------------------------------------- optuna-dashboard in a browser


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not chromium() or not shutil.which("optuna-dashboard", path=str(Path(PY).parent)),
                    reason="needs chromium (apt-get install chromium) and optuna-dashboard (pip)")
def test_the_study_journal_opens_in_optuna_dashboard(study, tmp_path):
    """optuna-dashboard on 127.0.0.1 with the journal file; a headless Chromium renders the study's page."""
    sweep_dir, env = study
    port = free_port()
    dashboard = subprocess.Popen([str(Path(PY).parent / "optuna-dashboard"), str(sweep_dir / "study.journal"),
                                  "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    try:
        def studies() -> list | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    return json.loads(r.read())["study_summaries"]
            except OSError:
                return None

        (listed,) = wait_for(studies, 60, "optuna-dashboard to answer")
        assert listed["study_name"] == "st"
        page = f"http://127.0.0.1:{port}/dashboard/studies/{listed['study_id']}"
        browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                   "--window-size=1400,1000"]
        dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        texts = re.findall(r">([^<>]+)<", dom)
        assert f"st (id={listed['study_id']})" in texts and "History" in texts and "Trial" in texts, texts[:50]
        shot = tmp_path / "dashboard.png"
        subprocess.run([*browser, f"--screenshot={shot}", page], capture_output=True, timeout=120, check=True)
        with Image.open(shot) as img:
            assert img.size == (1400, 1000) and len(img.convert("L").getcolors(1 << 16)) > 20, "a blank page"
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def test_a_worker_of_two_ranks_trains_its_trials_as_one(tmp_path, cache_dir):
    """Rank 0 alone talks to the study; both ranks train each trial it picks and stop where it says."""
    env = slurm_env(cache_dir, tmp_path)
    spec = search_spec(tmp_path / "two.yaml", "two", {"trials": 3, "seed": 1}, overrides={"train.epochs": 3},
                       resources={"tasks_per_node": 2, "time_min": 10, "signal_delay_s": 30})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env, tmp_path)
    proc = submit(["wait", str(sweep_dir), "--poll", "1", "--timeout", "400"], env, tmp_path, timeout=460)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = status(sweep_dir, env)
    assert [t["state"] in ("complete", "pruned") for t in table["trials"]] == [True] * 3
    for t in table["trials"]:
        run = RunDir(sweep_dir / "runs" / t["trial"])
        assert (run.summary() or read_json(run / PRUNED))["world_size"] == 2


def test_bench_search_compares_both_methods_in_one_table(tmp_path, env):
    """benchmarks/bench_search.py's plumbing on tiny synthetic studies (the real run uses the JPEG archive)."""
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([PY, "benchmarks/bench_search.py", "--seeds", "1", "--trials", "3", "--epochs", "2",
                           "--train-subset", "0", "--extra", "data.synthetic_train=640", "data.synthetic_test=200"],
                          env={**env, "CIFAR_DIST_RESULTS": str(results)}, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = results.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows] == ["method", "random search, every trial to the end", "TPE + ASHA"]
    assert rows[1][2] == "6 (1 run)" and rows[1][3] == "3+0", "random search trains every trial to the end"
    assert int(rows[2][3].split("+")[0]) + int(rows[2][3].split("+")[1]) == 3
    assert re.search(r"goal \(within 0\.5 points, at most 1/3 of the epochs\): (met|not met)", text)

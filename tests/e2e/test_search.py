"""Studies end to end on the local executor, without a cluster: pruning, a worker added to a running
study, trial names and groups, compare, a worker of two ranks, and the benchmark's plumbing. Each study
is as small as shows its behaviour: two epochs per trial (ASHA's first rung, at epoch 1, is the only one
where a trial can be pruned), a random sampler whose seed fixes every trial's values, and values whose
order makes the pruning certain whatever the workers' timing (tests/helpers/search.py). The spec, the
train hook and the heartbeats in-process: tests/unit/test_search.py."""


from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from PIL import Image

from cifar_dist.compare import CURVES_PNG, PARAM_PANEL, PARAMS_PNG, compare_main, load_runs
from cifar_dist.rundir import CONFIG, PRUNED, SUMMARY, TRIAL, RunDir, read_json
from tests.helpers import PY, ROOT
from tests.helpers.data import write_image_tree
from tests.helpers.search import (
    GOOD_THEN_HOPELESS,
    ONE_THEN_HOPELESS,
    STEPS_PER_EPOCH,
    search_spec,
    status,
    succeeded,
    sweep_command,
)
from tests.helpers.slurm import slurm_env, submitted

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


def test_trials_resubmitted_from_another_directory_find_the_relative_data_path(tmp_path, cache_dir, monkeypatch):
    """A relative data.path is relative to the directory the study was submitted from, wherever its
    workers start: the worker is cancelled and resubmitted from a directory without that folder (its
    job starts there), and every trial still trains on the submitted directory's images."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    write_image_tree(project / "images", ["cat", "dog"], {"train": 64, "test": 16})
    elsewhere.mkdir()
    (tmp_path / "specs").mkdir()
    env = slurm_env(cache_dir, tmp_path)
    spec = search_spec(tmp_path / "specs" / "rel.yaml", "rel", {"trials": 2, "sampler": "random", "pruner": "none",
                                                                 "heartbeat_s": 1, "grace_s": 20},
                       overrides={"data.source": "imagefolder", "data.path": "images", "train.epochs": 1})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env, project)
    sweep_command(["cancel", str(sweep_dir)], env)
    sweep_command(["wait", str(sweep_dir), "--poll", "0.5", "--timeout", "120"], env)
    assert [w["state"] for w in status(sweep_dir, env)["workers"]] == ["cancelled"]
    monkeypatch.chdir(elsewhere)
    succeeded(["resubmit", str(sweep_dir), "--failed"], env)
    succeeded(["wait", str(sweep_dir), "--poll", "0.5", "--timeout", "300"], env)
    table = status(sweep_dir, env)
    assert [t["state"] for t in table["trials"]].count("complete") == 2, table["trials"]
    trained = [yaml.safe_load((d / CONFIG).read_text()) for d in (sweep_dir / "runs").iterdir() if (d / CONFIG).is_file()]
    assert trained and all(c["data"]["path"] == str(project / "images") for c in trained), trained


def test_bench_search_compares_the_methods_in_one_table(tmp_path, env):
    """benchmarks/bench_search.py's plumbing on tiny synthetic studies (the real run uses the JPEG archive)."""
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([PY, "benchmarks/bench_search.py", "--seeds", "1", "--trials", "2", "--epochs", "2",
                           "--train-subset", "0", "--methods", "random", "tpe-asha", "random-asha", "random-asha-3x",
                           "--extra", "data.synthetic_train=640", "data.synthetic_test=200"],
                          env={**env, "CIFAR_DIST_RESULTS": str(results)}, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = results.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows] == ["method", "random search, every trial to the end", "TPE + ASHA",
                                    "random search + ASHA (random search's trials, pruned)",
                                    "random search + ASHA, 3x the trials (about random search's epochs)"]
    assert rows[1][2] == "4 (1 run)" and rows[1][3] == "2+0", "random search trains every trial to the end"
    for row in rows[2:4]:
        assert sum(map(int, row[3].split("+"))) == 2 and float(row[2].split()[0]) <= 4
    assert sum(map(int, rows[4][3].split("+"))) == 6, "three times the trials"
    assert len(re.findall(r"goal \(within 0\.5 points, at most 1/3 of the epochs\): (met|not met)", text)) == 2
    assert re.search(r"3x the trials .* goal \(at least 0\.5 points more at about the same epochs", text)
    kept = re.search(r"random search \+ ASHA kept random search's winning trial in ([01]) of 1 studies", text)
    pruned_any = rows[3][3] != "2+0"
    assert kept and (kept[1] == "1" or pruned_any), "only pruning can lose random search's winner"

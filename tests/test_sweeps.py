"""Sweep specs without a cluster: expansion (grid x random, seeded), mistakes, cluster profiles
and their lookup, the dry run's exact sbatch script against a golden file, and the fallbacks
that need no Slurm (local and debug executors)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from slurm_fixtures import record, slurm_env, status, submit, submitted, wait_done, wait_for, write_spec

from cifar_dist.errors import ConfigError, UserError
from cifar_dist.rundir import ENV, SUMMARY, RunDir
from cifar_dist.sweep.points import make_points
from cifar_dist.sweep.profiles import SHIPPED_PROFILES, ClusterError, load_profile, submit_environment
from cifar_dist.sweep.record import PointEntry, WorkerEntry, load_record, save_record
from cifar_dist.sweep.spec import expand, load_spec

GOLDEN = ROOT / "tests" / "golden" / "dryrun_example_gpu.txt"


def spec_file(tmp_path: Path, **fields) -> Path:
    data = {"name": "s", "base": "debug", "sweep": {"grid": {"seed": [0]}}, **fields}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_is_crossed_with_seeded_random_draws(tmp_path):
    spec = load_spec(spec_file(tmp_path, sweep={
        "grid": {"train.lr": [0.1, 0.2], "seed": [0, 1]},
        "random": {"n": 3, "seed": 7, "params": {
            "train.weight_decay": {"loguniform": [1e-5, 1e-2]}, "train.epochs": {"int": [1, 3]},
            "model.name": {"choice": ["blitz", "medium"]}, "train.label_smoothing": {"uniform": [0.0, 0.2]}}}}))
    points = expand(spec)
    assert len(points) == 12
    assert [(p["train.lr"], p["seed"]) for p in points[::3]] == [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    draws = [{k: v for k, v in p.items() if k not in ("train.lr", "seed")} for p in points]
    assert draws[:3] * 4 == draws, "the same random draws for every grid point"
    assert len({json.dumps(d, sort_keys=True) for d in draws[:3]}) == 3
    for d in draws:
        assert 1e-5 <= d["train.weight_decay"] <= 1e-2 and d["train.epochs"] in (1, 2, 3)
        assert d["model.name"] in ("blitz", "medium") and 0.0 <= d["train.label_smoothing"] <= 0.2
    assert expand(load_spec(tmp_path / "spec.yaml")) == points, "reproducible"
    other = load_spec(spec_file(tmp_path, sweep={"random": {"n": 3, "seed": 8, "params": {
        "train.weight_decay": {"loguniform": [1e-5, 1e-2]}}}}))
    assert [p["train.weight_decay"] for p in expand(other)] != [d["train.weight_decay"] for d in draws[:3]]


def test_nested_sections_read_as_dotted_keys_and_empty_keys_keep_their_defaults(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: n\nbase: debug\ncluster:\nresources:\noverrides: {train: {epochs: 1}}\n"
                    "sweep:\n  grid: {train: {lr: [0.1, 0.2]}}\n"
                    "  random: {n: 2, params: {train: {weight_decay: {loguniform: ['1e-5', 1.0e-3]}}}}\n")
    spec = load_spec(path)
    assert (spec.cluster, spec.resources.nodes, spec.overrides) == ("local", 1, {"train.epochs": 1})
    assert spec.grid == {"train.lr": [0.1, 0.2]}
    assert spec.random.params == {"train.weight_decay": {"loguniform": [1e-5, 1e-3]}}
    assert [sorted(p) for p in expand(spec)] == [["train.lr", "train.weight_decay"]] * 4


def test_int_bounds_are_inclusive_and_loguniform_is_log_spread(tmp_path):
    spec = load_spec(spec_file(tmp_path, sweep={"random": {"n": 400, "params": {
        "train.epochs": {"int": [1, 3]}, "train.lr": {"loguniform": [0.001, 1.0]}}}}))
    points = expand(spec)
    assert {p["train.epochs"] for p in points} == {1, 2, 3}
    below = sum(p["train.lr"] < 0.0316 for p in points)  # the log-midpoint: about half fall below it
    assert 150 < below < 250


def test_points_get_fixed_run_ids_dirs_and_group(tmp_path):
    spec = load_spec(spec_file(tmp_path, name="grp", sweep={"grid": {"train.lr": [0.1, 0.2]}},
                               overrides={"train": {"epochs": 1}, "data.path": "rel/data"}))
    points = make_points(spec, tmp_path / "sw", "abc123")
    assert [p.run_id for p in points] == ["grp-abc123-000", "grp-abc123-001"]
    assert [p.run_dir for p in points] == [str(tmp_path / "sw" / "runs" / n) for n in ("000", "001")]
    for p, lr in zip(points, (0.1, 0.2)):
        assert p.config["train"]["lr"] == lr and p.config["train"]["epochs"] == 1
        assert p.config["tracking"]["group"] == "grp" and p.config["run"]["id"] == p.run_id
        assert p.config["data"]["path"] == str(Path("rel/data").absolute()), "jobs may start elsewhere"


@pytest.mark.parametrize("kind", ["grid", "study"])
def test_sweep_records_saved_before_entries_had_a_kind_still_load(tmp_path, kind):
    """Golden sweep.json files as submit wrote them before entries carried a kind (a study's
    workers were points with empty values, run id and config): read into the typed record, and
    saved again with the same keys, each entry with its kind and a worker with its own fields only."""
    saved = json.loads((ROOT / "tests" / "golden" / f"sweep_record_{kind}.json").read_text())
    (tmp_path / "sweep.json").write_text(json.dumps(saved))
    record = load_record(tmp_path)
    assert (record.name, record.uid, record.executor, record.resources.time_min) == (saved["name"], "abc123", "slurm", 10)
    assert [p.job_ids for p in record.points] == [p["job_ids"] for p in saved["points"]]
    assert [s.job_ids for s in record.submissions] == [s["job_ids"] for s in saved["submissions"]]
    if kind == "study":
        assert all(isinstance(p, WorkerEntry) for p in record.points) and record.is_study
        assert (record.search.trials, record.search.workers, record.base_config.train.epochs) == (4, 2, 2)
        assert record.search.distributions["train.lr"].args == [1e-4, 0.5]
    else:
        assert all(isinstance(p, PointEntry) for p in record.points) and not record.is_study
        assert [(p.values, p.run_dir, p.config) for p in record.points] == [
            (p["values"], p["run_dir"], p["config"]) for p in saved["points"]]
    save_record(tmp_path, record)
    again = json.loads((tmp_path / "sweep.json").read_text())
    assert set(again) == set(saved) - {"world_size"} | {"submitted_from"}, "world_size: the resources' own, kept once"
    assert again["submitted_from"] == "", "unknown: relative data paths resolve where the job starts, as they did"
    for old, new in zip(saved["points"], again["points"]):
        kept = {k: v for k, v in old.items() if kind == "grid" or k in ("name", "job_id", "job_ids")}
        assert new == {**kept, "kind": "worker" if kind == "study" else "point"}
    assert load_record(tmp_path) == record


def test_status_wait_and_cancel_start_without_torch(tmp_path):
    """The commands that only read a sweep dir (a study's, with its journal) never import torch:
    they start in a fraction of the time a training process needs."""
    saved = json.loads((ROOT / "tests" / "golden" / "sweep_record_study.json").read_text())
    (tmp_path / "sweep.json").write_text(json.dumps({**saved, "executor": "local", "profile_path": ""}))
    from cifar_dist.sweep import study

    study.create_study(tmp_path, load_record(tmp_path))
    script = ("import sys\nfrom cifar_dist.sweep.commands import main\n"
              f"codes = [main([c, {str(tmp_path)!r}]) for c in ('status', 'wait', 'cancel')]\n"
              "print(codes, sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "[0, 1, 0] []", proc.stdout + proc.stderr


@pytest.mark.parametrize(("fields", "message"), [
    ({"resources": {"nodes": "two"}}, "resources.nodes: expected an integer, got 'two'"),
    ({"resources": {"gpu": 1}}, "resources.gpu: unknown key"),
    ({"sweep": {"grid": {"seed": 0}}}, "sweep.grid.seed: expected a list of values"),
    ({"sweep": {"random": {"n": 0, "params": {"seed": {"int": [0, 1]}}}}}, "sweep.random.n: must be >= 1"),
    ({"sweep": {"random": {"n": 2, "params": {"seed": {"int": [3, 1]}}}}}, "low must be <= high"),
    ({"sweep": {"random": {"n": 2, "params": {"train.lr": {"uniform": [0.1]}}}}}, "expected [low, high]"),
    ({"sweep": {"grid": {"seed": [0]}, "extra": 1}}, "sweep.extra: unknown key"),
    ({"base": "nosuchconfig"}, "base: unknown config 'nosuchconfig'"),
])
def test_spec_mistakes_name_the_key(tmp_path, fields, message):
    with pytest.raises(ConfigError) as e:
        make_points(load_spec(spec_file(tmp_path, **fields)), tmp_path / "sw", "x")
    assert message in str(e.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "x", "base": "debug", "sweep": {"grid": {"seed": [0]}}, "resources": {"mem": "1e-3", "time_min": "30"}},
     None),  # numbers as people write them, as in the training config
    ({"base": "debug", "sweep": {"grid": {"seed": [0]}}}, "name: missing"),
    ({"name": "x", "base": "debug", "sweep": {"random": {"params": {"seed": {"int": [0, 1]}}}}}, "sweep.random.n: missing"),
    ({"name": "x", "base": "debug", "sweep": [1]}, "sweep: expected a mapping, got [1]"),
    ({"name": "x", "base": 3, "sweep": {"grid": {"seed": [0]}}}, "base: expected a string, got 3"),
])
def test_spec_top_level_types_and_required_keys(tmp_path, fields, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(fields))
    if message is None:
        spec = load_spec(path)
        assert (spec.cluster, spec.resources.mem, spec.resources.time_min, spec.resources.nodes) == ("local", 1e-3, 30, 1)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(path)


def test_profiles_are_found_in_the_documented_order(tmp_path, monkeypatch):
    """$CIFAR_DIST_CLUSTERS, then ./slurm/clusters/, then the shipped profiles; the first file wins."""
    own, project = tmp_path / "own", tmp_path / "slurm" / "clusters"
    for folder in (own, project):
        folder.mkdir(parents=True)
        (folder / "local.yaml").write_text(f"description: {folder.name}\n")
    (project / "mine.yaml").write_text("max_nodes: 4\nenv: {NCCL_IB_DISABLE: 1}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR_DIST_CLUSTERS", raising=False)
    assert load_profile("local").description == "clusters"
    mine = load_profile("mine")
    assert (mine.max_nodes, mine.env, mine.path) == (4, {"NCCL_IB_DISABLE": "1"}, str(project / "mine.yaml"))
    monkeypatch.setenv("CIFAR_DIST_CLUSTERS", str(own))
    assert load_profile("local").description == "own"
    assert load_profile("example-gpu").path == str(SHIPPED_PROFILES / "example-gpu.yaml")
    with pytest.raises(ConfigError) as e:
        load_profile("nowhere")
    assert "unknown cluster profile 'nowhere' (known: example-gpu, local, local2, mine; searched " in str(e.value)
    assert all(str(d) in str(e.value) for d in (own, project, SHIPPED_PROFILES))


@pytest.mark.parametrize(("text", "message"), [
    ("max_nodes: two", "cluster profile bad: max_nodes: expected an integer, got 'two'"),
    ("name: bad", "cluster profile bad: name: unknown key (valid: description,"),
    ("cpus_per_node: 0", "cluster profile bad: cpus_per_node: must be >= 1, got 0"),
    ("env: {A: true}", "cluster profile bad: env.A: expected a string, got True"),
    ("env: {1A: x}", "cluster profile bad: env: '1A' is not an environment variable name"),
    ('setup: ["a\\nb"]', "cluster profile bad: setup[0]: expected a one-line string"),
])
def test_profile_mistakes_name_the_key(tmp_path, monkeypatch, text, message):
    (tmp_path / "bad.yaml").write_text(text + "\n")
    monkeypatch.setenv("CIFAR_DIST_CLUSTERS", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_profile("bad")


def test_dev_cluster_profiles_find_its_config_without_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_DIST_SLURM_DIR", str(tmp_path))
    local = load_profile("local")
    with pytest.raises(ClusterError, match="the dev cluster is not up .* start it with: slurm/dev-cluster.sh up"):
        submit_environment(local)
    (tmp_path / "slurm.conf").write_text("")
    assert submit_environment(local) == {"SLURM_CONF": str(tmp_path / "slurm.conf")}
    assert submit_environment(load_profile("example-gpu")) == {}


def normalise(text: str, sweep_dir: Path) -> str:
    text = text.replace(str(sweep_dir), "<SWEEP_DIR>").replace(sys.executable, "<PYTHON>")
    return re.sub(r"fast-lr-[0-9a-f]{6}-", "fast-lr-<uid>-", text)


def test_dry_run_prints_points_and_the_exact_sbatch_script(tmp_path):
    """Golden file: the example GPU profile, 2 nodes x 8 GPUs, grid x random. To accept a change
    on purpose: UPDATE_GOLDEN=1 pytest tests/test_sweeps.py."""
    spec = tmp_path / "fast-lr.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "fast-lr", "cluster": "example-gpu", "base": "fast", "overrides": {"train.epochs": 10},
        "sweep": {"grid": {"train.lr": [0.2, 0.4]},
                  "random": {"n": 2, "seed": 0, "params": {"train.label_smoothing": {"uniform": [0.0, 0.2]}}}},
        "resources": {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 8, "mem": 400,
                      "time_min": 240, "signal_delay_s": 120, "array_parallelism": 2, "partition": "gpu-preempt",
                      "qos": "high", "constraint": "a100&ib",
                      "sbatch": {"gres": "gpu:a100:8", "exclude": "node[1-3]", "reservation": "maint-x",
                                 "mail_type": "END,FAIL", "exclusive": True, "nice": 10}}}, sort_keys=False))
    sweep_dir = tmp_path / "sweep"
    env = slurm_env(tmp_path / "cache", tmp_path)
    out = submitted([str(spec), "--dry-run", "--executor", "slurm", "--sweep-dir", str(sweep_dir)], env, tmp_path)
    assert not sweep_dir.exists() and not (tmp_path / "sweeps").exists(), "a dry run writes nothing"
    text = normalise(out.stdout, sweep_dir)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_a_spec_without_a_sweep_block_is_one_point(tmp_path):
    spec = load_spec(spec_file(tmp_path, sweep=None, overrides={"train.lr": 0.2}))
    [point] = make_points(spec, tmp_path / "sw", "abc123")
    assert (point.name, point.values, point.run_id, point.config["train"]["lr"]) == ("000", {}, "s-abc123-000", 0.2)
    assert point.config["run"]["name"] == "s/000"
    with pytest.raises(ConfigError, match=re.escape("sweep: empty (give grid and/or random, or leave sweep: out")):
        load_spec(spec_file(tmp_path, sweep={}))


@pytest.mark.parametrize(("sbatch", "message"), [
    ({"gres": "gpu:a100:8", "exclude": "node[1-3]", "mail_user": "me@lab.org", "exclusive": True, "nice": 5}, None),
    ({"job_name": "x"}, "resources.sbatch.job_name: not an option a spec may pass to sbatch (allowed: begin,"),
    ({"array": "0-9"}, "resources.sbatch.array: not an option"),
    ({"exclude": "n1 --wrap=x"}, "resources.sbatch.exclude: 'n1 --wrap=x' is not one sbatch value"),
    ({"comment": "$(touch /tmp/x)"}, "is not one sbatch value"),
    ({"reservation": "r\n#SBATCH --time=1"}, "is not one sbatch value"),
    ({"exclusive": False}, "resources.sbatch.exclusive: false; leave the option out instead"),
    ({"nice": -5}, "resources.sbatch.nice: must be >= 0"),
    ({"gres": ["gpu:1"]}, "resources.sbatch.gres: expected a string or an integer or true or false"),
])
def test_sbatch_pass_through_is_validated(tmp_path, sbatch, message):
    path = spec_file(tmp_path, resources={"sbatch": sbatch})
    if message is None:
        assert load_spec(path).resources.sbatch == {"gres": "gpu:a100:8", "exclude": "node[1-3]",
                                                    "mail-user": "me@lab.org", "exclusive": True, "nice": "5"}
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(path)


@pytest.mark.parametrize(("time_min", "delay", "message"), [
    (1, 30, "resources.time_min: 1 min leaves 30 s before the signal (signal_delay_s 30), but Slurm may send it 60 s "
            "early and a run needs about 60 s to start; give time_min >= 3 or a smaller signal_delay_s"),
    (4, 90, None),  # 150 s before the signal: 60 s early margin + 60 s start-up fit
    (3, 90, "give time_min >= 4"),
    (2, 0, None),
])
def test_a_time_limit_must_leave_the_early_signal_and_start_up(tmp_path, time_min, delay, message):
    path = spec_file(tmp_path, resources={"time_min": time_min, "signal_delay_s": delay})
    if message is None:
        assert load_spec(path).resources.time_min == time_min
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(path)


def test_cluster_flag_beside_a_spec_names_executor(tmp_path):
    """--cluster names a command-line sweep's profile; a spec names its own, so beside one it is an error."""
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "x.yaml", "x", {"grid": {"seed": [0]}})
    proc = submit([str(spec), "--dry-run", "--cluster", "local"], env, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: --cluster: the spec names its cluster profile itself (cluster:); where its points "
                           "run is --executor (--executor local)\n")


def test_without_slurm_the_sweep_runs_on_the_local_executor(tmp_path, cache_dir):
    """No sbatch or srun on PATH: the same command runs the points as local processes, says so in
    one line, returns at once, and runs at most array_parallelism points at a time."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = slurm_env(cache_dir, tmp_path, PATH=str(empty_bin))
    spec = write_spec(tmp_path / "loc.yaml", "loc", {"grid": {"seed": [0, 1, 2]}}, resources={"array_parallelism": 2})
    out = submitted([str(spec)], env, tmp_path)  # the default sweep dir: sweeps/<name>
    first = out.stdout.splitlines()[0]
    assert first.startswith("no Slurm on this machine") and "local executor" in first
    sweep_dir = tmp_path / "sweeps" / "loc"
    assert record(sweep_dir)["executor"] == "local"
    # Seen after submit returned: it did not wait for the points (nor run more than two at once).
    wait_for(lambda: sorted(s["state"] for s in status(sweep_dir, env)) == ["pending", "running", "running"], 60,
             "two points running, one waiting for a slot", sweep_dir, poll=0.1)
    states = wait_done(sweep_dir, env, timeout=180)
    spans = []
    for point, state in zip(record(sweep_dir)["points"], states):
        run_dir = Path(point["run_dir"])
        summary = RunDir(run_dir).summary()
        assert summary["world_size"] == 1 and state["accuracy"] == summary["test_accuracy"]
        assert summary["run_id"] == point["run_id"]
        spans.append(((run_dir / ENV).stat().st_mtime, (run_dir / SUMMARY).stat().st_mtime))
    for t, _ in spans:  # at any run's start, at most 2 runs (itself included) are under way
        assert sum(a <= t < b for a, b in spans) <= 2, spans


def test_debug_executor_runs_in_this_process(tmp_path, cache_dir):
    env = slurm_env(cache_dir, tmp_path)
    spec = write_spec(tmp_path / "dbg.yaml", "dbg", {"grid": {"seed": [0]}}, overrides={"train.epochs": 1})
    out = submitted([str(spec), "--executor", "debug", "--sweep-dir", str(tmp_path / "sw")], env, tmp_path)
    assert "done: test accuracy" in out.stdout, "trained before submit returned"
    assert [s["state"] for s in status(tmp_path / "sw", env)] == ["done"]


def test_existing_sweep_dir_is_refused(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "x.yaml", "x", {"grid": {"seed": [0]}})
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "keep").write_text("mine")
    proc = submit([str(spec), "--sweep-dir", str(tmp_path / "sw"), "--executor", "local"], env, tmp_path)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["keep"]


def test_max_points_lifts_the_cap(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "big.yaml", "big", {"grid": {"seed": list(range(40)), "train.lr": [0.1] * 30}})
    capped = submit([str(spec), "--dry-run", "--executor", "local"], env, tmp_path)
    assert capped.returncode == 2 and "1,200 points exceeds the cap of 1,000" in capped.stderr
    lifted = submit([str(spec), "--dry-run", "--executor", "local", "--max-points", "1200"], env, tmp_path)
    assert lifted.returncode == 0 and "1200 point(s)" in lifted.stdout


@pytest.mark.parametrize(("reads", "code", "looks"), [
    (["failed", "running", "done"], 0, 3),  # a moment's "ended without a result" (a requeue in passing) is not believed
    (["failed", "failed"], 1, 2),  # read twice, SETTLE_SECONDS apart: it is over
    (["done"], 0, 1),
])
def test_wait_looks_twice_before_calling_a_point_failed(monkeypatch, capsys, reads, code, looks):
    """`wait`'s logic alone, on a scripted sequence of point states (the race it guards against, a
    requeued job between its two lives, cannot be produced on demand on the real Slurm)."""
    from cifar_dist.sweep import commands
    from cifar_dist.sweep.states import PointState

    script = iter(reads)
    seen, slept = [], []
    monkeypatch.setattr(commands, "open_sweep", lambda d: None)
    monkeypatch.setattr(commands, "sweep_states", lambda sweep, retry_for: seen.append(1) or [
        PointState("000", "1_0", next(script), None, None, "", "lr=0.1")])
    monkeypatch.setattr(commands.time, "sleep", slept.append)
    assert commands.main(["wait", "sweeps/x", "--poll", "1"]) == code
    assert len(seen) == looks
    assert slept.count(commands.SETTLE_SECONDS) == (1 if "failed" in reads else 0)


# ---------------------------------------------------------------------------- Slurm's and submitit's spellings

# The golden dry run's resources, in the internal form and then in each other spelling a user brings.
INTERNAL = {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 8, "mem": 400, "time_min": 240,
            "signal_delay_s": 120, "array_parallelism": 2, "max_timeouts": 3, "partition": "gpu-preempt",
            "account": "my-lab", "qos": "high", "constraint": "a100&ib",
            "sbatch": {"gres": "gpu:a100:8", "exclude": "node[1-3]", "reservation": "maint-x", "mail_type": "END,FAIL",
                       "exclusive": True, "nice": 10}}
SPELLINGS = {
    "slurm": {"nodes": 2, "gpus-per-node": 8, "ntasks-per-node": 8, "cpus-per-task": 8, "mem": "400G",
              "time": "4:00:00", "signal_delay_s": 120, "array_parallelism": 2, "partition": "gpu-preempt",
              "account": "my-lab", "qos": "high", "constraint": "a100&ib", "gres": "gpu:a100:8", "exclusive": True,
              "reservation": "maint-x", "sbatch": {"exclude": "node[1-3]", "mail-type": "END,FAIL", "nice": 10}},
    "submitit": {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 8, "mem_gb": 400,
                 "timeout_min": 240, "slurm_signal_delay_s": 120, "slurm_array_parallelism": 2, "max_num_timeout": 3,
                 "slurm_partition": "gpu-preempt", "slurm_account": "my-lab", "slurm_qos": "high",
                 "slurm_constraint": "a100&ib", "slurm_gres": "gpu:a100:8", "slurm_exclusive": True,
                 "sbatch": {"exclude": "node[1-3]", "reservation": "maint-x", "mail_type": "END,FAIL", "nice": 10}},
    "sbatch lines": {"signal_delay_s": 120, "array_parallelism": 2, "sbatch": {
        "nodes": 2, "gpus-per-node": 8, "ntasks-per-node": 8, "cpus-per-task": 8, "mem": "409600", "time": "0-04:00",
        "partition": "gpu-preempt", "account": "my-lab", "qos": "high", "constraint": "a100&ib", "gres": "gpu:a100:8",
        "exclude": "node[1-3]", "reservation": "maint-x", "mail-type": "END,FAIL", "exclusive": True, "nice": 10}},
}


def dry_run_of(tmp_path: Path, resources: dict, name: str = "fast-lr", **fields) -> str:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "cluster": "example-gpu", "base": "fast", **fields,
                                    "resources": resources}, sort_keys=False))
    sweep_dir = tmp_path / "sweep"
    out = submitted([str(spec), "--dry-run", "--executor", "slurm", "--sweep-dir", str(sweep_dir)],
                    slurm_env(tmp_path / "cache", tmp_path), tmp_path)
    return normalise(out.stdout, sweep_dir)


def test_every_spelling_of_the_resources_makes_the_same_dry_run(tmp_path):
    """Slurm's names (mem: 400G, time: 4:00:00, ntasks-per-node, gres, exclusive, reservation),
    submitit's (mem_gb, timeout_min, the slurm_ prefix) and sbatch's own options under `sbatch:` (with
    Slurm's units: a bare mem is MB) are each read into the one internal form: the dry run, which
    shows that form and the sbatch script, is the same for all of them, and the Slurm time written
    unquoted in YAML is read as a time, not YAML 1.1's base-60 number."""
    expected = dry_run_of(tmp_path, INTERNAL)
    assert ("resources: nodes=2 gpus_per_node=8 tasks_per_node=8 cpus_per_task=8 mem=400 GB time_min=240 (4:00:00) "
            "array_parallelism=2 signal_delay_s=120 max_timeouts=3 partition=gpu-preempt account=my-lab qos=high "
            "constraint=a100&ib; sbatch: exclude=node[1-3] exclusive gres=gpu:a100:8 mail-type=END,FAIL nice=10 "
            "reservation=maint-x\n") in expected
    assert "#SBATCH --mem=400GB\n" in expected and "#SBATCH --time=240\n" in expected
    for spelling, resources in SPELLINGS.items():
        assert dry_run_of(tmp_path, resources) == expected, spelling
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("name: u\nbase: debug\nresources: {time: 2:00:00, mem: 8G}\n")
    assert (load_spec(unquoted).resources.time_min, load_spec(unquoted).resources.mem) == (120, 8.0)


@pytest.mark.parametrize(("written", "minutes"), [
    (90, 90), ("90", 90), ("30:30", 31), ("2:00:00", 120), ("1-00:00:00", 1440), ("1-2", 1560), ("1-2:30", 1590),
    ("0-04:00:30", 241),
])
def test_slurm_time_forms(tmp_path, written, minutes):
    assert load_spec(spec_file(tmp_path, resources={"time": written})).resources.time_min == minutes


@pytest.mark.parametrize(("resources", "gb"), [
    ({"mem": "32G"}, 32), ({"mem": "32GB"}, 32), ({"mem": "1.5T"}, 1536), ({"mem": "512M"}, 0.5), ({"mem": 16}, 16),
    ({"mem_gb": 16}, 16), ({"sbatch": {"mem": 32768}}, 32), ({"sbatch": {"mem": "16G"}}, 16),
])
def test_memory_forms(tmp_path, resources, gb):
    assert load_spec(spec_file(tmp_path, resources=resources)).resources.mem == gb


@pytest.mark.parametrize(("resources", "message"), [
    ({"mem": "32G", "mem_gb": 32}, "resources.mem, resources.mem_gb: two spellings of the memory per node; give one"),
    ({"time_min": 60, "time": "1:00:00"}, "resources.time_min, resources.time: two spellings of the time limit"),
    ({"timeout_min": 60, "sbatch": {"time": 60}}, "resources.timeout_min, resources.sbatch.time: two spellings of the time"),
    ({"account": "a", "sbatch": {"account": "b"}}, "resources.account, resources.sbatch.account: two spellings of account"),
    ({"gres": "gpu:1", "sbatch": {"gres": "gpu:1"}}, "resources.gres, resources.sbatch.gres: two spellings of sbatch's --gres"),
    ({"tasks_per_node": 2, "ntasks-per-node": 2}, "resources.tasks_per_node, resources.ntasks-per-node: two spellings"),
    ({"partition": "a", "slurm_partition": "a"}, "resources.partition, resources.slurm_partition: two spellings"),
    ({"time": "2h"}, "resources.time: expected minutes or Slurm's [days-]hours:minutes:seconds, got '2h'"),
    ({"time_min": "2:00:00"}, "resources.time_min: whole minutes, got '2:00:00'; Slurm's [days-]hours:minutes:seconds "
                              "goes in resources.time"),
    ({"mem": "lots"}, "resources.mem: expected a size such as 32G, 500M or a number of GB, got 'lots'"),
])
def test_two_spellings_of_one_thing_and_bad_forms_are_one_line(tmp_path, resources, message):
    with pytest.raises(ConfigError) as e:
        load_spec(spec_file(tmp_path, resources=resources))
    assert str(e.value).startswith(message)


def test_two_spellings_through_the_command_line_are_one_line_exit_2(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "x.yaml", "x", {"grid": {"seed": [0]}}, resources={"mem_gb": 4, "mem": "4G"})
    proc = submit([str(spec), "--dry-run", "--executor", "local"], env, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: resources.mem_gb, resources.mem: two spellings of the memory per node; give one\n"


# ---------------------------------------------------------------------------- sweeps from the command line


def the_points(spec) -> list[tuple[dict, str]]:
    from cifar_dist.config import config_from_dict, config_hash

    return [(p.values, config_hash(config_from_dict(p.config))) for p in make_points(spec, Path("sw"), "abc123")]


@pytest.mark.parametrize("argv", [
    ["--config", "medium", "--grid", "train.lr=0.01,0.1", "--grid", "seed=0,1", "--cluster", "local",
     "train.epochs=2", "data.source=synthetic"],
    ["-m", "--config", "medium", "train.lr=0.01,0.1", "seed=0,1", "train.epochs=2", "data.source=synthetic"],
    ["--multirun", "train.lr=0.01,0.1", "--config", "medium", "seed=0,1", "data.source=synthetic", "train.epochs=2"],
])
def test_a_command_line_sweep_is_its_yaml_twin(tmp_path, argv):
    """The same points with the same config hashes as the spec file a user would write, and as the
    spec `--print-spec` prints (which reads back to the same sweep)."""
    from cifar_dist.sweep.commands import cli_spec, parse_args, spec_yaml
    from cifar_dist.sweep.spec import read_spec

    args = parse_args(argv, "cifar-dist sweep")
    cli = read_spec(args.spec_data, Path.cwd())
    twin = tmp_path / "twin.yaml"
    twin.write_text("name: medium\ncluster: local\nbase: medium\noverrides: {train.epochs: 2, data.source: synthetic}\n"
                    "sweep:\n  grid: {train.lr: [0.01, 0.1], seed: [0, 1]}\n")
    assert the_points(cli) == the_points(load_spec(twin))
    assert [v for v, _ in the_points(cli)] == [{"train.lr": lr, "seed": s} for lr in (0.01, 0.1) for s in (0, 1)]
    assert len({h for _, h in the_points(cli)}) == 4
    printed = tmp_path / "printed.yaml"
    printed.write_text(spec_yaml(args.spec_data))
    assert the_points(load_spec(printed)) == the_points(cli)
    assert cli_spec(["medium"], [], ["tracking.tags=[a,b]"], True, None, None)["overrides"] == {"tracking.tags": ["a", "b"]}


def test_a_command_line_sweep_submits_what_its_printed_spec_submits(tmp_path):
    """Through the command: --print-spec's YAML, and the dry runs of the command line and of that
    file, are the same sweep (run ids aside: each submission draws its own)."""
    env = slurm_env(tmp_path / "cache", tmp_path)
    line = ["--config", "debug", "--grid", "train.lr=0.01,0.1", "seed=3", "resources.time=1:00:00", "--executor", "local"]
    printed = submitted([*line, "--print-spec"], env, tmp_path).stdout
    assert yaml.safe_load(printed) == {"name": "debug", "cluster": "local", "base": "debug", "overrides": {"seed": 3},
                                       "sweep": {"grid": {"train.lr": [0.01, 0.1]}}, "resources": {"time": "1:00:00"}}
    (tmp_path / "debug.yaml").write_text(printed)
    runs = [submitted([*args, "--dry-run", "--sweep-dir", str(tmp_path / "sw")], env, tmp_path).stdout
            for args in (line, [str(tmp_path / "debug.yaml"), "--executor", "local"])]
    same = [re.sub(r"debug-[0-9a-f]{6}-", "debug-<uid>-", text) for text in runs]
    assert same[0] == same[1] and "train.lr=0.1 seed=3" not in same[0] and "train.lr=0.1" in same[0]
    assert "time_min=60 (1:00:00)" in same[0]
    assert not (tmp_path / "sw").exists() and not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["spec.yaml", "--config", "debug"], "spec.yaml and --config: give a spec file or a sweep on the command line"),
    (["--config", "debug", "--config", "fast", "--grid", "seed=0,1"], "--config: a sweep has one base config, got 2"),
    (["--config", "debug", "--grid", "train.lrr=1,2"], "train.lrr: unknown key"),
    (["--config", "debug", "--grid", "seed=0,1", "seed=2"], "seed: given twice on the command line"),
    (["--grid", "seed=0,1"], "give a sweep spec file, or --config NAME with --grid KEY=V1,V2"),
    (["--config", "debug", "train.lr=0.01,0.1"], "train.lr: expected a number, got '0.01,0.1' (str); to sweep over "
                                                 "these values: --grid train.lr=0.01,0.1, or -m"),
])
def test_command_line_sweep_mistakes(argv, message, tmp_path):
    from cifar_dist.sweep import commands

    (tmp_path / "spec.yaml").write_text("name: s\nbase: debug\n")
    with pytest.raises(UserError) as e:
        commands.cmd_submit(commands.parse_args([a.replace("spec.yaml", str(tmp_path / "spec.yaml")) for a in argv],
                                                "cifar-dist sweep"))
    assert message in str(e.value)


def test_help_names_the_command_as_typed(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    cli = subprocess.run([sys.executable, "-m", "cifar_dist.cli", "sweep", "--help"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout.startswith("usage: cifar-dist sweep ")
    assert "jobs/submit.py" not in cli.stdout and "docstring" not in cli.stdout
    assert "cifar-dist sweep status|wait|cancel|resubmit SWEEP_DIR" in " ".join(cli.stdout.split())
    script = submit(["status", "--help"], env, tmp_path)
    assert script.returncode == 0 and script.stdout.startswith(f"usage: python {ROOT / 'jobs' / 'submit.py'} status")

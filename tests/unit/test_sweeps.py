"""Sweep specs without a cluster: expansion (grid x random, seeded), mistakes, cluster profiles and
their lookup, the sbatch pass-through and time-limit rules, `wait`'s second look, and the command's
refusals. The dry run's golden sbatch script and the local and debug executors:
tests/e2e/test_sweeps.py."""


from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_dist.errors import ConfigError, UserError
from cifar_dist.sweep.points import make_points
from cifar_dist.sweep.profiles import SHIPPED_PROFILES, ClusterError, load_profile, submit_environment
from cifar_dist.sweep.record import PointEntry, WorkerEntry, load_record, save_record
from cifar_dist.sweep.spec import expand, load_spec
from tests.helpers import ROOT
from tests.helpers.slurm import slurm_env, submit, write_spec


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


def test_existing_sweep_dir_is_refused(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "x.yaml", "x", {"grid": {"seed": [0]}})
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "keep").write_text("mine")
    proc = submit([str(spec), "--sweep-dir", str(tmp_path / "sw"), "--executor", "local"], env, tmp_path)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["keep"]


@pytest.mark.parametrize(("reads", "code", "looks"), [
    (["failed", "running", "done"], 0, 3),  # a moment's "ended without a result" (a requeue in passing) is not believed
    (["failed", "failed"], 1, 2),  # read twice, SETTLE_SECONDS apart: it is over
    (["done"], 0, 1),
])
def test_wait_looks_twice_before_calling_a_point_failed(monkeypatch, capsys, reads, code, looks):
    """`wait`'s logic alone, on a scripted sequence of point states (the race it guards against, a
    requeued job between its two lives, cannot be produced on demand on the real Slurm)."""
    from cifar_dist.sweep import commands
    from cifar_dist.sweep.record import SweepRecord
    from cifar_dist.sweep.states import PointState

    script = iter(reads)
    seen, slept = [], []
    monkeypatch.setattr(commands, "open_sweep", lambda d: commands.Sweep(Path(d), SweepRecord(), None))
    monkeypatch.setattr(commands, "sweep_states", lambda sweep, retry_for: seen.append(1) or [
        PointState("000", "1_0", next(script), None, None, "", "lr=0.1")])
    monkeypatch.setattr(commands.time, "sleep", slept.append)
    assert commands.main(["wait", "sweeps/x", "--poll", "1"]) == code
    assert len(seen) == looks
    assert slept.count(commands.SETTLE_SECONDS) == (1 if "failed" in reads else 0)


def test_cluster_flag_beside_a_spec_names_executor(tmp_path):
    """--cluster names a command-line sweep's profile; a spec names its own, so beside one it is an error."""
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "x.yaml", "x", {"grid": {"seed": [0]}})
    proc = submit([str(spec), "--dry-run", "--cluster", "local"], env, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: --cluster: the spec names its cluster profile itself (cluster:); where its points "
                           "run is --executor (--executor local)\n")


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
    from cifar_dist.config import config_from_dict
    from cifar_dist.result_keys import config_hash

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
    from cifar_dist.sweep.cli_spec import cli_spec, spec_yaml
    from cifar_dist.sweep.commands import parse_args
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

"""The sweep command as a user runs it, without a cluster: the dry run's exact sbatch script against a
golden file, the point cap and --max-points, the fallbacks that need no Slurm (the local and debug
executors train their points), and a disk that fills right after a submit. Specs, profiles and the
command's refusals: tests/unit/test_sweeps.py."""


from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from filelock import FileLock

from cifar_dist.rundir import ENV, SUMMARY, RunDir
from cifar_dist.sweep.executors import SLOTS, LocalExecutor
from cifar_dist.sweep.spec import load_spec
from tests.helpers import ROOT
from tests.helpers.full_disk import fill, small_disk
from tests.helpers.search import succeeded, sweep_command
from tests.helpers.slurm import INTERNAL, SPELLINGS, record, slurm_env, status, submit, submitted, wait_done, wait_for, write_spec

GOLDEN = ROOT / "tests" / "golden" / "dryrun_example_gpu.txt"


def normalise(text: str, sweep_dir: Path) -> str:
    text = text.replace(str(sweep_dir), "<SWEEP_DIR>").replace(sys.executable, "<PYTHON>")
    return re.sub(r"fast-lr-[0-9a-f]{6}-", "fast-lr-<uid>-", text)


def test_dry_run_prints_points_and_the_exact_sbatch_script(tmp_path):
    """Golden file: the example GPU profile, 2 nodes x 8 GPUs, grid x random. To accept a change
    on purpose: UPDATE_GOLDEN=1 pytest tests/e2e/test_sweeps.py."""
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


def test_max_points_lifts_the_cap(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "big.yaml", "big", {"grid": {"seed": list(range(40)), "train.lr": [0.1] * 30}})
    capped = submit([str(spec), "--dry-run", "--executor", "local"], env, tmp_path)
    assert capped.returncode == 2 and "1,200 points exceeds the cap of 1,000" in capped.stderr
    lifted = submit([str(spec), "--dry-run", "--executor", "local", "--max-points", "1200"], env, tmp_path)
    assert lifted.returncode == 0 and "1200 point(s)" in lifted.stdout


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


def test_help_names_the_command_as_typed(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    cli = subprocess.run([sys.executable, "-m", "cifar_dist.cli", "sweep", "--help"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert cli.returncode == 0 and cli.stdout.startswith("usage: cifar-dist sweep ")
    assert "jobs/submit.py" not in cli.stdout and "docstring" not in cli.stdout
    assert "cifar-dist sweep status|wait|cancel|resubmit|repair SWEEP_DIR" in " ".join(cli.stdout.split())
    script = submit(["status", "--help"], env, tmp_path)
    assert script.returncode == 0 and script.stdout.startswith(f"usage: python {ROOT / 'jobs' / 'submit.py'} status")


def test_a_disk_that_fills_right_after_the_submit_loses_no_job(tmp_path, cache_dir, monkeypatch):
    """The sweep dir's disk (a real tmpfs) fills the moment the jobs are started, before their ids are
    saved: submit says so in one line (exit 1, the ids, no traceback) and sweep.json keeps the
    submission's intent; status and cancel find the jobs (waiting for the run slot this test holds)
    from their submitit files, on the full disk; once there is room, resubmit records them and
    trains both points to the end."""
    env = slurm_env(cache_dir, tmp_path)
    spec = write_spec(tmp_path / "full.yaml", "full", {"grid": {"seed": [0, 1]}}, resources={"array_parallelism": 1})
    with small_disk(tmp_path / "disk") as disk:
        sweep_dir = disk / "sweep"
        slot, ballast = FileLock(sweep_dir / SLOTS / "slot-0"), []
        start_jobs = LocalExecutor.submit

        def submit_then_fill(self, *args):
            (sweep_dir / SLOTS).mkdir()
            slot.acquire()  # the points wait for it: they stay queued until cancelled
            jobs = start_jobs(self, *args)
            ballast.append(fill(disk))
            return jobs

        monkeypatch.setattr(LocalExecutor, "submit", submit_then_fill)
        proc = sweep_command([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env)
        monkeypatch.undo()
        said = re.fullmatch(r"error: 2 job\(s\) submitted \((\d+) (\d+)\), but \S+/sweep.json could not be updated \(No "
                            r"space left on device\): status, wait and cancel find them [^\n]*\n", proc.stderr)
        assert proc.returncode == 1 and said, proc.stderr
        ids = list(said.groups())
        saved = record(sweep_dir)
        assert [p["job_id"] for p in saved["points"]] == [None, None] and saved["submissions"][-1]["job_ids"] == []

        shown = succeeded(["status", str(sweep_dir), "--json"], env)
        assert [(s["job_id"], s["state"]) for s in json.loads(shown.stdout)] == [(ids[0], "pending"), (ids[1], "pending")]
        assert f"found in submitit's files: {' '.join(ids)}" in shown.stderr
        assert ids[0] in succeeded(["cancel", str(sweep_dir)], env).stdout
        wait_for(lambda: all(s["state"] not in ("pending", "running") for s in status(sweep_dir, env)), 60,
                 "the cancelled jobs to end", sweep_dir)

        ballast[0].unlink()
        slot.release()
        succeeded(["resubmit", str(sweep_dir), "--failed"], env)
        wait_done(sweep_dir, env, timeout=240)
        saved = record(sweep_dir)
        assert [p["job_ids"][0] for p in saved["points"]] == ids, "the first jobs recorded, then their resubmission"
        assert [s["job_ids"][:2] for s in saved["submissions"]][0] == ids

"""Sweeps on a real one-node Slurm (slurm/dev-cluster.sh up): `python jobs/submit.py` submits
one job array and returns; points train as real Slurm tasks (gloo ranks); a pre-empted point is
requeued and resumes exactly; cancel and resubmit; bad specs submit nothing."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
import yaml
from conftest import assert_same_run, read_jsonl
from slurm_fixtures import (
    dev_cluster,
    job_ids,
    logs,
    newest_step,
    record,
    restart_requeued,
    slurm_env,
    squeue,
    status,
    submit,
    submitted,
    wait_done,
    wait_for,
    with_conf,
    write_spec,
)
from submitit.core.utils import pickle_load

from cifar_dist.rundir import CHECKPOINTS, CONFIG, METRICS, SUMMARY, RunDir

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    with dev_cluster(1) as conf:
        yield conf


@pytest.fixture
def senv(cluster, cache_dir, tmp_path):
    return slurm_env(cache_dir, tmp_path)


def test_grid_sweep_is_one_job_array_that_returns_at_once(tmp_path, senv):
    bait = [f"$(touch {tmp_path}/pwned)", f"`touch {tmp_path}/pwned2`; echo 'x' | cat > {tmp_path}/pwned3"]
    spec = write_spec(tmp_path / "grid.yaml", "grid", {"grid": {"train.lr": [0.05, 0.1], "seed": [0, 1]}},
                      overrides={"tracking.tags": bait})
    sweep_dir = tmp_path / "sweep"
    dry = submitted([str(spec), "--dry-run", "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    assert not sweep_dir.exists(), "a dry run writes nothing"

    start = time.monotonic()
    out = submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    assert time.monotonic() - start < 20, "submit must not wait for the jobs"
    ids = job_ids(sweep_dir)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(4)], "one array task per point, one array"
    assert all(i in out.stdout for i in ids)
    queued = [line.split()[0] for line in squeue(senv)]
    assert set(ids) & set(queued), "submit returned before the jobs ran: some are still queued or running"
    # The script Slurm got is exactly what --dry-run printed.
    script = (sweep_dir / "submitit" / f"{array}_submission.sh").read_text()
    assert script == dry.stdout.split("_submission.sh) ---\n", 1)[1]

    states = wait_done(sweep_dir, senv)
    for point, state in zip(record(sweep_dir)["points"], states):
        run_dir = sweep_dir / "runs" / point["name"]
        summary = RunDir(run_dir).summary()
        assert state["accuracy"] == summary["test_accuracy"] and state["step"] == summary["steps"] == 40
        assert any("test_accuracy" in r for r in read_jsonl(run_dir / METRICS))
        assert list((run_dir / CHECKPOINTS).glob("step_*/COMPLETE"))
        cfg = (run_dir / CONFIG).read_text()
        assert f"id: {point['run_id']}" in cfg and "group: grid" in cfg
        saved = yaml.safe_load(cfg)
        assert (saved["train"]["lr"], saved["seed"]) == (point["values"]["train.lr"], point["values"]["seed"])
        assert saved["tracking"]["tags"] == bait, "values reach the run as data"
    assert not list(tmp_path.glob("pwned*")), "a config value went through a shell"
    text = submit(["status", str(sweep_dir)], senv, tmp_path).stdout
    assert "4 done" in text
    assert squeue(senv) == []


def test_one_point_as_two_slurm_tasks_is_two_gloo_ranks(tmp_path, senv):
    spec = write_spec(tmp_path / "two.yaml", "two", {"grid": {"seed": [0]}}, resources={"tasks_per_node": 2})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    wait_done(sweep_dir, senv)
    run_dir = sweep_dir / "runs" / "000"
    summary = RunDir(run_dir).summary()
    assert summary["world_size"] == 2
    assert summary["hosts"] == [socket.gethostname()] * 2
    job = job_ids(sweep_dir)[0]
    for rank in (0, 1):  # two Slurm tasks, each a submitit task that returned train()'s summary
        outcome, result = pickle_load(sweep_dir / "submitit" / f"{job}_{rank}_result.pkl")
        assert outcome == "success" and result["world_size"] == 2
    assert len(list((run_dir / CHECKPOINTS).glob("step_*"))) == 1, "rank 0 alone writes"


# Failed once in three full runs on a loaded 2-core VM: point 000 read as "ended without a result"
# after the early release. Probably the dev cluster's lost requeue that restart_requeued now
# handles (seen in the multi-node test), but not seen here; one rerun stays as a guard for CI.
@pytest.mark.flaky(reruns=1)
def test_preempted_point_is_requeued_and_resumes_exactly(tmp_path, senv):
    # Two points that train identically (checkpoint.keep does not change training): 000 is
    # pre-empted with Slurm's own signal, 001 runs through; they must end the same.
    spec = write_spec(tmp_path / "rq.yaml", "rq", {"grid": {"checkpoint.keep": [2, 3]}}, overrides={"train.epochs": 6})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    target = job_ids(sweep_dir)[0]
    run0, run1 = sweep_dir / "runs" / "000", sweep_dir / "runs" / "001"
    wait_for(lambda: newest_step(run0) >= 20, 120, "point 000 to train 20 steps", sweep_dir, poll=0.05)

    subprocess.run(["scancel", "--signal=USR2", target], env=with_conf(senv), check=True, timeout=30)
    wait_for(lambda: status(sweep_dir, senv)[0]["state"] == "requeued", 60, "point 000 requeued", sweep_dir)
    stops = sorted(p.name for p in (run0 / CHECKPOINTS).glob("step_*"))
    assert stops and int(stops[-1].removeprefix("step_")) < 120, "a checkpoint at the stop, before the end"
    assert not (run0 / SUMMARY).exists()

    restart_requeued(target, sweep_dir, senv)
    wait_done(sweep_dir, senv)
    log = (sweep_dir / "submitit" / f"{target}_0_log.out").read_text()
    assert f"resumed from {run0 / 'checkpoints' / stops[-1]}" in log, logs(sweep_dir)
    assert_same_run(run0, run1)
    assert job_ids(sweep_dir)[0] == target, "requeued, not resubmitted: same job id"


def test_cancel_stops_without_requeue_and_resubmit_resumes(tmp_path, senv):
    spec = write_spec(tmp_path / "c.yaml", "cancel-me", {"grid": {"seed": [3]}}, overrides={"train.epochs": 10})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    first = job_ids(sweep_dir)[0]
    run_dir = sweep_dir / "runs" / "000"
    wait_for(lambda: newest_step(run_dir) >= 20, 120, "20 steps", sweep_dir, poll=0.05)

    out = submitted(["cancel", str(sweep_dir)], senv, tmp_path)
    assert first in out.stdout
    wait_for(lambda: squeue(senv) == [], 60, "the cancelled job to leave the queue", sweep_dir)
    time.sleep(2)  # a requeue (the bug this guards against) would bring it back within this
    assert squeue(senv) == []
    assert [s["state"] for s in status(sweep_dir, senv)] == ["cancelled"]
    assert list((run_dir / CHECKPOINTS).glob("step_*/COMPLETE")), "SIGTERM still checkpoints"

    out = submitted(["resubmit", str(sweep_dir), "--failed"], senv, tmp_path)
    second = job_ids(sweep_dir)[0]
    assert second != first and record(sweep_dir)["points"][0]["job_ids"] == [first, second]
    wait_done(sweep_dir, senv)
    assert "resumed from" in (sweep_dir / "submitit" / f"{second}_0_log.out").read_text()
    assert RunDir(run_dir).summary()["steps"] == 200
    out = submitted(["resubmit", str(sweep_dir), "--failed"], senv, tmp_path)
    assert "no failed" in out.stdout and job_ids(sweep_dir)[0] == second


BAD_SPECS = {
    "unknown-key": ({"nmae": "x"}, "nmae: unknown key"),
    "unknown-config-key": ({"overrides": {"train.lrr": 0.1}}, "train.lrr: unknown key"),
    "config-type": ({"overrides": {"train.lr": "fast"}}, "train.lr: expected a number"),
    "empty-grid": ({"sweep": {"grid": {"seed": []}}}, "sweep.grid.seed: empty list"),
    "no-sweep": ({"sweep": {}}, "sweep: empty"),
    "huge": ({"sweep": {"grid": {"seed": list(range(11)), "train.lr": [0.1] * 11, "data.flip": [True] * 11}}},
             "1,331 points exceeds the cap of 1,000"),
    "bad-distribution": ({"sweep": {"random": {"n": 2, "params": {"train.lr": {"gaussian": [0, 1]}}}}},
                         "unknown distribution 'gaussian'"),
    "loguniform-zero": ({"sweep": {"random": {"n": 2, "params": {"train.lr": {"loguniform": [0, 1]}}}}},
                        "low must be > 0"),
    "gpus-dont-fit": ({"resources": {"gpus_per_node": 1}}, "resources.gpus_per_node: 1, but cluster profile 'local'"),
    "nodes-dont-fit": ({"resources": {"nodes": 2}}, "resources.nodes: 2 nodes"),
    "tasks-dont-fit": ({"resources": {"tasks_per_node": 3}}, "3 tasks x 1 CPUs per node"),
    "time-shorter-than-signal": ({"resources": {"time_min": 1, "signal_delay_s": 90}},
                                 "resources.time_min: 1 min leaves 0 s before the signal"),
    "sbatch-option": ({"resources": {"sbatch": {"output": "/tmp/x"}}}, "resources.sbatch.output: not an option"),
    "sbatch-value": ({"resources": {"sbatch": {"comment": "x\n#SBATCH --wrap=touch /tmp/x"}}}, "is not one sbatch value"),
    "batch-split": ({"overrides": {"train.batch_size": 63}, "resources": {"tasks_per_node": 2}},
                    "63 does not split evenly over 2 ranks"),
    "reserved-key": ({"overrides": {"run.dir": "/tmp/x"}}, "run.dir: set by the sweep"),
    "unknown-profile": ({"cluster": "nowhere"}, "unknown cluster profile 'nowhere'"),
    "shell-in-name": ({"name": "x; rm -rf ~"}, "name: 'x; rm -rf ~' may hold only"),
    "sbatch-injection": ({"resources": {"partition": "debug\n#SBATCH --wrap=touch /tmp/x"}}, "is not a Slurm name"),
    "grid-and-random": ({"sweep": {"grid": {"seed": [0]}, "random": {"n": 2, "params": {"seed": {"int": [0, 9]}}}}},
                        "seed: in both sweep.grid and sweep.random"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_fails_in_one_line_and_submits_nothing(case, tmp_path, senv):
    change, message = BAD_SPECS[case]
    base = yaml.safe_load(write_spec(tmp_path / "good.yaml", "good", {"grid": {"seed": [0, 1]}}).read_text())
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**base, **change}))
    proc = submit([str(spec)], senv, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "sweeps").exists(), "nothing written"
    assert squeue(senv) == [], "nothing submitted"

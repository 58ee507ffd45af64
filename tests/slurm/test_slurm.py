"""Sweeps on a real one-node Slurm (slurm/dev-cluster.sh up): `python jobs/submit.py` submits
one job array and returns; points train as real Slurm tasks (gloo ranks); a pre-empted point is
requeued and resumes exactly, also pre-empted again and again under a short time limit; a disk
that fills right after sbatch; cancel (plain scancel too) and resubmit; concurrent submits and
resubmits into one sweep dir; `wait` across a controller restart; slurm/train.sbatch with 2 ranks
stopped, requeued and resumed; bad specs submit nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from submitit.core.utils import pickle_load

from cifar_dist.rundir import CHECKPOINTS, CONFIG, ENV, METRICS, SUMMARY, RunDir
from cifar_dist.sweep.executors import SlurmExecutor
from tests.helpers import PY, ROOT, TINY, assert_same_run, read_jsonl
from tests.helpers.full_disk import fill, small_disk
from tests.helpers.search import succeeded, sweep_command
from tests.helpers.slurm import (
    SLURM_CONF,
    dev_cluster,
    finish,
    job_fields,
    job_ids,
    logs,
    newest_step,
    record,
    restart_requeued,
    slurm_env,
    squeue,
    start,
    start_requeued,
    status,
    submit,
    submitted,
    wait_done,
    wait_for,
    with_conf,
    write_spec,
)

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
                      overrides={"tracking.tags": bait}, resources={"sbatch": {"comment": "lr[1-2]&x", "nice": 5}})
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
    fields = job_fields(ids[0], senv)  # resources.sbatch reached sbatch as one value each, quotes undone
    assert (fields["Comment"], fields["Nice"]) == ("lr[1-2]&x", "5"), fields

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
    # A task's result is on disk a moment before Slurm sees its process exit.
    wait_for(lambda: squeue(senv) == [], 60, "the finished array to leave the queue", sweep_dir)


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


def test_a_disk_that_fills_right_after_sbatch_loses_no_job(tmp_path, senv, monkeypatch):
    """The sweep dir's disk (a real tmpfs) fills the moment sbatch has taken the array, before its
    ids are saved: submit says so in one line (exit 1), status and cancel find the jobs (held by
    their begin time: pending) from their submitit files, on the full disk; once there is room,
    repair records their ids in sweep.json."""
    spec = write_spec(tmp_path / "full.yaml", "full", {"grid": {"seed": [0, 1]}},
                      resources={"sbatch": {"begin": "now+1hour"}})
    with small_disk(tmp_path / "disk") as disk:
        sweep_dir, ballast = disk / "sweep", []
        sbatch_then_fill = SlurmExecutor.submit

        def submit_then_fill(self, *args):
            jobs = sbatch_then_fill(self, *args)
            ballast.append(fill(disk))
            return jobs

        monkeypatch.setattr(SlurmExecutor, "submit", submit_then_fill)
        proc = sweep_command([str(spec), "--sweep-dir", str(sweep_dir)], senv)
        monkeypatch.undo()
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert "job(s) submitted (" in proc.stderr and "(No space left on device)" in proc.stderr, proc.stderr
        queued = sorted(line.split()[0] for line in squeue(senv))
        assert len(queued) == 2 and [p["job_id"] for p in record(sweep_dir)["points"]] == [None, None]

        assert [(s["job_id"], s["state"]) for s in status(sweep_dir, senv)] == [(j, "pending") for j in queued]
        assert " ".join(queued) in succeeded(["cancel", str(sweep_dir)], senv).stdout
        wait_for(lambda: squeue(senv) == [], 60, "the cancelled array to leave the queue", sweep_dir)

        ballast[0].unlink()
        succeeded(["repair", str(sweep_dir)], senv)
        assert [p["job_ids"] for p in record(sweep_dir)["points"]] == [[j] for j in queued]
        # Not "cancelled": the cancel list could not be written on the full disk (cancel said so).
        assert {s["state"] for s in status(sweep_dir, senv)} <= {"cancelled", "failed"}, "resubmit --failed takes them"


def test_cancel_stops_without_requeue_and_resubmit_resumes(tmp_path, senv):
    # 1,600 steps: the cancel (a new Python process, seconds to start) must land while the point still trains.
    spec = write_spec(tmp_path / "c.yaml", "cancel-me", {"grid": {"seed": [3]}}, overrides={"train.epochs": 80})
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
    assert RunDir(run_dir).summary()["steps"] == 1600
    out = submitted(["resubmit", str(sweep_dir), "--failed"], senv, tmp_path)
    assert "no failed" in out.stdout and job_ids(sweep_dir)[0] == second


def test_plain_scancel_cancels_a_whole_array_without_requeue(tmp_path, senv):
    """The cancel behaviour chosen for #22: a task that stops on SIGTERM asks Slurm for its job's
    state, and a job Slurm is ending (no longer RUNNING) is not requeued."""
    spec = write_spec(tmp_path / "sc.yaml", "sc", {"grid": {"seed": [0, 1]}}, overrides={"train.epochs": 10})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    ids = job_ids(sweep_dir)
    runs = [sweep_dir / "runs" / name for name in ("000", "001")]
    wait_for(lambda: all(newest_step(r) >= 10 for r in runs), 180, "both points to train 10 steps", sweep_dir, poll=0.1)

    subprocess.run(["scancel", ids[0].split("_")[0]], env=with_conf(senv), check=True, timeout=30)
    wait_for(lambda: squeue(senv) == [], 60, "the cancelled array to leave the queue", sweep_dir)
    time.sleep(5)  # the requeue this guards against brought jobs back within seconds
    assert squeue(senv) == []
    assert [s["state"] for s in status(sweep_dir, senv)] == ["cancelled", "cancelled"], logs(sweep_dir)
    for job, run_dir in zip(ids, runs):
        log = (sweep_dir / "submitit" / f"{job}_0_log.out").read_text()
        ours = [line for line in log.splitlines() if line.strip() and not line.startswith("submitit ")]
        assert ours[-1].startswith("not requeued: cancelled: Slurm is ending the job itself"), log[-2000:]
        assert list((run_dir / CHECKPOINTS).glob("step_*/COMPLETE")), "SIGTERM still checkpoints"


def test_short_time_limit_survives_several_preemptions(tmp_path, senv):
    """time_min 4 (submitit would count every signal of a <= 10 min job as a time-out, and
    max_timeouts 1 would then stop the point at the second): four pre-emptions are free, and the
    point ends exactly as an uninterrupted one."""
    spec = write_spec(tmp_path / "short.yaml", "short", {"grid": {"checkpoint.keep": [2, 3]}},
                      # 1,600 steps: every pre-emption lands while the point still trains, on a fast machine too
                      overrides={"train.epochs": 80}, resources={"time_min": 4, "signal_delay_s": 30, "max_timeouts": 1})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    target = job_ids(sweep_dir)[0]
    run0, run1 = sweep_dir / "runs" / "000", sweep_dir / "runs" / "001"
    for k in range(1, 5):
        wait_for(lambda k=k: newest_step(run0) >= 25 * k, 180, f"point 000 at step {25 * k}", sweep_dir, poll=0.05)
        subprocess.run(["scancel", "--signal=USR2", target], env=with_conf(senv), check=True, timeout=30)
        wait_for(lambda: status(sweep_dir, senv)[0]["state"] == "requeued", 60, f"pre-emption {k} requeued", sweep_dir)
        restart_requeued(target, sweep_dir, senv, until_running=k < 4)
    wait_done(sweep_dir, senv)
    text = (sweep_dir / "submitit" / f"{target}_0_log.err").read_text()  # submitit's own log lines
    assert text.count("this job is preempted") == 4 and "timed-out" not in text, text[-3000:]
    assert_same_run(run0, run1)


def test_concurrent_submits_and_resubmits_into_one_sweep_dir_one_wins(tmp_path, senv):
    # 1,200 steps: the cancel must land while the points still train (shorter runs may end before it)
    specs = [write_spec(tmp_path / f"{name}.yaml", name, {"grid": {"seed": [0, 1]}}, overrides={"train.epochs": 60})
             for name in ("alpha", "beta")]
    sweep_dir = tmp_path / "sweep"
    results = [finish(p) for p in [start([str(s), "--sweep-dir", str(sweep_dir)], senv, tmp_path) for s in specs]]
    [winner] = [i for i, r in enumerate(results) if r.returncode == 0]
    loser = results[1 - winner]
    assert loser.returncode == 2 and loser.stdout == "", loser.stderr
    assert loser.stderr.count("\n") == 1 and "exists and is not empty" in loser.stderr, loser.stderr
    name = ("alpha", "beta")[winner]
    rec = record(sweep_dir)
    assert rec["name"] == name and all(p["run_id"].startswith(f"{name}-") for p in rec["points"])
    assert {line.split()[0] for line in squeue(senv)} <= set(job_ids(sweep_dir)), "every job queued is the record's"

    runs = [Path(p["run_dir"]) for p in rec["points"]]
    wait_for(lambda: all(newest_step(r) >= 10 for r in runs), 180, "both points to train 10 steps", sweep_dir, poll=0.1)
    submitted(["cancel", str(sweep_dir)], senv, tmp_path)
    wait_for(lambda: squeue(senv) == [], 60, "the cancelled jobs to leave the queue", sweep_dir)
    assert [s["state"] for s in status(sweep_dir, senv)] == ["cancelled", "cancelled"]
    first = job_ids(sweep_dir)
    results = [finish(p) for p in [start(["resubmit", str(sweep_dir), "--failed"], senv, tmp_path) for _ in range(2)]]
    assert sum("submitted as" in r.stdout for r in results) == 1, results
    for r in results:  # the other one found the sweep busy, or nothing left to resubmit
        assert (r.returncode == 0 and ("submitted as" in r.stdout or "resubmit: no failed" in r.stdout)
                or r.returncode == 2 and "is changing this sweep; nothing done" in r.stderr), r
    second = job_ids(sweep_dir)
    assert [p["job_ids"] for p in record(sweep_dir)["points"]] == [[a, b] for a, b in zip(first, second)]
    assert {line.split()[0] for line in squeue(senv)} <= set(second)
    for point, state in zip(record(sweep_dir)["points"], wait_done(sweep_dir, senv)):
        summary = RunDir(point["run_dir"]).summary()
        assert summary["run_id"] == point["run_id"] and state["accuracy"] == summary["test_accuracy"]


def test_wait_rides_out_a_controller_restart(tmp_path, senv):
    # 2,400 steps: the point must still train through the ~35 s outage, on a fast machine too
    spec = write_spec(tmp_path / "o.yaml", "outage", None, overrides={"train.epochs": 120})
    sweep_dir = tmp_path / "sweep"
    submitted([str(spec), "--sweep-dir", str(sweep_dir)], senv, tmp_path)
    wait_for(lambda: newest_step(sweep_dir / "runs" / "000") >= 10, 120, "10 steps", sweep_dir, poll=0.1)
    waiter = start(["wait", str(sweep_dir), "--poll", "1", "--timeout", "400"], senv, tmp_path)
    time.sleep(3)
    controller = int((SLURM_CONF.parent / "slurmctld.pid").read_text())
    os.kill(controller, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(f"/proc/{controller}"), 30, "slurmctld to stop")
    time.sleep(25)  # squeue fails after about 9 s here: wait has seen the outage
    assert waiter.poll() is None, finish(waiter)
    subprocess.run(["slurmctld"], env=with_conf(senv), check=True, timeout=60)
    done = finish(waiter, timeout=400)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{logs(sweep_dir)}"
    err = done.stderr.splitlines()
    assert len(err) == 2 and "Unable to contact slurm controller" in err[0], done.stderr
    assert err[0].endswith("asking again for up to 600 s") and err[1].startswith("the scheduler answers again, after ")
    assert [s["state"] for s in status(sweep_dir, senv)] == ["done"]


def test_sbatch_template_with_two_ranks_stops_with_75_requeues_itself_and_resumes_exactly(tmp_path, senv):
    """slurm/train.sbatch, one Slurm task per rank: SIGTERM (a signal, the job still RUNNING) ->
    every rank and the script exit 75 and the job requeues itself; the resumed life is cancelled
    by a plain scancel -> exit 75, not requeued; a new job with the same run.dir ends exactly as an
    uninterrupted run. Each rank computes with the one CPU it asked for."""
    env = with_conf({**senv, "PYTHON": PY})
    args = [*TINY, "train.epochs=8", "checkpoint.every_steps=10"]

    def sbatch(run_dir) -> tuple[str, object]:
        proc = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node", "2", str(ROOT / "slurm" / "train.sbatch"),
                               *args, f"run.dir={run_dir}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=True)
        job = proc.stdout.strip()
        return job, tmp_path / f"slurm-{job}.out"

    def ended(job) -> bool:
        return not any(line.split()[0] == job for line in squeue(senv))

    ref, ref_out = sbatch(tmp_path / "ref")
    wait_for(lambda: ended(ref), 300, f"reference job {ref} to end")
    assert RunDir(tmp_path / "ref").summary()["world_size"] == 2, ref_out.read_text()[-3000:]

    run_dir = tmp_path / "stopped"
    job, out = sbatch(run_dir)
    wait_for(lambda: newest_step(run_dir) >= 20, 180, "20 steps", poll=0.05)
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True, timeout=30)
    wait_for(lambda: "requeueing job" in out.read_text(), 60, f"job {job} to requeue itself")
    text = out.read_text()
    assert "srun: error: " in text and "Exited with exit code 75" in text, text[-3000:]
    assert "the ranks exited 75 (stopped, checkpointed); requeueing job" in text
    start_requeued(job, senv, lambda: "resumed from" in out.read_text(), 240, "the second life to resume")
    stopped_at = newest_step(run_dir)
    wait_for(lambda: newest_step(run_dir) >= stopped_at + 10, 120, "the second life to train", poll=0.05)
    subprocess.run(["scancel", job], env=env, check=True, timeout=30)
    wait_for(lambda: ended(job), 60, f"job {job} to end")
    fields = job_fields(job, senv)
    assert (fields["JobState"], fields["ExitCode"]) == ("CANCELLED", "75:0"), fields
    assert "not requeued (JobState=" in out.read_text()
    time.sleep(3)
    assert ended(job), "a cancelled job stays cancelled"
    assert not (run_dir / SUMMARY).exists()

    again, again_out = sbatch(run_dir)
    wait_for(lambda: ended(again), 300, f"job {again} to end")
    assert "resumed from" in again_out.read_text(), again_out.read_text()[-3000:]
    assert_same_run(tmp_path / "ref", run_dir)
    for d in (tmp_path / "ref", run_dir):  # the rank's compute threads: its --cpus-per-task
        assert json.loads((d / ENV).read_text())["device"].endswith(", 1 threads)")


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

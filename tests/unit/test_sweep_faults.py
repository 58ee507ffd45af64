"""The sweep commands under faults, without a cluster: the time-out rule for any time limit, the
sweep dir's record guarded against concurrent commands, results accepted only from the point's
own run and job, and `wait`/`status` riding out an unreachable scheduler. The same on the real
dev cluster: tests/slurm/test_slurm.py."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from submitit.core.utils import cloudpickle_dump

from cifar_dist.config import config_from_dict
from cifar_dist.rundir import CONFIG, SUMMARY, write_json
from cifar_dist.sweep import commands
from cifar_dist.sweep.executors import Executor, QueueError
from cifar_dist.sweep.points import make_points
from cifar_dist.sweep.record import RECORD, PointEntry, SweepRecord, save_record
from cifar_dist.sweep.spec import load_spec
from cifar_dist.sweep.states import PointState, foreign, point_states
from cifar_dist.sweep.sweepdir import LOCK, changing, discard, mark_cancelled
from cifar_dist.sweep.task import process_age_s, timed_out
from tests.helpers.slurm import slurm_env, submit, write_spec


def test_a_stop_is_a_time_out_only_within_the_signals_reach_of_the_limit():
    # 5 min limit, signal asked 30 s before it: Slurm sends it from 300 - 30 - 60 (early) = 210 s
    # into the life on; 10 s more for the job's start before this process.
    assert not timed_out(199, 5, 30), "a pre-emption, although submitit counts every signal of a <= 10 min job"
    assert timed_out(200, 5, 30) and timed_out(290, 5, 30)
    assert not timed_out(3 * 3600, 240, 90) and timed_out(240 * 60 - 160, 240, 90)


def test_process_age_is_the_time_since_this_process_started():
    expected = time.time() - psutil.Process().create_time()
    assert abs(process_age_s() - expected) < 1.0


# ---------------------------------------------------------------------------- results: the point's own run and job


def finished_point(tmp_path: Path, run_id_in_summary: str | None = None, lr_in_run: float | None = None,
                   result: tuple[str, Any] | None = ("success", None)) -> tuple[Path, PointEntry]:
    """A sweep dir with one point whose run dir holds a finished run (summary.json, config.yaml)
    and whose job left `result` (None: no result pickle; a None value: the summary it returned)."""
    spec = load_spec(spec_file(tmp_path))
    sweep_dir = tmp_path / "sw"
    [p] = make_points(spec, sweep_dir, "abc123")
    point = dataclasses.replace(p, job_id="77_0", job_ids=["77_0"])
    run_dir = Path(p.run_dir)
    run_dir.mkdir(parents=True)
    cfg = config_from_dict(p.config)
    if lr_in_run is not None:
        cfg.train.lr = lr_in_run
    (run_dir / CONFIG).write_text(cfg.to_yaml())
    summary = {"run_id": run_id_in_summary or p.run_id, "test_accuracy": 0.5, "steps": 40}
    write_json(run_dir / SUMMARY, summary)
    if result is not None:
        kind, value = result
        folder = sweep_dir / "submitit"
        folder.mkdir()
        cloudpickle_dump((kind, summary if value is None else value), folder / "77_0_0_result.pkl")
    return sweep_dir, point


def state_of(sweep_dir: Path, point: PointEntry, queue: dict[str, str] | None = None) -> PointState:
    [state] = point_states(sweep_dir, SweepRecord(points=[point]), queue or {})
    return state


def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "debug", "overrides": {"train.lr": 0.1}}))
    return path


def test_a_point_is_done_only_with_its_own_run_and_its_own_jobs_result(tmp_path):
    sweep_dir, point = finished_point(tmp_path)
    done = state_of(sweep_dir, point)
    assert (done.state, done.accuracy, done.note) == ("done", 0.5, "")
    assert state_of(sweep_dir, point, {"77_0": "running"}).state == "done", "Slurm still shows it COMPLETING"


@pytest.mark.parametrize(("fault", "note"), [
    ({"run_id_in_summary": "other-spec-000"}, "run dir holds run other-spec-000, not s-abc123-000"),
    ({"lr_in_run": 0.3}, "run dir holds another config (hash "),
])
def test_another_runs_result_is_a_mismatch_never_done(tmp_path, fault, note):
    sweep_dir, point = finished_point(tmp_path, **fault)
    for queue in ({}, {"77_0": "running"}):
        state = state_of(sweep_dir, point, queue)
        assert state.state == "mismatch" and note in state.note, state
        assert state.accuracy is None and state.step is None, "nothing of the other run is shown as this point's"
    assert foreign(point, Path(point.run_dir))


@pytest.mark.parametrize(("result", "note"), [
    (("error", "RunDirError: run.dir: .../000 is in use by pid 12 on n1"), "summary.json not returned by job 77_0 "
                                                                          "(RunDirError: run.dir: .../000 is in use"),
    (None, "summary.json not returned by job 77_0 (no result)"),
    (("success", {"run_id": "other-spec-000"}), "summary.json not returned by job 77_0"),
])
def test_a_summary_the_recorded_job_did_not_return_is_a_mismatch(tmp_path, result, note):
    """The point's own run finished, but not by the job the record names (another job trained in its run dir)."""
    sweep_dir, point = finished_point(tmp_path, result=result)
    state = state_of(sweep_dir, point)
    assert state.state == "mismatch" and state.note.startswith(note), state
    assert not foreign(point, Path(point.run_dir)), "its own run: resubmit --failed may confirm it"
    assert state_of(sweep_dir, point, {"77_0": "requeued"}).state == "requeued", "its job is still at it"


@pytest.mark.parametrize(("cancelled", "result"), [("77", None), ("77_0", None), ("77_0", ("error", "SIGTERM"))])
def test_a_run_that_finished_as_cancel_landed_is_cancelled_not_done(tmp_path, cancelled, result):
    """`cancel` (the whole array or one task) killed the job after its run wrote summary.json,
    before the job returned it."""
    sweep_dir, point = finished_point(tmp_path, result=result)
    mark_cancelled(sweep_dir, [cancelled])
    state = state_of(sweep_dir, point)
    assert state.state == "cancelled", state
    assert "resubmit --failed" in state.note
    assert state_of(sweep_dir, point, {"77_0": "running"}).state == "running", "Slurm has not ended it yet"


# ---------------------------------------------------------------------------- one command at a time changes a sweep


def test_a_sweep_dir_being_changed_refuses_a_second_command_in_one_line(tmp_path):
    env = slurm_env(tmp_path / "cache", tmp_path)
    spec = write_spec(tmp_path / "x.yaml", "x", None)
    fresh = tmp_path / "fresh"
    with changing(fresh, "submit", new=True):  # another submit is creating it
        proc = submit([str(spec), "--executor", "local", "--sweep-dir", str(fresh)], env, tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (f"error: --sweep-dir: {fresh} exists and is not empty; resubmit with 'python jobs/submit.py "
                           f"resubmit {fresh} --failed' or choose another --sweep-dir\n")
    assert [p.name for p in fresh.iterdir()] == [LOCK], "the loser wrote nothing"

    sweep_dir, point = finished_point(tmp_path, result=("error", "killed"))
    save_record(sweep_dir, SweepRecord(name="s", uid="abc123", profile="local", executor="local", points=[point]))
    before = (sweep_dir / RECORD).read_text()
    for command in (["resubmit", str(sweep_dir), "--failed"], ["cancel", str(sweep_dir)]):
        with changing(sweep_dir, "resubmit"):
            proc = submit(command, env, tmp_path)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert re.fullmatch(rf"error: {sweep_dir}: busy, resubmit \(pid {os.getpid()} on \S+, since [0-9:]+\) is changing "
                            r"this sweep; nothing done, run it again when that has finished\n", proc.stderr), proc.stderr
    assert (sweep_dir / RECORD).read_text() == before


def test_a_failed_submission_takes_back_only_what_it_made(tmp_path):
    made, empty = tmp_path / "made", tmp_path / "empty"
    empty.mkdir()
    for folder in (made, empty):
        with pytest.raises(RuntimeError), changing(folder, "submit", new=True) as created:
            (folder / "spec.yaml").write_text("x")
            try:
                raise RuntimeError("sbatch failed")
            except RuntimeError:
                discard(folder, created)
                raise
    assert not made.exists() and empty.is_dir() and not any(empty.iterdir())


# ---------------------------------------------------------------------------- an unreachable scheduler


class Silent(Executor):
    """A scheduler whose squeue fails `outage` times, then answers."""

    name = "silent"

    def __init__(self, outage: int) -> None:
        self.outage = outage

    def queue_states(self, job_ids: list[str]) -> dict[str, str]:
        if self.outage:
            self.outage -= 1
            raise QueueError("squeue failed: slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
        return {}


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic and time.sleep of the commands module, without waiting: the pauses taken."""
    now, pauses = [0.0], []

    def sleep(s: float) -> None:
        pauses.append(s)
        now[0] += s

    monkeypatch.setattr(commands.time, "sleep", sleep)
    monkeypatch.setattr(commands.time, "monotonic", lambda: now[0])
    return pauses


@pytest.mark.parametrize("command", ["status", "wait"])
def test_status_and_wait_ride_out_a_scheduler_outage(monkeypatch, capsys, clock, tmp_path, command):
    sweep_dir, point = finished_point(tmp_path)
    sweep = commands.Sweep(sweep_dir, SweepRecord(points=[point], name="s", executor="silent", profile="local"), Silent(5))
    monkeypatch.setattr(commands, "open_sweep", lambda d, record_found=False: sweep)
    assert commands.main([command, str(sweep_dir)]) == 0
    assert clock == [2, 4, 8, 16, 32], "backoff, doubling"
    err = capsys.readouterr().err.splitlines()
    assert err == ["squeue failed: slurm_load_jobs error: Unable to contact slurm controller (connect failure); asking again "
                   "for up to 600 s", "the scheduler answers again, after 62 s"]


@pytest.mark.parametrize("command", ["status", "wait", "cancel"])
def test_a_scheduler_silent_for_too_long_is_exit_3_not_a_failed_point(monkeypatch, capsys, clock, tmp_path, command):
    sweep_dir, point = finished_point(tmp_path)
    save_record(sweep_dir, SweepRecord(points=[point]))
    sweep = commands.Sweep(sweep_dir, SweepRecord(points=[point]), Silent(10**6))
    monkeypatch.setattr(commands, "open_sweep", lambda d, record_found=False: sweep)
    assert commands.main([command, str(sweep_dir), "--retry-for", "300"]) == 3
    assert sum(clock) == 300 and max(clock) == 60
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("error: squeue failed: ") and err[1].endswith(
        "(for 300 s; the jobs may still be running)")

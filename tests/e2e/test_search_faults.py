"""Studies under faults, end to end on the local executor (real worker processes sharing one journal):
a worker whose wall clock is 15 minutes ahead, a worker stalled (SIGSTOP) beyond grace_s, a journal
that cannot be written for a few seconds, and a journal that lost its tail or was damaged. Live trials
are never failed, a stalled worker's trial is retried by another while the stalled one stops it and
asks again, and a study whose journal lost lines is refused in one line and rebuilt by `repair`.
The same faults at drawn moments, compared bit for bit: benchmarks/fault_campaign.py (clock_skew,
journal_errors)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cifar_dist.rundir import TRIAL, read_json
from cifar_dist.sweep.study import JOURNAL
from tests.helpers import ROOT
from tests.helpers.search import local_task_pid, search_spec, status, succeeded, sweep_command, trial_in_training
from tests.helpers.slurm import job_ids, logs, slurm_env, submitted, wait_for

SKEWED_CLOCK = ROOT / "tests" / "helpers" / "skewed_clock"  # its sitecustomize.py skews a process's wall clock
# Four epochs of 40 steps per trial: long enough for a fault to land inside one.
LONG_TRIAL = {"train.epochs": 4, "data.synthetic_train": 2560}


def study_spec(tmp_path: Path, name: str, search: dict) -> Path:
    return search_spec(tmp_path / f"{name}.yaml", name, {"sampler": "random", "pruner": "none", "heartbeat_s": 1,
                                                         **search}, overrides=LONG_TRIAL)


def wait_ok(sweep_dir: Path, env: dict) -> None:
    succeeded(["wait", str(sweep_dir), "--poll", "0.5", "--timeout", "400"], env)


def test_a_worker_whose_clock_is_15_minutes_ahead_fails_no_live_trial(tmp_path, cache_dir):
    """w1 joins from a node whose wall clock is 15 minutes ahead (every wall-clock read of its
    process), while w0 trains: with grace_s 20, a heartbeat judged by time would be 900 s old to w1,
    and w1's own 15 minutes in the future to w0. Neither trial is failed; both complete."""
    env = slurm_env(cache_dir, tmp_path)
    sweep_dir = tmp_path / "sweep"
    submitted([str(study_spec(tmp_path, "skew", {"trials": 2, "grace_s": 20})), "--executor", "local", "--sweep-dir",
               str(sweep_dir)], env, tmp_path)
    wait_for(lambda: trial_in_training(sweep_dir, "w0", 5), 240, "w0 training its trial", sweep_dir)
    skewed = {**env, "PYTHONPATH": str(SKEWED_CLOCK), "CIFAR_DIST_TEST_CLOCK_SKEW_S": "900"}
    succeeded(["resubmit", str(sweep_dir), "--workers", "1"], skewed)
    wait_ok(sweep_dir, env)
    table = status(sweep_dir, env)
    assert [(t["state"], t["note"]) for t in table["trials"]] == [("complete", ""), ("complete", "")], table["trials"]
    assert {t["worker"] for t in table["trials"]} == {"w0", "w1"}
    assert [w["state"] for w in table["workers"]] == ["done", "done"]
    log = logs(sweep_dir, tail=10**6)
    assert "heartbeat" not in log and "was failed by the study" not in log


def test_a_stalled_worker_loses_its_trial_to_a_retry_then_asks_again(tmp_path, cache_dir):
    """A worker stopped (SIGSTOP, every thread) mid-trial beyond grace_s: the other worker, with nothing
    left to ask, fails that trial and trains its retry. Continued (SIGCONT), the stalled worker learns
    from its heartbeat that its trial was taken, stops it at its next evaluation, records it failed, asks
    for another and ends done: no "Cannot tell a FAIL trial", and `wait` exits 0."""
    env = slurm_env(cache_dir, tmp_path)
    sweep_dir = tmp_path / "sweep"
    submitted([str(study_spec(tmp_path, "stall", {"trials": 2, "workers": 2, "grace_s": 6})), "--executor", "local",
               "--sweep-dir", str(sweep_dir)], env, tmp_path)
    workers = dict(zip(("w0", "w1"), job_ids(sweep_dir)))
    name, trial = wait_for(lambda: next(((w, t) for w in workers if (t := trial_in_training(sweep_dir, w, 5))), None),
                           240, "a worker inside a trial", sweep_dir, poll=0.05)
    pid = local_task_pid(workers[name])
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: any(t["note"].startswith(f"retry of {trial}") for t in status(sweep_dir, env)["trials"]), 300,
                 f"trial {trial} failed and retried while {name} is stopped", sweep_dir)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_ok(sweep_dir, env)
    table = status(sweep_dir, env)
    by_name = {t["trial"]: t for t in table["trials"]}
    (retry,) = [t for t in table["trials"] if t["note"].startswith(f"retry of {trial}")]
    assert by_name[trial]["state"] == "fail" and retry["state"] == "complete" and retry["worker"] != name
    assert retry["values"] == by_name[trial]["values"]
    assert read_json(sweep_dir / "runs" / trial / TRIAL)["note"].startswith("failed by the study: no heartbeat")
    assert [w["state"] for w in table["workers"]] == ["done", "done"], table["workers"]
    log = logs(sweep_dir, tail=10**6)
    assert f"heartbeat: trial {trial} was failed by the study" in log and "Cannot tell" not in log


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only bind mount of the journal needs root")
def test_a_journal_that_cannot_be_written_for_seconds_fails_no_trial(tmp_path, cache_dir):
    """The journal file read-only (a bind mount: the kernel's EROFS, even for root) for 3 s while its
    trial trains: the heartbeat and the reports say they cannot write and try again; the trial is not
    failed, not retried, and ends complete."""
    env = slurm_env(cache_dir, tmp_path)
    sweep_dir = tmp_path / "sweep"
    submitted([str(study_spec(tmp_path, "ro", {"trials": 1, "grace_s": 20})), "--executor", "local", "--sweep-dir",
               str(sweep_dir)], env, tmp_path)
    wait_for(lambda: trial_in_training(sweep_dir, "w0", 5), 240, "w0 inside its trial", sweep_dir, poll=0.05)
    journal = str(sweep_dir / JOURNAL)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", journal, journal], capture_output=True, text=True, timeout=30)
    assert mounted.returncode == 0, mounted.stderr
    try:
        time.sleep(3)  # the fault's length: three heartbeats
    finally:
        subprocess.run(["umount", "--lazy", journal], check=True, timeout=30)
    wait_ok(sweep_dir, env)
    table = status(sweep_dir, env)
    assert [(t["state"], t["epochs"]) for t in table["trials"]] == [("complete", 4)], table["trials"]
    log = logs(sweep_dir, tail=10**6)
    assert "cannot write (Read-only file system); trying again" in log and "written again after" in log, log[-3000:]


# ---------------------------------------------------------------------------- a journal that lost lines


@pytest.fixture(scope="module")
def finished_study(cache_dir, tmp_path_factory):
    """A study of three two-epoch trials, finished; each test damages a copy of it."""
    tmp = tmp_path_factory.mktemp("journal")
    env = slurm_env(cache_dir, tmp)
    sweep_dir = tmp / "sweep"
    spec = search_spec(tmp / "j.yaml", "j", {"trials": 3, "sampler": "random", "pruner": "none"},
                       overrides={"train.epochs": 2})
    submitted([str(spec), "--executor", "local", "--sweep-dir", str(sweep_dir)], env, tmp)
    wait_ok(sweep_dir, env)
    return sweep_dir, env, status(sweep_dir, env)


def cut_before_last_trial(journal: Path) -> None:
    """The journal as a restore from an older copy leaves it: every line from the last trial's creation on gone."""
    lines = journal.read_bytes().splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4)  # CREATE_TRIAL
    journal.write_bytes(b"".join(lines[:last]))


@pytest.mark.parametrize(("damage", "said"), [
    (cut_before_last_trial, "truncated: it holds 2 trial(s), but runs/ holds trial(s) 002"),
    (lambda j: j.write_bytes(j.read_bytes()[: j.stat().st_size * 2 // 3]), "truncated: "),
    (lambda j: j.write_bytes(b""), "damaged, no readable study in it (KeyError"),
    (lambda j: j.write_bytes(b"\x00\xff not a journal\n" + j.read_bytes()), "damaged, no readable study in it"),
])
def test_a_journal_that_lost_lines_is_refused_in_one_line_and_rebuilt_by_repair(finished_study, tmp_path, damage, said):
    original, env, before = finished_study
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(original, sweep_dir, symlinks=True)
    damage(sweep_dir / JOURNAL)
    for command in (["status", str(sweep_dir)], ["wait", str(sweep_dir), "--poll", "0.1"]):
        proc = sweep_command(command, env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {sweep_dir / JOURNAL}: {said}") and proc.stderr.endswith(
            f"; `python jobs/submit.py repair {sweep_dir}` rebuilds it from the trials' records\n"), proc.stderr
    repaired = succeeded(["repair", str(sweep_dir)], env)
    assert "study.journal rebuilt with 3 trial(s)" in repaired.stdout, repaired.stdout
    after = status(sweep_dir, env)
    assert after["best"] == before["best"] and after["trials"] == before["trials"]
    assert list(sweep_dir.glob(f"{JOURNAL}.damaged-*")), "the damaged journal is kept"
    assert "nothing to rebuild" in succeeded(["repair", str(sweep_dir)], env).stdout

"""cifar_dist/sweep/submitit_compat.py against the installed submitit: each function that touches
a private member is called for real, so a submitit release that moves one fails here, and the
failure names the member, instead of failing in a pre-empted job on a cluster."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import submitit

from cifar_dist.sweep import submitit_compat
from cifar_dist.sweep.submitit_compat import NotRequeued


@contextlib.contextmanager
def uses(member: str) -> Iterator[None]:
    """Turn a failure inside the block into one line naming the submitit member that moved."""
    try:
        yield
    except (AttributeError, TypeError, KeyError, ImportError, ValueError, AssertionError) as e:
        pytest.fail(f"submitit {submitit.__version__}: {member} no longer works as submitit_compat.py expects "
                    f"(tested with 1.5.4): {type(e).__name__}: {e}")


def test_sbatch_text_renders_the_array_script(tmp_path):
    params = {"job_name": "x", "nodes": 2, "ntasks_per_node": 4, "time": 30, "array_parallelism": 2,
              "additional_parameters": {"requeue": True}}
    with uses("SlurmExecutor.affinity/parameters['map_count']/_make_submission_file_text/_submitit_command_str"):
        text = submitit_compat.sbatch_text(tmp_path, params, 3)
        single = submitit_compat.sbatch_text(tmp_path, params, 1)
        assert "#SBATCH --array=0-2%2" in text and "#SBATCH --nodes=2" in text and "#SBATCH --requeue" in text
        assert f"-m submitit.core._submit {tmp_path}" in text
        assert "--array" not in single and "#SBATCH --job-name=x" in single


class Point(submitit.helpers.Checkpointable):
    """A checkpointable task, pickled like TrainTask (module level, so pickle finds it)."""

    def __call__(self) -> int:
        return 1


def local_job_environment(monkeypatch, folder: Path) -> submitit.JobEnvironment:
    """The JobEnvironment a task of local job 4242 sees (the variables submitit's local controller sets)."""
    for name, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_FOLDER": str(folder), "SUBMITIT_LOCAL_JOB_ID": "4242",
                        "SUBMITIT_LOCAL_NTASKS": "1", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                        "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    return submitit.JobEnvironment()


def submitted(job: submitit.JobEnvironment, max_num_timeout: int) -> submitit.helpers.DelayedSubmission:
    """The pickle submitit leaves for a job with a 60-minute limit: what its requeue path reads back."""
    delayed = submitit.helpers.DelayedSubmission(Point())
    delayed.set_timeout(60, max_num_timeout)
    job.paths.folder.mkdir(parents=True, exist_ok=True)
    delayed.dump(job.paths.submitted_pickle)
    return delayed


def test_checkpoint_and_requeue_runs_submitits_requeue_path_with_our_time_out_rule(monkeypatch, tmp_path):
    job = local_job_environment(monkeypatch, tmp_path)
    limits = []
    with uses("DelayedSubmission.load/_timeout_min/JobEnvironment._usr_sig/SignalHandler.has_timed_out/"
              "checkpoint_and_try_requeue"):
        submitted(job, 0)
        with pytest.raises(SystemExit):  # not a time-out: requeued (local: exit) although no time-out is left
            submitit_compat.checkpoint_and_requeue(job, lambda limit: limits.append(limit) or False)
        assert limits == [60], "the job's time limit in minutes, from its pickle"
        assert isinstance(submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle).function, Point)
        submitted(job, 0)
        with pytest.raises(NotRequeued, match="timed-out too many times"):
            submitit_compat.checkpoint_and_requeue(job, lambda limit: True)
        submitted(job, 1)
        with pytest.raises(SystemExit):  # a time-out with one left: requeued, the countdown spent
            submitit_compat.checkpoint_and_requeue(job, lambda limit: True)
        assert submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle)._timeout_countdown == 0


def test_local_jobs_files_liveness_and_cancel(tmp_path):
    """A real local job's controller is recognised and cancelled; a finished one's result and log are found."""
    ex = submitit.LocalExecutor(tmp_path)
    ex.update_parameters(timeout_min=2)
    # Functions the job process can unpickle without this test module on its path.
    quick, slow = ex.submit(dict, status="x"), ex.submit(time.sleep, 60)
    with uses("the local controller's module (submitit.local._local) and its SIGINT cancel"):
        assert submitit_compat.local_job_alive(slow.job_id)
        assert not submitit_compat.local_job_alive("999999999") and not submitit_compat.local_job_alive("x")
        assert not submitit_compat.local_job_alive("1"), "init is not a controller"
        submitit_compat.cancel_local_jobs([slow.job_id])  # returns once the controller has ended
        assert not submitit_compat.local_job_alive(slow.job_id), "cancelled"
    assert quick.result() == {"status": "x"}
    with uses("JobPaths(folder, job_id, task_id).result_pickle/.stderr and pickle_load"):
        assert submitit_compat.task_result(tmp_path, quick.job_id) == ("success", {"status": "x"})
        assert submitit_compat.task_log(tmp_path, quick.job_id).is_file()
        assert submitit_compat.task_result(tmp_path, "1234") is None
    debug = submitit.DebugExecutor(tmp_path / "debug").submit(dict, status="y")
    with uses("utils.temporary_save_path/cloudpickle_dump, Job.paths.result_pickle"):
        submitit_compat.save_result(debug, debug.result())
        assert submitit_compat.task_result(tmp_path / "debug", debug.job_id) == ("success", {"status": "y"})


# Stands in for a local controller whose first SIGINT came during an import and was swallowed
# (CPython: "Exception ignored in ... _get_module_lock ... KeyboardInterrupt"): its command line
# names the controller's module, it lets the first SIGINT pass and ends on the second.
DEAF_ONCE = """
import signal, sys, time
heard = []
signal.signal(signal.SIGINT, lambda *_: sys.exit(0) if heard else heard.append(1))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_a_controller_that_missed_its_sigint_gets_another(monkeypatch):
    monkeypatch.setattr(submitit_compat, "CANCEL_RESEND_S", 0.5)
    proc = subprocess.Popen([sys.executable, "-c", DEAF_ONCE, "-m", "submitit.local._local"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        job_id = str(proc.pid)
        assert submitit_compat.local_job_alive(job_id)
        submitit_compat.cancel_local_jobs([job_id])
        assert proc.wait(timeout=5) == 0, "ended by the second SIGINT"
        assert not submitit_compat.local_job_alive(job_id)
    finally:
        proc.kill()
        proc.wait()

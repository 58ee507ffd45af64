"""The one place that touches submitit's private members.

The sweep code needs a few things submitit's public API does not offer: the exact sbatch script
without submitting it, its own checkpoint-and-requeue path run at a moment the task chooses, the
local executor's controller process, and the files a job leaves behind. Each is a small function
here; the rest of cifar_dist/sweep/ uses only these and submitit's public classes
(`submitit.SlurmExecutor`, `LocalExecutor`, `DebugExecutor`, `JobEnvironment`, `helpers`).

Tested with submitit 1.5.4; pyproject.toml pins `>=1.5.4,<1.6`. tests/unit/test_submitit_compat.py
calls every function below against the installed submitit, so a release that moves one of these
members fails there, naming it, rather than in a pre-empted job on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import (
    DelayedSubmission,
    JobPaths,
    UncompletedJobError,
    cloudpickle_dump,
    pickle_load,
    temporary_save_path,
)

# submitit raises this when its checkpoint path will not requeue (timed out too many times).
NotRequeued = UncompletedJobError
# What the local executor's controller process runs: `python -m submitit.local._local FOLDER`.
LOCAL_CONTROLLER = b"submitit.local._local"


class _SbatchPreview(submitit.SlurmExecutor):
    """A SlurmExecutor that can be built without `srun` on PATH, only to render the sbatch script."""

    @classmethod
    def affinity(cls) -> int:
        return 2  # submitit's SlurmExecutor refuses to exist unless this is > 0


def sbatch_text(folder: Path, params: dict[str, Any], n_points: int) -> str:
    """The exact sbatch script submitit writes for `n_points` jobs with `params` (its own code renders it)."""
    ex = _SbatchPreview(folder)
    ex.update_parameters(**params)
    if n_points > 1:  # what SlurmExecutor's submit_array sets on its copy of the executor
        ex.parameters["map_count"] = n_points
    return ex._make_submission_file_text(ex._submitit_command_str, "preview")


class _SignalHandler(SignalHandler):
    """submitit's handler for the pre-emption signal, with the time-out decided by the caller.
    submitit's own rule calls a signal a time-out once min(0.8 x limit, limit - 10 min) has passed
    since the handler was made: with a limit of 10 minutes or less, every signal, pre-emptions
    included, would use up one of max_num_timeout."""

    def __init__(self, job: submitit.JobEnvironment, delayed: DelayedSubmission, timed_out: bool) -> None:
        super().__init__(job, job.paths, delayed)
        self._timed_out = bool(timed_out)

    def has_timed_out(self) -> bool:
        return self._timed_out


def checkpoint_and_requeue(job: submitit.JobEnvironment, timed_out: Callable[[int], bool]) -> None:
    """Run submitit's checkpoint-and-requeue for this job's task: it calls the task's `checkpoint()`,
    pickles the result and requeues the job (Slurm: scontrol requeue), then exits this process.
    `timed_out(limit_min)` says whether this stop counts against max_num_timeout, given the job's
    time limit in minutes. Raises `NotRequeued` when submitit will not requeue."""
    delayed = DelayedSubmission.load(job.paths.submitted_pickle)
    _SignalHandler(job, delayed, timed_out(delayed._timeout_min)).checkpoint_and_try_requeue(job._usr_sig())


def task_log(folder: Path, job_id: str) -> Path:
    """The stderr log of task 0 of `job_id`."""
    return JobPaths(folder, job_id=job_id, task_id=0).stderr


def task_result(folder: Path, job_id: str) -> tuple[str, Any] | None:
    """Task 0's result pickle, ("success", value) or ("error", traceback text); None before it exists."""
    path = JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    if not path.exists():
        return None
    try:
        return pickle_load(path)
    except Exception as e:  # an unreadable pickle is reported, not fatal to `status`
        return "error", f"unreadable result {path}: {e}"


def submitted_tasks(folder: Path) -> dict[str, Any]:
    """{job id: its task} for every job submitted from `folder`: submitit pickles each task before
    it asks the scheduler and names the pickle `<job id>_submitted.pkl` once the scheduler has
    answered, so these are the jobs the scheduler took, whatever was recorded after."""
    found = {}
    for path in sorted(folder.glob("*_submitted.pkl"), key=lambda p: p.stat().st_mtime):
        try:
            found[path.name.removesuffix("_submitted.pkl")] = DelayedSubmission.load(path).function
        except Exception:  # a pickle being rewritten (a requeue) or unreadable: not one of these
            continue
    return found


def save_result(job: submitit.Job, value: Any) -> None:
    """Write `value` as the job's task 0 result pickle, as a Slurm or local job's own process does
    (`task_result` reads it back): the debug executor runs its jobs in this process and keeps
    their results in memory only."""
    with temporary_save_path(job.paths.result_pickle) as tmp:
        cloudpickle_dump(("success", value), tmp)


# A controller that took its SIGINT ends within about a second (its tasks get SIGINT, then SIGKILL
# after 1 s); one alive this long after it missed it.
CANCEL_RESEND_S = 5.0
CANCEL_TRIES = 3


def local_job_alive(job_id: str) -> bool:
    """Whether the local executor's job is still running: its job id is the pid of its controller."""
    proc = Path(f"/proc/{job_id}")
    if not job_id.isdigit():
        return False
    for _ in range(100):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return False
        if cmdline or state == "Z":  # a zombie's command line is empty too: it has ended
            return LOCAL_CONTROLLER in cmdline
        # Empty for a moment just after submit: the controller is inside exec, its new command line not yet set.
        time.sleep(0.01)
    return False


def cancel_local_jobs(job_ids: list[str]) -> None:
    """As submitit's LocalJob.cancel does: SIGINT makes each controller kill its tasks (a LocalJob
    rebuilt from its id in another process has no handle on the controller to do it itself). A SIGINT
    that lands while a controller is still importing can be swallowed: CPython reports the
    KeyboardInterrupt as "Exception ignored in ... _get_module_lock" and goes on. So this waits for
    the controllers to end, and sends another SIGINT to one still alive CANCEL_RESEND_S later."""
    alive = [j for j in job_ids if local_job_alive(j)]
    for _ in range(CANCEL_TRIES):
        for job_id in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job_id), signal.SIGINT)
        deadline = time.monotonic() + CANCEL_RESEND_S
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [j for j in alive if local_job_alive(j)]
        if not alive:
            return

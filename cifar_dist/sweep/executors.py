"""Where a sweep's points run: one `Executor` class per submitit executor, all with the same methods.

    slurm  sbatch, one job array per submission; the queue is squeue, cancel is scancel
    local  the points as processes on this machine, no Slurm; at most `run_slots` at a time
    debug  in the submitting process, one point after another (pdb on an error)

A sweep dir's record keeps the executor's name; `EXECUTORS[name]` is its class, built for one
sweep dir and cluster profile. A new executor is a subclass here and an entry in `EXECUTORS`;
nothing else branches on the name. submitit's private members stay in submitit_compat.py.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import submitit
from filelock import FileLock, Timeout

from cifar_dist.errors import ConfigError
from cifar_dist.sweep import submitit_compat
from cifar_dist.sweep.profiles import ClusterError, Profile, apply_submit_environment
from cifar_dist.sweep.resources import Resources
from cifar_dist.sweep.states import last_line
from cifar_dist.sweep.sweepdir import submitit_folder

SLOTS = "slots"  # <sweep dir>/slots/: the local executor's run slots (locks) and "<job id>.running" markers
# Variables a job must not inherit from the shell it is submitted from: a sweep submitted from
# inside another job would otherwise join that job's allocation or process group.
INHERITED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class SubmitError(ClusterError):
    """The scheduler refused or failed; nothing of this submission is left behind."""


class QueueError(ClusterError):
    """The scheduler could not be asked (squeue failed)."""


class Executor:
    """Runs the points of one sweep dir on one kind of machine. Every command (submit, status,
    wait, cancel, resubmit, the dry run) goes through these methods."""

    name: ClassVar[str]
    requeues: ClassVar[bool] = True  # a task stopped by a signal may requeue its job through submitit

    def __init__(self, sweep_dir: Path, profile: Profile) -> None:
        self.sweep_dir = sweep_dir
        self.profile = profile
        self.folder = submitit_folder(sweep_dir)

    def check(self, r: Resources) -> None:
        """Refuse (ConfigError) resources this executor cannot give; the profile's limits are
        checked by resources.check_fits."""

    def connect(self) -> None:
        """Make the scheduler's commands reachable from this process, before submit, queue_states or cancel."""

    def run_slots(self, r: Resources) -> int:
        """How many points the tasks themselves let run at once (TrainTask.local_slots); 0 = the scheduler decides."""
        return 0

    def submit(self, job_name: str, r: Resources, tasks: list[Callable[[], Any]]) -> list[submitit.Job]:
        """One job per task, as one array where the scheduler has them; returns without waiting."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            return self._submit(job_name, r, tasks)
        except Exception as e:  # sbatch's own message, whatever submitit wraps it in
            text = str(e).strip().splitlines()
            raise SubmitError(f"submission failed: {text[-1] if text else type(e).__name__}") from None

    def _submit(self, job_name: str, r: Resources, tasks: list[Callable[[], Any]]) -> list[submitit.Job]:
        raise NotImplementedError

    def finish(self, jobs: list[submitit.Job]) -> None:
        """After the submission is recorded and printed (the debug executor runs its jobs now)."""

    def queue_states(self, job_ids: list[str]) -> dict[str, str]:
        """{job id: pending | running | requeued} for the jobs still queued or running."""
        return {}

    def cancel(self, job_ids: list[str]) -> None:
        """Stop these queued or running jobs (already listed in the sweep dir's cancel list)."""

    @classmethod
    def ending(cls, job_id: str) -> str:
        """In a task of job `job_id`, stopped by a signal: why the scheduler itself is ending the
        job (a cancel), so that requeueing it would undo the cancel; "" when it is not."""
        return ""

    def where(self, n_points: int) -> str:
        """Where the submitted points run, for "N point(s) submitted as ..."."""
        raise NotImplementedError

    def preview(self, job_name: str, r: Resources, n_points: int) -> str:
        """The dry run's account of what would be submitted, after the points' table."""
        return f"(executor {self.name}: no sbatch script; each point runs as {r.tasks_per_node} process(es) here)\n"


# ---------------------------------------------------------------------------- slurm


class SlurmExecutor(Executor):
    name = "slurm"

    def connect(self) -> None:
        apply_submit_environment(self.profile)

    def _parameters(self, job_name: str, r: Resources) -> dict[str, Any]:
        """submitit SlurmExecutor parameters (sbatch options) for every point of the sweep."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "nodes": r.nodes,
            "ntasks_per_node": r.tasks_per_node,  # one Slurm task per rank: per GPU, or per CPU rank
            "cpus_per_task": r.cpus_per_task,
            "time": r.time_min,
            "signal_delay_s": r.signal_delay_s,
            # requeue: allow `scontrol requeue` where JobRequeue=0; the spec's own options (validated) after it
            "additional_parameters": {"requeue": True, **r.sbatch},
        }
        p = self.profile
        optional = {
            "gpus_per_node": r.gpus_per_node or None,
            "mem": None if r.mem is None else (f"{int(r.mem)}GB" if r.mem == int(r.mem) else f"{int(r.mem * 1024)}MB"),
            "array_parallelism": r.array_parallelism,
            "partition": r.partition or (p.partitions[0] if p.partitions else None),
            "account": r.account or p.account or None,
            "qos": r.qos or p.qos or None,
            "constraint": r.constraint,
            "setup": list(p.setup) or None,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params

    def _submit(self, job_name: str, r: Resources, tasks: list[Callable[[], Any]]) -> list[submitit.Job]:
        ex = submitit.SlurmExecutor(self.folder, max_num_timeout=r.max_timeouts)
        ex.update_parameters(**self._parameters(job_name, r))
        with submission_environment():
            return ex.submit_array(tasks)

    def queue_states(self, job_ids: list[str]) -> dict[str, str]:
        return slurm_queue(set(job_ids))

    def cancel(self, job_ids: list[str]) -> None:
        proc = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SubmitError(f"scancel failed: {proc.stderr.strip()}")

    @classmethod
    def ending(cls, job_id: str) -> str:
        # The time limit's signal, a pre-emption signal or `scancel --signal` leave the job
        # RUNNING: it goes on only if the task requeues it. A plain scancel shows it COMPLETING
        # (the flag outranks CANCELLED in scontrol's JobState) while its tasks stop, as does a
        # requeue by Slurm itself, which needs no second one. Unknown (no controller): "", and
        # the requeue that follows fails the same way.
        state = slurm_job_state(job_id)
        if state in ("RUNNING", ""):
            return ""
        return f"cancelled: Slurm is ending the job itself (JobState={state}: a cancel, or its own requeue)"

    def where(self, n_points: int) -> str:
        return f"{'one Slurm job array' if n_points > 1 else 'one Slurm job'} (profile {self.profile.name})"

    def preview(self, job_name: str, r: Resources, n_points: int) -> str:
        text = submitit_compat.sbatch_text(self.folder, self._parameters(job_name, r), n_points)
        return f"--- sbatch script ({self.folder}/<job id>_submission.sh) ---\n{text}"


def slurm_queue(job_ids: set[str]) -> dict[str, str]:
    # One squeue for all of this user's jobs (-r: one line per array task; --states=all: also the
    # short REQUEUED step a requeued job passes through, which squeue hides by default). Asking
    # for the ids with -j fails as a whole once one of them has left the queue.
    cmd = ["squeue", "-h", "-r", "--states=all", "-u", getpass.getuser(), "-O", "JobArrayID:64,State:32,RestartCnt:16"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QueueError(f"squeue failed: {e}") from None
    if proc.returncode != 0:
        raise QueueError(f"squeue failed: {last_line(proc.stderr or proc.stdout)}")
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in job_ids:
            state = _slurm_state(parts[1], int(parts[2]) if parts[2].isdigit() else 0)
            if state:
                out[parts[0]] = state
    return out


def slurm_job_state(job_id: str) -> str:
    """Slurm's state of one job (scontrol knows ended jobs for MinJobAge, 300 s by default), or "" when unknown."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
    return fields.get("JobState", "")


# Slurm states of a job that is not over; every other state (COMPLETED, FAILED, CANCELLED,
# TIMEOUT, NODE_FAIL, ...) is final, and the run dir and result pickles tell the rest.
RUNNING = ("RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")
REQUEUED = ("REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT")


def _slurm_state(state: str, restarts: int) -> str | None:
    if state == "PENDING":
        return "requeued" if restarts else "pending"
    if state in REQUEUED:
        return "requeued"
    return "running" if state in RUNNING else None


# ---------------------------------------------------------------------------- local


class LocalExecutor(Executor):
    name = "local"

    def check(self, r: Resources) -> None:
        on_this_machine(self.name, r)

    def run_slots(self, r: Resources) -> int:
        # submitit starts every local point at once; its tasks take turns: array_parallelism, or
        # as many points as this machine's cores hold.
        return r.array_parallelism or max(1, (os.cpu_count() or 1) // (r.tasks_per_node * r.cpus_per_task))

    def _submit(self, job_name: str, r: Resources, tasks: list[Callable[[], Any]]) -> list[submitit.Job]:
        ex = submitit.LocalExecutor(self.folder, max_num_timeout=r.max_timeouts)
        ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks_per_node, gpus_per_node=r.gpus_per_node,
                             signal_delay_s=r.signal_delay_s)
        with submission_environment(), output_to(self.folder / "local-executor.log"):
            return ex.submit_array(tasks)

    def queue_states(self, job_ids: list[str]) -> dict[str, str]:
        # Alive and waiting for a run slot = pending.
        return {j: "running" if (self.sweep_dir / SLOTS / f"{j}.running").exists() else "pending"
                for j in job_ids if submitit_compat.local_job_alive(j)}

    def cancel(self, job_ids: list[str]) -> None:
        submitit_compat.cancel_local_jobs(job_ids)

    def where(self, n_points: int) -> str:
        return "local processes (submitit local executor)"


_held_slot: list[FileLock] = []  # the slot's lock, held as long as this process lives


def wait_for_slot(slots_dir: Path, slots: int, job_id: str, rank: int) -> None:
    """In a local job's task: block until this job may run. Rank 0 takes one of `slots` file locks
    (a flock: released by the kernel when the process ends, however it ends) and says so in
    `<job id>.running`; the job's other ranks wait for that marker."""
    marker = slots_dir / f"{job_id}.running"
    while rank != 0 and not marker.exists():
        time.sleep(0.5)
    while rank == 0 and not _held_slot:
        slots_dir.mkdir(parents=True, exist_ok=True)
        for k in range(slots):
            lock = FileLock(slots_dir / f"slot-{k}", timeout=0)
            try:
                lock.acquire()
            except Timeout:
                continue
            _held_slot.append(lock)
            marker.touch()
            return
        time.sleep(0.5)


# ---------------------------------------------------------------------------- debug


class DebugExecutor(Executor):
    name = "debug"
    requeues = False  # its jobs run inside the submitting process: there is no job to requeue

    def check(self, r: Resources) -> None:
        on_this_machine(self.name, r)
        if r.tasks_per_node > 1:
            raise ConfigError("resources.tasks_per_node: the debug executor runs one rank in this process; "
                              "use --executor local")

    def _submit(self, job_name: str, r: Resources, tasks: list[Callable[[], Any]]) -> list[submitit.Job]:
        return submitit.DebugExecutor(self.folder).submit_array(tasks)

    def finish(self, jobs: list[submitit.Job]) -> None:
        for job in jobs:  # its jobs run when asked for their results: now, here, one after another
            submitit_compat.save_result(job, job.results()[0])  # where `status` finds every executor's results

    def where(self, n_points: int) -> str:
        return "this process (debug executor)"


# ---------------------------------------------------------------------------- shared


EXECUTORS: dict[str, type[Executor]] = {e.name: e for e in (SlurmExecutor, LocalExecutor, DebugExecutor)}


def choose_executor(flag: str) -> tuple[type[Executor], str]:
    """The executor for `--executor FLAG`, and a one-line note when `auto` chose it for lack of Slurm."""
    if flag != "auto":
        return EXECUTORS[flag], ""
    if shutil.which("sbatch") and shutil.which("srun"):
        return SlurmExecutor, ""
    return LocalExecutor, "no Slurm on this machine (sbatch/srun not on PATH): running the sweep with submitit's local executor"


def on_this_machine(name: str, r: Resources) -> None:
    if r.nodes > 1:
        raise ConfigError(f"resources.nodes: {r.nodes} nodes need Slurm; the {name} executor runs on this machine only")


@contextlib.contextmanager
def submission_environment() -> Iterator[None]:
    """submitit.helpers.clean_env() without dropping SLURM_CONF, which sbatch needs here."""
    drop = [k for k in os.environ if k in INHERITED or k.startswith(("SUBMITIT_", "SRUN_", "SBATCH_"))
            or (k.startswith(("SLURM_", "SLURMD_")) and k != "SLURM_CONF")]
    saved = {k: os.environ.pop(k) for k in drop}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Point this process's stdout/stderr at `log` while local jobs start: they inherit them, and
    must not hold the caller's terminal or pipes open after `submit` returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])

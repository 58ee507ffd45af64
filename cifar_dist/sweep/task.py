"""The checkpointable task: one sweep point, run by every Slurm task (rank) of its job.

Each task builds its distributed environment in code (no nested launcher) and calls the same
`train(cfg)` as every other entry point. Pre-emption and time-out:

1. Slurm sends USR2 `signal_delay_s` before the limit (and SIGTERM on cancel or requeue) to
   every task. submitit installed its own USR2 handler when the job started, but `train`
   replaces it while it runs with one that only sets a flag, so the signal never interrupts a
   collective or a checkpoint write.
2. At the next step boundary all ranks agree, rank 0 writes a checkpoint, and `train` raises
   `Stopped` on every rank.
3. Global rank 0 then runs submitit's own checkpoint-and-requeue logic (`SignalHandler`):
   `checkpoint()` below returns a fresh `DelayedSubmission` of this task (plain data: a config
   dict; never a process group or a model), submitit pickles it and calls `scontrol requeue`.
   The other ranks return a "stopped" marker; requeueing ends them anyway.
4. The requeued job starts the same task again; `train` resumes from the newest valid checkpoint
   in the run dir, which was fixed at submit time.

A stop is a time-out (counted against `max_timeouts`) when it came within the signal's reach of
the time limit (`timed_out`), else a pre-emption (free), for any time limit. If the job was
cancelled (plain `scancel`: Slurm no longer shows it RUNNING while its tasks stop; or
`jobs/submit.py cancel`), or has timed out too many times, rank 0 does not requeue and returns
the marker `{"status": "stopped", "reason": ...}`, which `status` shows as cancelled or stopped
(resumable with `resubmit --failed`).

The torch.distributed variables come from submitit's `TorchDistributedEnvironment` (Slurm's or the
local executor's); only the GPU split is ours: its CUDA_VISIBLE_DEVICES=local_rank is wrong where
Slurm lists GPU ids such as 4,5 (`one_gpu_per_task`).

A study's worker (`SearchTask`, worker.py) is the same task around `worker.run_worker`: it trains
one trial after another in one job, and a requeued worker resumes its own unfinished trial first.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import submitit

from cifar_dist.sweep.executors import EXECUTORS, SLOTS, wait_for_slot
from cifar_dist.sweep.resources import EARLY_SIGNAL_S
from cifar_dist.sweep.states import STOPPED
from cifar_dist.sweep.submitit_compat import NotRequeued, checkpoint_and_requeue
from cifar_dist.sweep.sweepdir import cancelled_ids, was_cancelled

# A job's clock starts a little before its task's process does (slurmstepd, srun, exec).
LAUNCH_SLACK_S = 10


class SweepTask(submitit.helpers.Checkpointable):
    """What every rank of a sweep's job runs: `run` once the job's environment is set, and on a stop
    signal the requeue (or the stopped marker). `env` is the cluster profile's environment for
    tasks; `cpus` the CPUs each rank may use (compute threads); `sweep_dir` holds the cancel list;
    `local_slots` caps the jobs that run at once where the executor starts them all together (the
    local one: `Executor.run_slots`; 0 = no cap); `signal_delay_s` is how long before the time
    limit the stop signal was asked for."""

    def __init__(self, *, env: dict[str, str], cpus: int = 1, sweep_dir: str = "", local_slots: int = 0,
                 signal_delay_s: int = 90):
        self.env = env
        self.cpus = cpus
        self.sweep_dir = sweep_dir
        self.local_slots = local_slots
        self.signal_delay_s = signal_delay_s

    def __call__(self) -> dict[str, Any]:
        job = self.start()

        from cifar_dist.loop import Stopped

        try:
            return self.run()
        except Stopped:
            return self.requeue_or_stop(job)

    def run(self) -> dict[str, Any]:
        """The job's work, on every rank; raises the loop's `Stopped` when a signal stopped it."""
        raise NotImplementedError

    @property
    def run_dir(self) -> str:
        """Where the work's files are (the stopped marker names it)."""
        raise NotImplementedError

    def start(self) -> submitit.JobEnvironment:
        """This rank's job, once it may run (a local run slot), with its environment set."""
        job = submitit.JobEnvironment()
        if self.local_slots and self.sweep_dir:
            wait_for_slot(Path(self.sweep_dir) / SLOTS, self.local_slots, job.job_id, job.global_rank)
        os.environ.update(self.env)  # before the process group exists: GLOO_/NCCL_SOCKET_IFNAME, ...
        export_distributed_environment()
        limit_threads(self.cpus)
        return job

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The same task again: the work resumes by itself from the run dir's checkpoints."""
        return submitit.helpers.DelayedSubmission(copy.copy(self))

    def requeue_or_stop(self, job: submitit.JobEnvironment) -> dict[str, Any]:
        """After `train` stopped on a signal (its checkpoint written): rank 0 requeues the job
        through submitit, exiting this process; otherwise return the stopped marker."""
        marker = {"status": STOPPED, "rank": job.global_rank, "run_dir": self.run_dir}
        if job.global_rank != 0:
            return marker
        reason = self.not_requeued(job)
        if not reason:
            age = process_age_s()
            try:  # requeues, then exits this process
                checkpoint_and_requeue(job, lambda limit_min: timed_out(age, limit_min, self.signal_delay_s))
            except NotRequeued as e:  # submitit will not requeue (timed out too many times)
                reason = str(e)
            except subprocess.SubprocessError as e:  # scontrol refused (the job is ending anyway)
                reason = f"requeue failed: {e}"
            else:
                reason = "requeue returned"  # only a plugin whose _requeue does not exit gets here
        # The log's last word: train's own line says it stopped "for requeue", which this one corrects.
        print(f"not requeued: {reason}; `python jobs/submit.py resubmit {self.sweep_dir} --failed` resumes it", flush=True)
        return {**marker, "reason": reason}

    def not_requeued(self, job: submitit.JobEnvironment) -> str:
        """Why this stop must not requeue the job, or "" when it should."""
        executor = EXECUTORS[job.cluster]
        if not executor.requeues:
            return "stopped by a signal"
        listed = cancelled_ids(Path(self.sweep_dir)) if self.sweep_dir else set()
        if was_cancelled(job.job_id, listed):  # `jobs/submit.py cancel`
            return "cancelled"
        return executor.ending(job.job_id)  # plain scancel: its SIGTERM looks like any other stop


def timed_out(age_s: float, limit_min: int, signal_delay_s: int) -> bool:
    """Whether a stop signal that came `age_s` seconds into this life of the job is its time
    limit's (counted against max_timeouts) rather than a pre-emption (free). Slurm sends the time
    limit's signal `signal_delay_s` before the limit, or up to EARLY_SIGNAL_S earlier; a signal
    before that cannot be it. resources.py refuses limits that leave no room for a pre-emption."""
    return age_s >= 60 * limit_min - signal_delay_s - EARLY_SIGNAL_S - LAUNCH_SLACK_S


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc): this life's clock, from before Python loaded."""
    start_ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])  # field 22, starttime
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


class TrainTask(SweepTask):
    """Train one point: `config` is its resolved `Config.to_dict()`."""

    def __init__(self, config: dict[str, Any], **task: Any):
        super().__init__(**task)
        self.config = config

    def run(self) -> dict[str, Any]:
        from cifar_dist.config import config_from_dict
        from cifar_dist.train import train

        return train(config_from_dict(self.config))

    @property
    def run_dir(self) -> str:
        return self.config["run"]["dir"]


class SearchTask(SweepTask):
    """A study's worker (worker.py): trials one after another, until the study needs no more.
    Requeued, it first resumes its own unfinished trial, from that trial's checkpoints."""

    def __init__(self, worker: str, **task: Any):
        super().__init__(**task)
        self.worker = worker

    # The study's modules (and Optuna) are imported where a worker runs: launch.py's ranks import
    # this module's environment helpers alone.
    def run(self) -> dict[str, Any]:
        from cifar_dist.sweep.worker import run_worker

        return run_worker(Path(self.sweep_dir), self.worker)

    @property
    def run_dir(self) -> str:
        from cifar_dist.sweep.study import worker_dir

        return str(worker_dir(Path(self.sweep_dir), self.worker))


def export_distributed_environment() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from the Slurm (or local) job, as torchrun
    would set them; `train` builds its accelerator from these. Values inherited from the
    submitting shell are overwritten: inside a job the scheduler's facts are the truth."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)  # else submitit would reuse an inherited port for every job
    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    one_gpu_per_task(env.local_rank, env.local_world_size)


def one_gpu_per_task(local_rank: int, local_world_size: int) -> None:
    """Slurm's --gpus-per-node shows every task all of the node's GPUs; give each its own.
    (submitit would set CUDA_VISIBLE_DEVICES=local_rank, wrong when Slurm lists ids like 4,5.)"""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if local_world_size > 1 and len(visible) == local_world_size:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank]


def limit_threads(cpus: int, ranks_per_task: int = 1) -> None:
    """One compute thread per CPU the task was given (shared by `ranks_per_task` ranks: a launcher's
    on one task). Jobs inherit the submitting shell's environment, whose OMP_NUM_THREADS (or none:
    every core) oversubscribes a node shared by several points or ranks: OpenMP threads that
    outnumber the cores spin-wait for each other, and training runs many times slower."""
    cpus = max(1, int(os.environ.get("SLURM_CPUS_PER_TASK") or cpus) // ranks_per_task)
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    import torch

    torch.set_num_threads(cpus)

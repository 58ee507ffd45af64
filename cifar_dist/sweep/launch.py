"""One rank of a training job started by slurm/train.sbatch: under plain `srun` (one Slurm task
per rank, no launcher in between, so each rank's exit code, 75 when stopped and checkpointed,
reaches srun and the batch script unchanged), or under torchrun or `accelerate launch` started
by srun once per node through `cifar-dist launch` (launcher.py), which turns the launcher's exit
code back into the ranks'. Then it is `cifar-dist train ARGS`.

    srun --cpus-per-task 2 python -m cifar_dist.sweep.launch --config fast run.dir=runs/fast-1
    srun --ntasks-per-node 1 python -m cifar_dist.launcher torchrun --nproc_per_node 2 ... -m cifar_dist.sweep.launch ...

Under srun alone, the rank's torch.distributed variables come from Slurm's (as for a sweep's
tasks); under a launcher, from the launcher. Either way its compute threads are its share of the
CPUs Slurm gave the task. Without `run.dir`, the run goes to runs/slurm-<job id>: the same
folder in every life of the job, so a requeued job resumes instead of starting afresh elsewhere.
"""

from __future__ import annotations

import os
import sys

from cifar_dist.errors import UserError, run_command
from cifar_dist.sweep.task import export_distributed_environment, limit_threads

PROG = "python -m cifar_dist.sweep.launch"


def main(argv: list[str]) -> int:
    from cifar_dist.train import main as train_main
    from cifar_dist.train import parse_args

    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        raise UserError(f"{PROG} runs as a task of a Slurm job (srun); elsewhere: cifar-dist train, or torchrun")
    _, cfg = parse_args(argv, PROG)  # a mistake is one line here, before any process group forms
    if not cfg.run.dir:
        argv = [*argv, f"run.dir=runs/slurm-{job_id}"]
    launched = "WORLD_SIZE" in os.environ  # a launcher's rank: its variables stand
    if not launched:
        os.environ["SUBMITIT_EXECUTOR"] = "slurm"  # submitit's JobEnvironment reads Slurm's variables only when told so
        export_distributed_environment()
    # SLURM_CPUS_PER_TASK when srun was given --cpus-per-task; a launcher's ranks on one task share them
    limit_threads(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1) if launched else 1)
    return train_main(argv, PROG)


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

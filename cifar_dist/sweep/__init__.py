"""Slurm sweeps: a spec -> validated points -> one submitit job array; the checkpointable task that calls train.

    commands.py         the command line (`cifar-dist sweep` = `python jobs/submit.py`)
    spec.py             the sweep spec: strict reading, grid x random, every point's validated config
    profiles.py         cluster profiles (clusters/ holds the shipped ones) and their lookup order
    executors.py        one Executor class per submitit executor: slurm, local, debug
    record.py           the sweep dir: its record and each point's state
    task.py             TrainTask, run by every rank of a point's job
    launch.py           one rank of slurm/train.sbatch (srun, no launcher): Slurm's ranks, then train
    submitit_compat.py  the only module that touches submitit's private members

This package may import from the rest of cifar_dist (config, schema, errors, train); the rest of
cifar_dist imports nothing from it but the `sweep` command's dispatch in cli.py.
"""

"""Slurm sweeps: a spec -> validated points -> one submitit job array; the checkpointable task that calls train.

    commands.py         the command line (`cifar-dist sweep` = `python jobs/submit.py`): submit, status, wait, ...
    cli_spec.py         a sweep spelled on the command line (--config, --grid, -m): its spec mapping and YAML twin
    submission.py       points submitted as one job array, the record saved around it; jobs of a cut submission found
    spec.py             the sweep spec, read by the strict loader: grid x random, or a study's search block
    resources.py        what the jobs ask Slurm for: resources, the sbatch allow-list, the signal's timing
    points.py           point_config: every point's and trial's validated config
    profiles.py         cluster profiles (clusters/ holds the shipped ones) and their lookup order
    executors.py        one Executor class per submitit executor: slurm, local, debug
    record.py           the typed records: sweep.json (SweepRecord) and a trial's trial.json (TrialRecord)
    sweepdir.py         the sweep dir: its layout, the lock of the command changing it, the cancel list
    states.py           each point's (or worker's) state, from the queue, its run dir and its job's result
    study.py            a search's Optuna study: made at submit, opened with its sampler and pruner, its trials' table
    worker.py           a study's worker: the trials one array task trains, one after another
    task.py             TrainTask and SearchTask, run by every rank of a point's or worker's job
    launch.py           one rank of slurm/train.sbatch (srun, no launcher): Slurm's ranks, then train
    submitit_compat.py  the only module that touches submitit's private members
    optuna_compat.py    the only module that touches Optuna's private members

This package may import from the rest of cifar_dist (config, schema, errors, train); the rest of
cifar_dist imports nothing from it but the `sweep` command's dispatch in cli.py.
"""

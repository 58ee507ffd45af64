"""Slurm sweeps: spec -> validated points -> one submitit job array; the checkpointable task that calls train."""

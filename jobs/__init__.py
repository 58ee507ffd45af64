"""Slurm sweeps: spec -> submitit -> job arrays; the checkpointable task that calls train."""

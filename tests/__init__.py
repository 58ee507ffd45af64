"""The test suite in three tiers, each a folder (`make test-unit`, `make test-e2e`, `make test-slurm`;
`make test` runs them all):
- unit/: the package's parts in this process: no training run through a command, no launcher, no Slurm
  (a few train some steps through `train(cfg)`; sweep tests may start jobs/submit.py to see it refuse).
  25-60 s on 2 cores.
- e2e/: the commands as a user runs them, training runs, launchers, the README's and docs pages' commands.
- slurm/: everything that needs the real dev cluster (slurm/dev-cluster.sh), all on one xdist worker.
helpers/ holds what the tiers share; no test module imports another."""

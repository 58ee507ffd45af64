"""Debugging a run on one machine, in components the loop uses and a command above it:

    overfit.py   train.overfit_batches=N: the first N batches again and again (a `Batches`)
    anomaly.py   train.detect_anomaly: stop at the first non-finite loss or gradient, naming the module
    profiler.py  profile.*: torch.profiler over a few training steps (a context manager with `.step()`)
    smoke.py     `cifar-dist train --smoke`: every phase of a run on a few batches, through `train` itself

The loop (train.py) imports the first three; the smoke imports the loop, never the reverse.
"""

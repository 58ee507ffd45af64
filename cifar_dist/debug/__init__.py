"""Debugging a run on one machine: components the loop (train.py) uses at its step boundaries.

    overfit.py   train.overfit_batches=N: the first N batches again and again (a `Batches`)
    anomaly.py   train.detect_anomaly: stop at the first non-finite loss or gradient, naming the module
    profiler.py  profile.*: torch.profiler over a few training steps (a context manager with `.step()`)

`cifar-dist train --smoke` (smoke.py) is the fourth debugging tool; it drives the loop from above.
"""

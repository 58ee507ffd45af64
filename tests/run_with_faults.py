"""Run `python -m cifar_dist.train ARGS` with a fault injected at an exact point, for tests that
must hit a precise moment (a real signal at an epoch boundary, a kill during a checkpoint write).

    CIFAR_DIST_FAULT=signal:EPOCH:STEP[:RANK]  this process sends itself SIGUSR1 while it fetches
                                               batch STEP of epoch EPOCH (on RANK only, if given)
    CIFAR_DIST_FAULT=slow_save:STEP            the checkpoint of STEP pauses before its marker is
                                               written (the test kills the process then)
    CIFAR_DIST_FAULT=signal_decode:SIG         this process sends itself SIG (e.g. TERM) while it
                                               decodes the data into the cache
The fault goes through the product's real code paths: a real signal, a real partial write.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from cifar_dist import checkpoint, data, train
from cifar_dist.errors import run_command


def main() -> int:
    kind, *args = os.environ.get("CIFAR_DIST_FAULT", "none").split(":")
    if kind == "signal":
        epoch, step = int(args[0]), int(args[1])
        rank = args[2] if len(args) > 2 else os.environ.get("RANK", "0")
        original = data.TrainBatches.batch

        def batch(self, e, s):
            if (e, s) == (epoch, step) and os.environ.get("RANK", "0") == rank:
                os.kill(os.getpid(), signal.SIGUSR1)
            return original(self, e, s)

        data.TrainBatches.batch = batch
    elif kind == "signal_decode":
        original_decode = data.decode

        def decode(cfg):
            os.kill(os.getpid(), getattr(signal, f"SIG{args[0]}"))
            return original_decode(cfg)

        data.decode = decode
    elif kind == "slow_save":
        target = int(args[0])
        original_write = checkpoint.write_atomic

        def write(path, text):
            if path.name == checkpoint.MARKER and path.parent.name == f"step_{target:08d}":
                print(f"FAULT: pausing before the marker of step {target}", flush=True)
                time.sleep(600)
            return original_write(path, text)

        checkpoint.write_atomic = write
    return run_command(train.main, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""Run `python -m cifar_dist.train ARGS` with a fault injected at an exact point, for tests that
must hit a precise moment (a real signal at an epoch boundary, a kill during a checkpoint write).

    CIFAR_DIST_FAULT=signal:EPOCH:STEP[:RANK]  this process sends itself SIGUSR1 while it fetches
                                               batch STEP of epoch EPOCH (on RANK only, if given)
    CIFAR_DIST_FAULT=slow_save:STEP            the checkpoint of STEP pauses before its marker is
                                               written (the test kills the process then)
    CIFAR_DIST_FAULT=signal_decode:SIG         this process sends itself SIG (e.g. TERM) while it
                                               decodes the data into the cache
    CIFAR_DIST_FAULT=signal_at:SIG:EPOCH:STEP[:RANK]  like `signal`, with any signal (KILL too)
    CIFAR_DIST_FAULT=signal_eval:SIG:K         SIG as this process's K-th evaluation (1-based) starts
    CIFAR_DIST_FAULT=signal_save:SIG:STEP:WHERE  SIG inside the checkpoint write of STEP, WHERE is
                                               before_rename (state written, not yet renamed into
                                               place) or before_marker (renamed, marker not written)
    CIFAR_DIST_FAULT=remove_dir:EPOCH:STEP[:replace]  the run dir is deleted (and, with `replace`, made
                                               again empty) while batch STEP of EPOCH is fetched
    CIFAR_DIST_FAULT=fill_disk:EPOCH:STEP:FILE  FILE (on the run dir's file system) grows until that file
                                               system is full, while batch STEP of EPOCH is fetched
    CIFAR_DIST_FAULT=mkdir:EPOCH:STEP:NAME     a folder NAME made in the run dir then (where a file of that name goes)
    CIFAR_DIST_FAULT=deny_writes:EPOCH:STEP    the run dir and its checkpoints folder made read-only
                                               (mode 555) then; run it without root's override
                                               (`setpriv --bounding-set -dac_override`)
The fault goes through the product's real code paths: a real signal, a real partial write, a real
deletion, a really full file system.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from cifar_dist import checkpoint, data, train
from cifar_dist.errors import run_command


def main() -> int:
    kind, *args = os.environ.get("CIFAR_DIST_FAULT", "none").split(":")
    if kind == "signal":
        signal_at_batch(signal.SIGUSR1, *args)
    elif kind == "signal_at":
        signal_at_batch(signum(args[0]), *args[1:])
    elif kind == "signal_eval":
        sig, target = signum(args[0]), int(args[1])
        original_evaluate, started = train.evaluate, []

        def evaluate(*a, **k):
            started.append(1)
            if len(started) == target:
                os.kill(os.getpid(), sig)
            return original_evaluate(*a, **k)

        train.evaluate = evaluate
    elif kind == "signal_save":
        signal_in_save(signum(args[0]), int(args[1]), args[2])
    elif kind == "signal_decode":
        original_decode = data.decode

        def decode(cfg):
            os.kill(os.getpid(), getattr(signal, f"SIG{args[0]}"))
            return original_decode(cfg)

        data.decode = decode
    elif kind == "remove_dir":
        at_batch(int(args[0]), int(args[1]), lambda: remove_run_dir(replace=args[2:] == ["replace"]))
    elif kind == "fill_disk":
        at_batch(int(args[0]), int(args[1]), lambda: fill(Path(args[2])))
    elif kind == "mkdir":
        at_batch(int(args[0]), int(args[1]), lambda: (run_dir() / args[2]).mkdir())
    elif kind == "deny_writes":
        at_batch(int(args[0]), int(args[1]), lambda: [d.chmod(0o555) for d in (run_dir(), run_dir() / "checkpoints")
                                                      if d.is_dir()])
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


def signum(name: str) -> signal.Signals:
    return getattr(signal, f"SIG{name}")


def signal_at_batch(sig: signal.Signals, epoch: str, step: str, rank: str | None = None) -> None:
    """`sig` to this process while it fetches batch `step` of `epoch` (on `rank` only, if given)."""
    target, rank = (int(epoch), int(step)), rank or os.environ.get("RANK", "0")
    original = data.TrainBatches.batch

    def batch(self, e, s):
        if (e, s) == target and os.environ.get("RANK", "0") == rank:
            os.kill(os.getpid(), sig)
        return original(self, e, s)

    data.TrainBatches.batch = batch


def at_batch(epoch: int, step: int, act) -> None:
    """`act()` while batch `step` of `epoch` is fetched (the first time only: a resumed run fetches it again)."""
    original, done = data.TrainBatches.batch, []

    def batch(self, e, s):
        if (e, s) == (epoch, step) and not done:
            done.append(1)
            act()
        return original(self, e, s)

    data.TrainBatches.batch = batch


def run_dir() -> Path:
    """This command's run dir (its run.dir=... argument)."""
    return Path(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("run.dir=")))


def remove_run_dir(replace: bool) -> None:
    """The run dir deleted, as `rm -rf` would; made again, empty, with `replace`."""
    shutil.rmtree(run_dir())
    if replace:
        run_dir().mkdir()


def fill(path: Path) -> None:
    """Write zeros to `path` until its file system has no space left."""
    block = bytes(1 << 16)
    # Unbuffered: each write takes what still fits, the next one fails.
    with open(path, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(block)


def signal_in_save(sig: signal.Signals, step: int, where: str) -> None:
    """`sig` inside the checkpoint write of `step`: checkpoint.save fsyncs the state file before the
    rename and the folder right after it, so those two calls mark the moments."""
    name = {"before_rename": "_fsync", "before_marker": "fsync_dir"}[where]
    original = getattr(checkpoint, name)

    def hooked(path):
        # _fsync gets <root>/.tmp-step_N-PID/state.pt, fsync_dir the checkpoints folder after step_N is in it
        if (where == "before_rename" and path.parent.name.startswith(f".tmp-step_{step:08d}-")) or \
                (where == "before_marker" and (path / f"step_{step:08d}").is_dir()
                 and not (path / f"step_{step:08d}" / checkpoint.MARKER).exists()):
            os.kill(os.getpid(), sig)
        return original(path)

    setattr(checkpoint, name, hooked)


if __name__ == "__main__":
    sys.exit(main())

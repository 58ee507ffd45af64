"""`cifar-dist launch LAUNCHER ARGS...`: run a launcher (torchrun, `accelerate launch`) and exit
with the code the run itself ended with, which the launcher loses.

    cifar-dist launch torchrun --nproc_per_node 2 -m cifar_dist.train --config debug
    srun --ntasks-per-node 1 python -m cifar_dist.launcher python -m accelerate.commands.launch --multi_gpu ...

torchrun and `accelerate launch` exit 1, with a traceback of their own, whenever a rank exits
non-zero: 75 ("stopped after a checkpoint, resume me") and 2 (a mistake in the config) both
become 1, and a job script cannot requeue. Nothing in a rank can change that. So every rank of
a cifar-dist command records how it ended (errors.run_command: 0 done, 2 a mistake, 75 stopped
for requeue, 130 Ctrl-C, 1 a crash) in a folder this wrapper names in `$CIFAR_DIST_OUTCOME_DIR`,
and the wrapper exits with the highest recorded code; with none recorded (a rank killed, or not a
cifar-dist command), with the launcher's own.

Signals. A stop signal is for the ranks, which checkpoint at the next step boundary: Slurm
sends it to every process of the job step, the ranks included. This wrapper ignores SIGUSR1 and
SIGUSR2 and has the launcher inherit that (torchrun would die of them, and its ranks with it);
the ranks set their own handlers. It outlives SIGTERM and a first Ctrl-C to report the ranks'
code; torchrun handles those itself (it passes them to the ranks and waits up to 30 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from cifar_dist.errors import OUTCOME_DIR, UserError, read_outcomes, run_command

MEANING = {0: "done", 1: "a rank crashed", 2: "a mistake, named in the error line above",
           75: "stopped after a checkpoint; the same command resumes it", 130: "stopped by Ctrl-C after a checkpoint"}
USAGE = "usage: cifar-dist launch LAUNCHER [ARGS...]   e.g. cifar-dist launch torchrun --nproc_per_node 2 -m cifar_dist.train"


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"{USAGE}\n\n{__doc__.split(chr(10) * 2)[0]}")
        return 0 if argv else 2
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)  # inherited through exec by the launcher; the ranks install their own
    signal.signal(signal.SIGTERM, _outlive)  # a handler: the launcher starts with SIGTERM's default (exec resets it)
    signal.signal(signal.SIGINT, _first_ctrl_c)
    folder = Path(tempfile.mkdtemp(prefix="cifar-dist-outcome-"))
    try:
        try:
            proc = subprocess.Popen(argv, env={**os.environ, OUTCOME_DIR: str(folder)})
        except OSError as e:
            raise UserError(f"launch: cannot run {argv[0]} ({e.strerror})") from None
        try:
            launcher = proc.wait()
        except KeyboardInterrupt:  # a second Ctrl-C: the ranks abort too
            return 130
        outcomes = read_outcomes(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    launcher = 128 - launcher if launcher < 0 else launcher  # killed by a signal: as a shell reports it
    if not outcomes:
        return launcher
    code = max(outcomes.values())
    if code != launcher and 0 in outcomes:  # said once, where rank 0 ran
        print(f"cifar-dist launch: exit {code} ({MEANING.get(code, 'the ranks exit code')}); {launcher_name(argv)} "
              f"itself exited {launcher}", file=sys.stderr, flush=True)
    return code


def launcher_name(argv: list[str]) -> str:
    """`torchrun`, `accelerate launch`, ... as the user knows it, also when started as `python -m ...`."""
    name = argv[2] if len(argv) > 2 and argv[1] == "-m" else Path(argv[0]).name
    return {"torch.distributed.run": "torchrun", "accelerate.commands.launch": "accelerate launch",
            "accelerate": "accelerate launch"}.get(name, name)


def _outlive(signum: int, frame: Any) -> None:
    """SIGTERM: the ranks got it too (Slurm signals the whole step); wait for them and report."""


def _first_ctrl_c(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one ends the wrapper


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

"""The one kind of error a user is owed a single line for: every command turns a `UserError` into
`error: <message>` on stderr and exit code 2, after nothing (or nothing lasting) was written.

Under N ranks the project's checks agree (rank 0 decides and tells the others, or every rank
computes the same), so the line is printed by rank 0 alone. Every rank also records how it ended
where `cifar-dist launch` (launcher.py) asked, as launchers such as torchrun turn every non-zero
exit into 1.
"""

from __future__ import annotations

import atexit
import gc
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# How long a rank other than 0 waits before it exits on a mistake, for rank 0 to print it (seconds).
OTHER_RANKS_GRACE_S = 5.0
# Set by `cifar-dist launch` for the processes it starts: a folder where each rank writes its exit code.
OUTCOME_DIR = "CIFAR_DIST_OUTCOME_DIR"


class UserError(ValueError):
    """A mistake in what the user gave (config, data, run dir, checkpoint, spec); the message names it."""


class ConfigError(UserError):
    """A mistake in a config, a sweep spec or a cluster profile; the message names the key."""


class DataError(UserError):
    """Input data that cannot be used; the message names the file or folder."""


def run_command(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run a command's main; a UserError becomes its one line on stderr (rank 0) and exit code 2.
    The exit code is recorded for `cifar-dist launch`: 1 for an exception (130: a second Ctrl-C), which propagates."""
    tolerant_output()
    no_collection_at_exit()
    try:
        code = command(argv)
    except UserError as e:
        record_outcome(2)
        if launched_rank() == 0:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library's message held
        else:  # rank 0 names the mistake: a launcher that ends every rank at the first failure (torchrun)
            time.sleep(OTHER_RANKS_GRACE_S)  # must not end rank 0 before it has
        return 2
    except BaseException as e:
        record_outcome(130 if isinstance(e, KeyboardInterrupt) else 1)
        raise
    record_outcome(code)
    return code


def launched_rank() -> int:
    """This process's global rank as its launcher set it (torchrun, accelerate launch, a multi-task
    srun step), before or after a process group exists; 0 for a lone process."""
    env = os.environ
    if "RANK" in env:
        rank = env["RANK"]
    elif "SLURM_STEP_ID" in env and env.get("SLURM_STEP_NUM_TASKS", "1") not in ("", "1"):  # a task of `srun -n N`
        rank = env.get("SLURM_PROCID", "0")
    else:
        return 0
    return int(rank) if rank.isdigit() else 0


def record_outcome(code: int) -> None:
    """Under `cifar-dist launch`: this rank's exit code, in `$CIFAR_DIST_OUTCOME_DIR/rank-<rank>`."""
    folder = os.environ.get(OUTCOME_DIR)
    if folder and Path(folder).is_dir():
        tmp = Path(folder) / f".rank-{launched_rank()}-{os.getpid()}"
        tmp.write_text(f"{code}\n")
        tmp.replace(Path(folder) / f"rank-{launched_rank()}")


def read_outcomes(folder: Path) -> dict[int, int]:
    """{rank: exit code} of the ranks that recorded one in `folder`."""
    out = {}
    for f in folder.glob("rank-*"):
        rank, text = f.name.removeprefix("rank-"), f.read_text().strip()
        if rank.isdigit() and text.lstrip("-").isdigit():
            out[int(rank)] = int(text)
    return out


def no_collection_at_exit() -> None:
    """At exit, after the other exit handlers (registered later, so run earlier): no more garbage
    collection. Interpreter shutdown otherwise spends seconds collecting over the objects torch, its
    dynamo (imported by torch.optim) and matplotlib hold, in a process about to end; objects are still
    released as their references go, and a cycle left uncollected is no loss, since Python never
    promised to finalise objects that still exist at exit (every output is closed by its writer)."""
    atexit.unregister(_stop_collecting)  # once, however many commands this process ran
    atexit.register(_stop_collecting)


def _stop_collecting() -> None:
    gc.disable()
    gc.freeze()  # what exists now is never traversed again


def tolerant_output() -> None:
    """Text the output's encoding cannot show (a class named "café" on an ASCII stdout: LC_ALL=C
    without Python's UTF-8 mode) is printed escaped (caf\\xe9) rather than ending the command."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")

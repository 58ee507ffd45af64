"""The sweep directory: its layout, the lock held by the command changing it, and the cancel list.

    <sweep dir>/sweep.json        the record (record.py): name, profile (and its file), executor,
                                  resources, points (values, run id, run dir, resolved config, job
                                  ids) or a study's workers, submissions
    <sweep dir>/spec.yaml         the spec as given
    <sweep dir>/runs/<point>/     each point's or trial's run dir (config.yaml, metrics.jsonl, checkpoints/, ...)
    <sweep dir>/submitit/         submitit's sbatch script, pickles and logs (<job id>_<task>_log.out)
    <sweep dir>/cancelled         job ids stopped by `cancel` (tasks read it to not requeue)
    <sweep dir>/sweep.lock        flocked (filelock) by the command changing the record (submit,
                                  resubmit, cancel); names its holder
    <sweep dir>/slots/            the local executor's run slots (it starts every point at once)
    <sweep dir>/study.journal, workers/, budget.lock   a study's (study.py)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from cifar_dist.errors import UserError
from cifar_dist.sweep.record import RECORD, load_record

LOCK = "sweep.lock"
CANCELLED = "cancelled"  # job ids `cancel` stopped (one a line)
RUNS = "runs"  # the points' and trials' run dirs


def run_dir(sweep_dir: Path, name: str) -> Path:
    """The run dir of the point or trial `name` ("000", ...)."""
    return sweep_dir / RUNS / name


@contextlib.contextmanager
def changing(sweep_dir: Path, command: str, new: bool = False) -> Iterator[bool]:
    """Hold the sweep dir for `command` while it changes the record and the jobs (submit,
    resubmit, cancel); a second such command meanwhile fails at once, naming the holder, having
    done nothing. `new`: make the sweep dir, which must not exist or be empty; of two submits
    into one dir exactly one gets past this (mkdir, then an exclusive create of the lock file).
    Yields whether this command made the folder (for `discard`)."""
    if new:
        created = _claim(sweep_dir)
    else:
        created = False
        if not (sweep_dir / RECORD).is_file():
            load_record(sweep_dir)  # the one-line "not a sweep dir" error, before any file is made here
    holder = f"{command} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})\n"
    # A new dir's claimant waits: anyone holding it now is a command about to find no record.
    lock = FileLock(sweep_dir / LOCK, timeout=-1 if new else 0, on_acquired=lambda fd: _name_holder(fd, holder))
    try:
        lock.acquire()
    except Timeout:
        other = (sweep_dir / LOCK).read_text().strip() or "another command"
        raise UserError(f"{sweep_dir}: busy, {other} is changing this sweep; nothing done, "
                        "run it again when that has finished") from None
    except OSError:  # the holder's name could not be written (a full disk): a new dir is taken back
        if new:
            discard(sweep_dir, created)
        raise
    try:
        yield created
    finally:
        lock.release()


def _name_holder(fd: int, holder: str) -> None:
    """Say in the lock file who holds it (a refused command reads it back)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)


def check_free(sweep_dir: Path) -> None:
    """A new sweep goes only into a folder that does not exist or is empty."""
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise _taken(sweep_dir)


def _taken(sweep_dir: Path) -> UserError:
    return UserError(f"--sweep-dir: {sweep_dir} exists and is not empty; resubmit with "
                     f"'python jobs/submit.py resubmit {sweep_dir} --failed' or choose another --sweep-dir")


def _claim(sweep_dir: Path) -> bool:
    """Make `sweep_dir` this command's (True: it made the folder), or raise as check_free does."""
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        sweep_dir.mkdir()
        created = True
    except FileExistsError:
        check_free(sweep_dir)
        created = False
    try:  # an empty folder may be seen as free by two submits; only one creates the lock file
        os.close(os.open(sweep_dir / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise _taken(sweep_dir) from None
    return created


def discard(sweep_dir: Path, created: bool) -> None:
    """Take back a new sweep dir whose submission failed before any job existed."""
    if created:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        return
    for p in sweep_dir.iterdir():  # the folder was there, empty: leave it so
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def submitit_folder(sweep_dir: Path) -> Path:
    return sweep_dir / "submitit"


def mark_cancelled(sweep_dir: Path, job_ids: list[str]) -> None:
    with open(sweep_dir / CANCELLED, "a") as f:
        f.write("".join(f"{j}\n" for j in job_ids))


def cancelled_ids(sweep_dir: Path) -> set[str]:
    path = sweep_dir / CANCELLED
    return set(path.read_text().split()) if path.exists() else set()


def was_cancelled(job_id: str, listed: set[str]) -> bool:
    """Whether `cancel` stopped this job: listed itself, or its array (an array task is ARRAY_TASK)."""
    return job_id in listed or job_id.split("_")[0] in listed

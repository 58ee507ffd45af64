"""The run directory: the one place that knows its layout and how its files are written and read.

    <run dir>/config.yaml      the resolved config (written first, before training)
    <run dir>/env.json         code version, package versions, device, world size, host
    <run dir>/metrics.jsonl    one JSON object per record (training records and evaluations)
    <run dir>/summary.json     the final evaluation and timings (written last: the run is done)
    <run dir>/pruned.json      instead of summary.json, for a run its caller stopped early (train's
                               on_eval hook: a pruned search trial): the summary, and when and why
    <run dir>/trial.json       a search trial's end (sweep/record.py TrialRecord): number, state (complete |
                               pruned | fail), value, metric, params, note
    <run dir>/model.pt         the final (evaluated) weights, which they are, and input statistics, with their
                               sha256, for predict and evaluate
    <run dir>/loss.png, per_class_accuracy.png
    <run dir>/checkpoints/     step_<global step>/ (checkpoint.py)
    <run dir>/.lock            held (flock) by the process training in it; names its holder
    <run dir>/profile/         trace.json and ops.txt of `profile.steps` (debug/profiler.py)

Every whole-file write is atomic and durable (`write_atomic`: temporary file, fsync, rename,
fsync of the folder), so a kill or a power cut leaves the old file or the new one; a write that fails
(a full disk, a quota, no permission) leaves the old file and no temporary one, and `writing` turns
its OSError into one line naming the file and the cause. metrics.jsonl is appended a line at a time;
`read_jsonl` is its one reader, tolerant of a last line torn by a kill. A run notices when its
directory is removed or replaced under it (`RunDir.ensure_present`, `MetricsFile.append`) and stops.
`.lock` is an fcntl.flock of our own, not filelock's: `is_present` compares the held file's inode with
the path's, and filelock does not hand out the file it holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cifar_dist.errors import UserError

if TYPE_CHECKING:
    import torch

CONFIG = "config.yaml"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PRUNED = "pruned.json"
TRIAL = "trial.json"
MODEL = "model.pt"
CHECKPOINTS = "checkpoints"
LOSS_PLOT = "loss.png"
CLASS_PLOT = "per_class_accuracy.png"
LOCK = ".lock"
PROFILE_DIR = "profile"  # its TRACE (Chrome trace format: https://ui.perfetto.dev or chrome://tracing) and OPS
TRACE = "trace.json"
OPS = "ops.txt"


class RunDirError(UserError):
    """The run directory cannot be used; nothing was written."""


class WriteError(RunDirError):
    """A write into the run directory failed (disk full, quota, no permission, read-only); what was
    written before it stands, and nothing half-written is left."""


class RunDirGone(RunDirError):
    """The run directory was removed or replaced while the run was writing in it."""

    def __init__(self, path: Path):
        super().__init__(f"run.dir: {path} was removed or replaced while the run was writing in it; stopped without "
                         "writing anything more (run the same command to start the run again)")


class RunDir:
    """A run directory and the files in it."""

    def __init__(self, path: Path | str, run_id: str = "", created: bool = False, fresh: bool = False):
        self.path = Path(path)
        self.run_id = run_id
        self.created = created  # this process made the directory (a failed start removes it)
        self.fresh = fresh  # it held no run when this process took it (a failed start empties it again)
        self._lock: Any = None  # the open, flocked .lock file while this process holds the run

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def is_run(self) -> bool:
        return (self.path / SUMMARY).is_file() or (self.path / CONFIG).is_file()

    def summary(self) -> dict[str, Any] | None:
        """summary.json, or None while the run is unfinished; a damaged one is a one-line error."""
        return read_json(self.path / SUMMARY)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def epochs_trained(self, records: list[dict[str, Any]] | None = None) -> float:
        """Epochs trained so far, from the newest training record (of `records`, if already read)."""
        return max((r.get("epoch", 0) for r in (self.metrics() if records is None else records) if "train_loss" in r),
                   default=0)

    # ---- the lock: one process trains in a run dir at a time

    def lock(self) -> None:
        """Hold the run dir for this process (released when it ends, however it ends), or raise
        naming the holder. The kernel drops a flock with its process, so a killed run never blocks."""
        f = open(self.path / LOCK, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run.dir: {self.path} is in use by {holder}; wait for it or choose another run.dir") from None
        self._lock = f

    def name_holder(self) -> None:
        """Say in the lock file who holds it (after the checks: a refused start changes nothing)."""
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._lock.flush()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def is_present(self) -> bool:
        """Whether the directory at `path` is still the one this process locked (not removed, not
        replaced by another); true where this process holds no lock (ranks > 0). The held lock file's
        inode cannot be reused while it is open, so finding it at `path/.lock` is proof."""
        return self._lock is None or still_linked(self.path / LOCK, self._lock)

    def ensure_present(self) -> None:
        """Raise RunDirGone when the directory is no longer the one this process locked."""
        if not self.is_present():
            raise RunDirGone(self.path)


# ---------------------------------------------------------------------------- writing


@contextlib.contextmanager
def writing(what: str | Path | None = None) -> Iterator[None]:
    """An OSError inside (no space left, a quota, no permission, a read-only file system) becomes a
    one-line WriteError naming `what` (by default the file the error names) and the cause."""
    try:
        yield
    except OSError as e:
        raise WriteError(f"cannot write {what or e.filename or 'into the run dir'} ({e.strerror or e}); everything "
                         "written before stays: free space (or fix the permissions) and run the same command to go on "
                         "from the last checkpoint") from None


def still_linked(path: Path, f: Any) -> bool:
    """Whether the open file `f` is still the file at `path` (not deleted, its folder not removed or replaced)."""
    try:
        here = os.stat(path)
    except OSError:
        return False
    held = os.fstat(f.fileno())
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` all at once, durably: a reader never sees half a file."""
    _replace(path, data.encode() if isinstance(data, str) else data)


def _replace(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the
    folder. A failure (an OSError naming `path`) leaves `path` as it was and no temporary file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None  # the file meant, not its temporary name
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """JSON that is JSON: a NaN or infinity is refused (ValueError), never written."""
    write_atomic(path, json.dumps(obj, indent=2, allow_nan=False))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsFile:
    """metrics.jsonl, appended a line at a time (flushed, so a reader sees whole records)."""

    def __init__(self, path: Path, keep: int):
        """Keep the first `keep` records (a resumed run redoes what came after its checkpoint)."""
        self.path = path
        self.previous = read_jsonl(path)  # every whole record a previous process wrote
        kept = self.previous[:keep]
        with writing(path):
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._file = open(path, "a")  # noqa: SIM115 - closed in close()
        self.records = list(kept)

    @property
    def lines(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        """One record, flushed; RunDirGone when the file is no longer in the run dir (it was removed)."""
        if not still_linked(self.path, self._file):
            raise RunDirGone(self.path.parent)
        try:
            with writing(self.path):
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
        except WriteError:
            with contextlib.suppress(OSError):  # closed now: its unwritten buffer must not fail again at exit
                self._file.close()
            raise
        self.records.append(record)

    def close(self) -> None:
        self._file.close()


# ---------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, up to the first line that is not a whole JSON object (a
    line torn by a kill in mid-write is the last; nothing after a damaged line is trusted)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(record, dict):
            break
        records.append(record)
    return records


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None when absent; an empty or damaged one is a RunDirError naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: damaged ({e}); delete it to let the run redo it") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: damaged (not a JSON object)")
    return data


# ---------------------------------------------------------------------------- model.pt


def save_model(path: Path, model_name: str, classes: list[str], state_dict: dict[str, torch.Tensor],
               mean: tuple[float, ...], std: tuple[float, ...], weights: str = "trained") -> None:
    """The final weights as plain data (`torch.load(weights_only=True)` reads them back), with the
    per-channel mean and std the net's inputs were normalised with, which weights they are (the
    trained ones, or their moving average: "ema (...)"), and a sha256 of it all."""
    contents = {"model": model_name, "classes": classes, "state_dict": state_dict, "mean": list(mean), "std": list(std),
                "weights": weights}
    torch_save_atomic(path, {**contents, "sha256": content_digest(contents)})


def content_digest(contents: dict[str, Any]) -> str:
    """sha256 of named tensors and plain (JSON-able) values, nested dicts included, in name order:
    the checksum stored inside model.pt and the data cache, over everything else in them."""
    import torch  # here, as in every function of this module that needs it: the sweep commands
    # read run dirs (summary, metrics) and start seconds sooner without torch.

    h = hashlib.sha256()

    def add(fields: dict[str, Any], prefix: str) -> None:
        for name in sorted(fields):
            value = fields[name]
            if isinstance(value, dict):
                add(value, f"{prefix}{name}.")
            elif isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{prefix}{name} {t.dtype} {list(t.shape)}\n".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # its bytes, whatever the dtype
            else:
                h.update(f"{prefix}{name} {json.dumps(value)}\n".encode())

    add(contents, "")
    return h.hexdigest()


def torch_save_atomic(path: Path, obj: Any) -> None:
    """`torch.save` with `write_atomic`'s promise: the old file or the whole new one, durably."""
    _replace(path, torch_bytes(obj))


def torch_bytes(obj: Any) -> memoryview:
    """`torch.save`'s file, made in memory: written by Python, a full disk is an OSError that says so
    (torch's own file writer reports it as a RuntimeError, "unexpected pos")."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def load_weights(path: Path) -> Any:
    """A model.pt or checkpoint file as plain data; a file that would run code when unpickled is
    refused. A file that stores a sha256 of its contents is checked against it."""
    import torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and "sha256" in blob:
        contents = {k: v for k, v in blob.items() if k != "sha256"}
        if content_digest(contents) != blob["sha256"]:
            raise RunDirError(f"{path}: damaged (its contents do not match the sha256 saved with them); "
                              "use a checkpoint of the run, or train again")
    return blob

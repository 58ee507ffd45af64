"""Checkpoints: atomic, marker-last writes named by global step; find the newest valid one.

Layout: `<run dir>/checkpoints/step_00001234/state.pt` plus `COMPLETE`, a JSON marker written
last that holds the state file's size and sha256 (and the test accuracy and loss of the weights,
when they were just evaluated). A checkpoint without its marker, or whose file does not match it,
or that does not load with `weights_only=True`, does not exist: it is named in a warning and the
previous one is used.

Where a command takes "a run dir or a checkpoint" (predict, evaluate, `train --resume-from`,
`train.init_from`), a checkpoint folder (`step_N/`) is one checkpoint: `list_checkpoints` of it is
itself, `chosen` and `weights_file` say which file a path names.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_dist.errors import UserError
from cifar_dist.metrics import direction
from cifar_dist.rundir import CHECKPOINTS, MODEL, fsync_dir, load_weights, torch_bytes, write_atomic, writing

MARKER = "COMPLETE"
STATE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    marker: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int, test_accuracy: float | None = None, *,
         test_loss: float | None = None, best_by: str = "test_accuracy") -> Path:
    """Write `state` as the checkpoint of `step`: temp dir, fsync, rename, marker last; then prune,
    keeping the newest `keep` and the best by `best_by` (a metric the markers hold). A write that
    fails (disk full, no permission) is a one-line WriteError naming the checkpoint and the cause,
    and leaves no part of it behind (a retry needs the space again); older checkpoints stay."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    if (final / MARKER).exists() and _problem(final, verify=True) is None:
        return final  # already written and whole (a resume that saves the step it resumed from)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    with writing(f"checkpoint {final}"):
        root.mkdir(exist_ok=True)  # not its parents: a run dir that is gone is not made again
        try:
            _write(tmp, final, torch_bytes(state))
            marker = {"step": step, "size": (final / STATE).stat().st_size, "sha256": file_sha256(final / STATE),
                      "test_accuracy": test_accuracy, "test_loss": test_loss, "saved_at": time.time()}
            write_atomic(final / MARKER, json.dumps(marker))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / MARKER).exists():
                shutil.rmtree(final, ignore_errors=True)
            raise
    prune(run_dir, keep, best_by)
    return final


def _write(tmp: Path, final: Path, state: bytes | memoryview) -> None:
    """The state file in a temporary folder, then the folder renamed to `final`, each durably."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / STATE).write_bytes(state)
    _fsync(tmp / STATE)
    if final.exists():
        shutil.rmtree(final)  # a marker-less leftover of a killed write
    os.rename(tmp, final)
    fsync_dir(final.parent)


def load_latest(run_dir: Path, warn: Callable[[str], None]) -> tuple[Checkpoint, dict[str, Any]] | None:
    """The newest valid checkpoint and its state; invalid ones are named in a warning and skipped."""
    for ckpt in reversed(list_checkpoints(run_dir, warn)):
        try:
            return ckpt, load_state(ckpt.path / STATE)
        except Exception as e:
            warn(f"checkpoint {ckpt.path} does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]}); skipped")
    return None


def load_state(path: Path) -> dict[str, Any]:
    return load_weights(path)  # weights_only: a checkpoint that would run code when unpickled is refused


def list_checkpoints(run_dir: Path, warn: Callable[[str], None] | None = None, verify: bool = True) -> list[Checkpoint]:
    """Valid checkpoints (marker present, file matches it; `verify` checks the sha256 too), oldest
    first: a run dir's, or the one a checkpoint folder (`step_N/`) given as `run_dir` is."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        folders = sorted(root.iterdir())
    else:
        folders = [run_dir] if _STEP_DIR.match(run_dir.name) and (run_dir / STATE).is_file() else []
    found = []
    for d in folders:
        m = _STEP_DIR.match(d.name)
        if not m:
            continue
        problem = _problem(d, verify)
        if problem:
            if warn:
                warn(f"checkpoint {d} {problem}; skipped")
            continue
        found.append(Checkpoint(d, int(m.group(1)), json.loads((d / MARKER).read_text())))
    return sorted(found, key=lambda c: c.step)


def _problem(d: Path, verify: bool) -> str | None:
    """What makes checkpoint folder `d` invalid, or None when it is valid."""
    if not (d / MARKER).is_file():
        return "has no completion marker (its write was interrupted)"
    try:
        marker = json.loads((d / MARKER).read_text())
        size, digest = marker["size"], marker["sha256"]
    except (ValueError, KeyError, TypeError):
        return "has an unreadable marker"
    if not (d / STATE).is_file():
        return f"has no {STATE}"
    if (d / STATE).stat().st_size != size:
        return f"is truncated or altered ({(d / STATE).stat().st_size} bytes, the marker says {size})"
    if verify and file_sha256(d / STATE) != digest:
        return "does not match its marker's checksum"
    return None


def prune(run_dir: Path, keep: int, best_by: str = "test_accuracy") -> None:
    """Keep the newest `keep` valid checkpoints and the best by `best_by` (test_accuracy or
    test_loss); remove the rest, invalid ones older than the newest valid one, and leftovers of
    interrupted writes."""
    root = checkpoint_dir(run_dir)
    for leftover in root.glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    valid = list_checkpoints(run_dir, verify=False)
    if not valid:
        return
    best = best_of(valid, best_by)
    keep_paths = {c.path for c in valid[-keep:]} | ({best.path} if best else set())
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d not in keep_paths and int(m.group(1)) < valid[-1].step:
            shutil.rmtree(d, ignore_errors=True)


def best_of(checkpoints: list[Checkpoint], metric: str = "test_accuracy") -> Checkpoint | None:
    """The checkpoint whose weights scored best on `metric` when evaluated (the newest of equals)."""
    scored = [c for c in checkpoints if c.marker.get(metric) is not None]
    sign = 1 if direction(metric) == "maximize" else -1
    return max(scored, key=lambda c: (sign * c.marker[metric], c.step)) if scored else None


# ---------------------------------------------------------------------------- a checkpoint named on a command line


def chosen(path: Path) -> Checkpoint:
    """The checkpoint `path` names: a checkpoint folder (`step_N/`), its state.pt, or a run dir
    (its newest valid checkpoint); a UserError naming the path otherwise."""
    folder = path.parent if path.name == STATE else path
    if not folder.is_dir():
        raise UserError(f"{path}: no such checkpoint or run directory")
    problem = _problem(folder, verify=True) if _STEP_DIR.match(folder.name) else None
    if problem:
        raise UserError(f"{path}: the checkpoint {problem}")
    found = list_checkpoints(folder)
    if not found:
        raise UserError(f"{path}: not a checkpoint (checkpoints/step_N/) and no valid checkpoint in it")
    return found[-1]


def weights_file(path: Path) -> Path:
    """The file of weights `path` names: a model.pt or a checkpoint's state.pt as given; for a run
    dir, its model.pt, else its newest valid checkpoint; for a checkpoint folder, its state.pt."""
    if path.is_file():
        return path
    if path.is_dir() and (path / MODEL).is_file():
        return path / MODEL
    return chosen(path).path / STATE


# ---------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain Python values: they travel between ranks as pickles
    and load back with `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


# ---------------------------------------------------------------------------- file helpers


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())

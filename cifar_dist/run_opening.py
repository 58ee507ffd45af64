"""Opening a run: its id and directory decided (rank 0 decides, every rank agrees), a directory
that holds another run refused, the directory locked, and the evidence recorded (the resolved
config.yaml and env.json) once every check has passed."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from cifar_dist import schema
from cifar_dist.config import Config, config_from_dict
from cifar_dist.distributed import Distributed
from cifar_dist.errors import ConfigError
from cifar_dist.precision import resolve as resolve_precision
from cifar_dist.result_keys import diff_result_keys
from cifar_dist.rundir import CONFIG, ENV, LOCK, RunDir, RunDirError, write_atomic, write_json, writing


def open_run(cfg: Config, dist: Distributed) -> RunDir:
    """The run's directory, held by rank 0 for the life of the run. Fixes `cfg.run.dir` and
    `cfg.run.id` in place, so that config.yaml holds the real values. Nothing is written yet but
    the directory and its lock; `record_start` writes the rest, `abandon` takes back a failed start."""
    claimed = _claim(cfg) if dist.is_main else None
    decided = dist.broadcast(claimed if isinstance(claimed, str) or claimed is None else
                             (str(claimed.path), claimed.run_id, claimed.created))
    if isinstance(decided, str):
        raise RunDirError(decided)
    cfg.run.dir, cfg.run.id, created = decided
    return claimed if isinstance(claimed, RunDir) else RunDir(cfg.run.dir, cfg.run.id, created)


def _claim(cfg: Config) -> RunDir | str:
    """Rank 0: the run dir, locked by this process; or the one-line reason it cannot be used."""
    run_id = cfg.run.id or uuid.uuid4().hex[:8]
    path = Path(cfg.run.dir or f"runs/{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}")
    try:  # a name longer than the file system allows fails even the look (ENAMETOOLONG)
        if path.exists() and not path.is_dir():
            return f"run.dir: {path} exists and is not a directory"
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"run.dir: cannot create {path} ({e.strerror})"
    had_lock = (path / LOCK).exists()
    run = RunDir(path, created=created, fresh=not (path / CONFIG).exists())
    try:
        run.lock()
        run.run_id = _check_existing(cfg, path, run_id)  # under the lock: no other run changes it meanwhile
    except (RunDirError, OSError) as e:
        run.unlock()
        _take_back(path, created, had_lock)
        return str(e) if isinstance(e, RunDirError) else f"run.dir: cannot use {path} ({e.strerror})"
    return run


def _check_existing(cfg: Config, path: Path, run_id: str) -> str:
    """The run id to use, or raise RunDirError when the directory holds something else."""
    if not (path / CONFIG).exists():
        others = [p.name for p in path.iterdir() if p.name != LOCK]
        if others:
            raise RunDirError(f"run.dir: {path} is not empty and holds no cifar-dist run (no {CONFIG}); "
                              "choose a new or empty run.dir")
        return run_id
    try:
        old = config_from_dict(schema.read_yaml_mapping(path / CONFIG, "run config"))
    except ConfigError as e:
        raise RunDirError(f"run.dir: {path / CONFIG} is not a readable run config ({e})") from None
    if not old.run.id:
        raise RunDirError(f"run.dir: {path / CONFIG} is damaged (no run.id); choose a new run.dir")
    if cfg.run.id and cfg.run.id != old.run.id:
        raise RunDirError(f"run.dir: {path} belongs to run id {old.run.id}, not {cfg.run.id}")
    was, now = old.train.init_sha256, cfg.train.init_sha256
    if was and now and was != now:
        raise RunDirError(f"run.dir: {path} started from train.init_from with sha256 {was}; {cfg.train.init_from} now "
                          f"has {now} (the file changed); use a new run.dir")
    changed = diff_result_keys(old, cfg)
    if changed and not cfg.checkpoint.allow_config_change:
        raise RunDirError(f"run.dir: {path} holds a run with a different config ({'; '.join(changed)}); "
                          "use a new run.dir, or checkpoint.allow_config_change=true to resume anyway")
    return old.run.id


def _take_back(path: Path, created: bool, had_lock: bool) -> None:
    """Leave the directory as it was before this process: removed if it made it, else without its lock file."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
    elif not had_lock:
        (path / LOCK).unlink(missing_ok=True)


def abandon(run: RunDir, dist: Distributed) -> None:
    """A start that failed (before its first step): leave no trace of it (rank 0). A new run's
    directory goes, or is emptied when it was there before (it then held nothing but a lock file);
    a run that was resumed keeps everything it had."""
    if dist.is_main:
        ours = run.is_present()  # a directory removed or replaced meanwhile is not this run's to clean
        run.unlock()
        if ours and run.fresh and not run.created:
            for entry in run.path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.name != LOCK:
                    entry.unlink()
        if ours:
            _take_back(run.path, run.created, had_lock=True)


def record_start(run: RunDir, cfg: Config, dist: Distributed) -> None:
    """config.yaml (resolved) and env.json, by rank 0; the others wait for them."""
    def write() -> None:
        run.name_holder()
        with writing():
            write_atomic(run / CONFIG, cfg.to_yaml())
            write_json(run / ENV, environment(cfg, dist))

    dist.main_only(write)


def environment(cfg: Config, dist: Distributed) -> dict[str, Any]:
    packages = {}
    for name in ("torch", "torchvision", "accelerate", "numpy", "pyyaml", "wandb", "submitit", "cifar-dist"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "code_version": _git_version(),
        "python": sys.version.split()[0],
        "packages": packages,
        "device": device_name(dist.device),
        "precision": resolve_precision(cfg.train.precision, dist.device),
        "world_size": dist.world,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _git_version() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"

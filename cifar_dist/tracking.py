"""The run's records: its directory, metrics.jsonl, wandb, and what the console shows.

Only rank 0 records; `open_records` gives other ranks a `NullRecords` that does nothing, so the
loop never asks which rank it is.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from cifar_dist.config import Config, ConfigError, config_from_dict, flatten, result_keys
from cifar_dist.distributed import Distributed
from cifar_dist.evaluate import EvalResult

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class RunDirError(ValueError):
    """The run directory cannot be used for this config; nothing was written."""


# ---------------------------------------------------------------------------- run directory


@dataclass
class RunDir:
    path: Path
    run_id: str

    @property
    def summary(self) -> dict[str, Any] | None:
        f = self.path / SUMMARY
        return json.loads(f.read_text()) if f.exists() else None


def prepare_run_dir(cfg: Config, dist: Distributed) -> RunDir:
    """Fix the run's id and directory (rank 0 decides, every rank agrees), refuse a directory
    that holds something else, and record the resolved config and environment.

    Updates `cfg.run.dir` and `cfg.run.id` in place so that config.yaml holds the real values.
    """
    decided = dist.broadcast(_decide_run_dir(cfg) if dist.is_main else None)
    if isinstance(decided, str):
        raise RunDirError(decided)
    cfg.run.dir, cfg.run.id = decided
    run = RunDir(Path(cfg.run.dir), cfg.run.id)

    def write() -> None:
        run.path.mkdir(parents=True, exist_ok=True)
        write_atomic(run.path / "config.yaml", cfg.to_yaml())
        write_atomic(run.path / "env.json", json.dumps(environment(dist), indent=2))

    dist.main_only(write)
    return run


def _decide_run_dir(cfg: Config) -> tuple[str, str] | str:
    """(dir, id), or the one-line reason the directory cannot be used."""
    run_id = cfg.run.id or uuid.uuid4().hex[:8]
    if not cfg.run.dir:
        return f"runs/{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}-{run_id}", run_id
    path = Path(cfg.run.dir)
    if path.exists() and not path.is_dir():
        return f"run.dir: {path} exists and is not a directory"
    if not path.exists() or not any(path.iterdir()):
        return str(path), run_id
    saved = path / "config.yaml"
    if not saved.is_file():
        return f"run.dir: {path} is not empty and holds no cifar-dist run (no config.yaml); choose a new or empty run.dir"
    try:
        old = config_from_dict(yaml.safe_load(saved.read_text()))
    except (ConfigError, yaml.YAMLError, TypeError) as e:
        return f"run.dir: {saved} is not a readable run config ({e})"
    if cfg.run.id and old.run.id and cfg.run.id != old.run.id:
        return f"run.dir: {path} belongs to run id {old.run.id}, not {cfg.run.id}"
    changed = diff_result_keys(old, cfg)
    if changed and not cfg.checkpoint.allow_config_change:
        return (f"run.dir: {path} holds a run with a different config ({'; '.join(changed)}); "
                "use a new run.dir, or checkpoint.allow_config_change=true to resume anyway")
    return str(path), old.run.id or run_id


def diff_result_keys(old: Config, new: Config) -> list[str]:
    a, b = result_keys(old), result_keys(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def environment(dist: Distributed) -> dict[str, Any]:
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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- records


class NullRecords:
    """What ranks other than 0 record: nothing."""

    lines = 0

    def log(self, record: dict[str, Any], eval_result: EvalResult | None = None) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class Records(NullRecords):
    """metrics.jsonl (always) and wandb (`tracking.backend=wandb`), written by rank 0."""

    def __init__(self, run: RunDir, cfg: Config, classes: list[str], test_images: torch.Tensor, keep_lines: int):
        self.path = run.path / METRICS
        self.classes = classes
        self.test_images = test_images
        previous = self.path.read_text().splitlines() if self.path.exists() else []
        # Resume: drop the records written after the checkpoint; they are about to be redone.
        kept = previous[:keep_lines]
        write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.lines = len(kept)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in finish()
        # Records that wandb already received before the interruption are not sent again.
        self._wandb_skip = len(previous) - len(kept)
        self.wandb = WandbSink(run, cfg) if cfg.tracking.backend == "wandb" else None

    def log(self, record: dict[str, Any], eval_result: EvalResult | None = None) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        if self.wandb:
            if self._wandb_skip > 0:
                self._wandb_skip -= 1
            else:
                self.wandb.log(record, eval_result, self.classes, self.test_images)

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()
        if self.wandb:
            self.wandb.finish(summary)


def open_records(dist: Distributed, run: RunDir, cfg: Config, classes: list[str], test_images: torch.Tensor,
                 keep_lines: int) -> NullRecords:
    return Records(run, cfg, classes, test_images, keep_lines) if dist.is_main else NullRecords()


def eval_record(step: int, epoch: int, elapsed: float, result: EvalResult, classes: list[str]) -> dict[str, Any]:
    return {
        "step": step, "epoch": epoch, "time": round(elapsed, 3),
        "test_loss": result.loss, "test_accuracy": result.accuracy,
        "per_class_accuracy": dict(zip(classes, result.per_class)),
    }


# ---------------------------------------------------------------------------- wandb


class WandbSink:
    """wandb on rank 0, against our own global step; offline when there is no key or network."""

    def __init__(self, run: RunDir, cfg: Config):
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_reachable() else "offline")
        if mode == "offline" and not os.environ.get("WANDB_MODE"):
            print("wandb: no API key or no network; logging offline (sync later with 'wandb sync')", flush=True)
        self.run = wandb.init(
            project=cfg.tracking.project, entity=cfg.tracking.entity or None, name=cfg.run.name or run.path.name,
            group=cfg.tracking.group or None, job_type=cfg.tracking.job_type, tags=cfg.tracking.tags or None,
            config=flatten(cfg.to_dict()), id=run.run_id, resume="allow", dir=str(run.path), mode=mode,
            settings=wandb.Settings(init_timeout=60, silent=True),
        )
        self.run.define_metric("step")
        self.offline = mode == "offline"

    def log(self, record: dict[str, Any], result: EvalResult | None, classes: list[str], test_images: torch.Tensor) -> None:
        wandb = self.wandb
        data: dict[str, Any] = {}
        for key, value in record.items():
            if key == "per_class_accuracy":
                data.update({f"test/acc/{c}": v for c, v in value.items()})
            elif key in ("test_loss", "test_accuracy"):
                data[f"test/{key.removeprefix('test_')}"] = value
            elif key != "step":
                data[f"train/{key}" if key in ("train_loss", "lr", "images_per_second") else key] = value
        if result is not None:
            counts = result.confusion.tolist()
            cells = [[classes[i], classes[j], counts[i][j]] for i in range(len(classes)) for j in range(len(classes))]
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
            # The same chart wandb.plot.confusion_matrix makes, from counts instead of per-image lists.
            fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
            data["test/confusion_matrix"] = wandb.plot_table("wandb/confusion_matrix/v1", table, fields,
                                                             {"title": "confusion matrix"})
            data["test/examples"] = [
                wandb.Image(test_images[i].cpu().numpy(), caption=f"pred {classes[p]} / true {classes[t]}")
                for i, t, p in result.samples
            ]
        self.run.log(data, step=record["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary["final_accuracy"] = summary["test_accuracy"]
        self.run.summary["best_accuracy"] = summary["best_test_accuracy"]
        offline_dir = self.run.dir.rstrip("/").removesuffix("/files") if self.offline else None
        self.run.finish()
        if offline_dir:
            print(f"wandb: offline run in {offline_dir}; upload it with: wandb sync {offline_dir}", flush=True)


def _wandb_reachable(timeout_s: float = 3.0) -> bool:
    """An API key and a TCP connection to the wandb server within `timeout_s`."""
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            import netrc

            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (OSError, netrc.NetrcParseError):
            pass
    if not has_key:
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False

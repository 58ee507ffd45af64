"""The run's records: its directory, metrics.jsonl, wandb, and what the console shows.

Only rank 0 records; `open_records` gives other ranks a `NullRecords` that does nothing, so the
loop never asks which rank it is.
"""

from __future__ import annotations

import json
import netrc
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import yaml

from cifar_dist.config import Config, ConfigError, config_from_dict, result_keys
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
        previous = self.path.read_text().splitlines() if self.path.exists() else []
        # Resume: drop the records written after the checkpoint; they are about to be redone.
        kept = previous[:keep_lines]
        write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.lines = len(kept)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed in finish()
        self.wandb = None
        if cfg.tracking.backend == "wandb":
            # The sink works out from the previous records which steps wandb already has.
            self.wandb = WandbSink(run, cfg, classes, test_images, _whole_records(previous), len(kept))

    def log(self, record: dict[str, Any], eval_result: EvalResult | None = None) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        if self.wandb:
            self.wandb.log(record, eval_result)

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()
        if self.wandb:
            self.wandb.finish(summary)


def _whole_records(lines: list[str]) -> list[dict[str, Any]]:
    """The records of metrics.jsonl lines, up to a last line torn by a kill in mid-write."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


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

# How wandb's history names our record keys; any other key keeps its name.
WANDB_KEYS = {"time": "train/seconds", "train_loss": "train/loss", "lr": "train/lr", "test_loss": "test/loss",
              "test_accuracy": "test/accuracy"}
WANDB_CHECK_S = 3.0  # seconds at most that finding the wandb server unreachable may add to a run's start


class WandbSink:
    """wandb on rank 0, against our own global step; offline, with one line saying why, when there
    is no API key or no network.

    Resume: the wandb run id is the run id, so every restart and requeue continues one wandb run.
    A step is sent (committed) only once complete: when its evaluation (a step's last record) or a
    later step's record arrives, or at the end. So a process stopped for requeue never sends half a
    step (an epoch's last training record without the evaluation that the resumed process adds, which
    wandb would then drop as a step it already has), and the previous records tell which steps wandb
    has: all before the last record's step, and that one too when the last record is an evaluation.
    """

    def __init__(self, run: RunDir, cfg: Config, classes: list[str], test_images: torch.Tensor,
                 previous: list[dict[str, Any]], kept: int):
        import wandb

        self.wandb, self.classes, self.test_images, self.batch_size = wandb, classes, test_images, cfg.train.batch_size
        mode, why_offline = _wandb_mode()
        if why_offline:
            print(f"wandb: {why_offline}; logging offline (the path and 'wandb sync' command come at the end)", flush=True)
        t = cfg.tracking
        init_args = dict(
            project=t.project, entity=t.entity or None, name=cfg.run.name or run.path.name, group=t.group or None,
            job_type=t.job_type, tags=t.tags or None, config=cfg.to_dict(), id=run.run_id, resume="allow",
            dir=str(run.path), settings=wandb.Settings(init_timeout=30, silent=True),
        )
        # Quiet from the start (the credentials message comes before init's own settings apply); ours are the lines to read.
        wandb.setup(wandb.Settings(silent=True))
        try:
            self.run = wandb.init(mode=mode, **init_args)
        except Exception as e:  # auth, network and server errors have many types; none may stop training
            if mode != "online":
                raise
            said = " ".join(str(e).split())  # the server's reply can be a whole HTML page
            said = said if len(said) <= 120 else said[:117] + "..."
            print(f"wandb: cannot start online ({type(e).__name__}: {said}); logging offline", flush=True)
            wandb.teardown()  # the service still holds the failed run's id and would refuse it offline
            self.run = wandb.init(mode="offline", **init_args)
        last = previous[-1] if previous else None
        self._sent = -1 if last is None else last["step"] - ("test_accuracy" not in last)  # wandb has steps <= this
        self._step, self._data = -1, {}  # the step being gathered, and its data so far
        self._since = (0, 0.0)  # (step, time) of the record before, for images/s
        for record in previous[:kept]:  # the held step the previous process never sent, if any
            self.log(record)

    def log(self, record: dict[str, Any], result: EvalResult | None = None) -> None:
        step = record["step"]
        if step > self._step:
            self._commit()
            self._step = step
        if step > self._sent:
            self._data.update(self._fields(record, result))
        self._since = (step, record["time"])
        if "test_accuracy" in record:
            self._commit()

    def _commit(self) -> None:
        if self._data:
            self.run.log(self._data, step=self._step, commit=True)
            self._data = {}

    def _fields(self, record: dict[str, Any], result: EvalResult | None) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for key, value in record.items():
            if key == "per_class_accuracy":
                data.update({f"test/acc/{c}": v for c, v in value.items()})
            elif key != "step":
                data[WANDB_KEYS.get(key, key)] = value
        if "train_loss" in record:
            # Since the previous record; an evaluation's record comes after it, so its time is not counted.
            steps, seconds = record["step"] - self._since[0], record["time"] - self._since[1]
            if steps > 0 and seconds > 0:
                data["train/images_per_second"] = steps * self.batch_size / seconds
        if result is not None:
            wandb, classes = self.wandb, self.classes
            counts = result.confusion.tolist()
            cells = [[classes[i], classes[j], counts[i][j]] for i in range(len(classes)) for j in range(len(classes))]
            table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells)
            # The chart wandb.plot.confusion_matrix makes, from our exact counts instead of per-image lists.
            fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
            data["test/confusion_matrix"] = wandb.plot_table("wandb/confusion_matrix/v1", table, fields,
                                                             {"title": "confusion matrix"})
            data["test/examples"] = [
                wandb.Image(self.test_images[i].cpu().numpy(), caption=f"pred {classes[p]} / true {classes[t]}")
                for i, t, p in result.samples
            ]
        return data

    def finish(self, summary: dict[str, Any]) -> None:
        self._commit()
        self.run.summary.update({
            "final_accuracy": summary["test_accuracy"], "best_accuracy": summary["best_test_accuracy"],
            "train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
            "world_size": summary["world_size"],
        })
        offline = self.run.offline and not self.run.disabled
        sync_dir = Path(self.run.settings.sync_dir)
        # Every process of a resumed run writes its own offline dir; the glob uploads them all, in order.
        every_part = shlex.quote(str(sync_dir.parent)) + f"/offline-run-*-{self.run.id}"
        self.run.finish()
        # finish() returns before wandb's service has written the run to disk; teardown waits for that, so the
        # files are whole when the line below says so (and when train() returns to a caller that reads them).
        self.wandb.teardown()
        if offline:
            print(f"wandb: offline run saved in {sync_dir}; upload it with: wandb sync {every_part}", flush=True)


def _wandb_mode() -> tuple[str, str | None]:
    """wandb's mode, and why it is offline when nobody asked for that (else None)."""
    asked = os.environ.get("WANDB_MODE", "").strip().lower()
    if asked not in ("", "online"):
        return asked, None  # offline, dryrun, disabled: as asked
    problem = _wandb_unreachable()
    return ("offline", problem) if problem else ("online", None)


def _wandb_unreachable(timeout_s: float = WANDB_CHECK_S) -> str | None:
    """Why wandb cannot log online from here (no API key, or no TCP connection to its server within
    `timeout_s`), or None when it can."""
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or _netrc_has(url.netloc)):
        return "no API key (set WANDB_API_KEY or run 'wandb login')"
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    # Name resolution takes no timeout, so the attempt runs in a daemon thread that may be left behind.
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(timeout_s)
    if outcome and outcome[0] is None:
        return None
    return f"cannot reach {url.scheme}://{address[0]}:{address[1]} ({outcome[0] if outcome else f'no answer in {timeout_s:g} s'})"


def _netrc_has(machine: str) -> bool:
    """Whether the netrc file wandb reads (`$NETRC` or ~/.netrc) holds credentials for `machine`."""
    try:
        return netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc")).authenticators(machine) is not None
    except (OSError, netrc.NetrcParseError):
        return False

"""Trackers: where a run's records go besides metrics.jsonl (which rank 0 always writes).

A tracker is one class behind a small interface (`Tracker`: `log` each record, `finish` with the
summary), registered by name with `@register("name")`; `tracking.backend` selects any number of
them (`[wandb, tensorboard]`, or `wandb,tensorboard` on a command line), each getting every record.
Shipped: `wandb`, `tensorboard` (event files in `run.dir/tensorboard/`, for offline clusters, with
the flattened config and the final metrics in its HParams tab), and `none`. Only rank 0 records:
`open_records` gives other ranks `NoRecords`, so the loop never asks which rank it is. Trackers
know nothing of the config class: they are told what they need (`RunInfo`, the `tracking.*`
settings).
"""

from __future__ import annotations

import netrc
import os
import shlex
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import torch

from cifar_dist.metrics import EvalResult
from cifar_dist.rundir import METRICS, MetricsFile, RunDir
from cifar_dist.schema import flatten


class TrackingSettings(Protocol):
    """The `tracking.*` keys a tracker reads (config.TrackingConfig)."""

    backend: list[str]
    project: str
    entity: str
    group: str
    job_type: str
    tags: list[str]


@dataclass
class RunInfo:
    """What a tracker is told about the run."""

    run: RunDir
    name: str  # display name
    config: dict[str, Any]  # the resolved config
    classes: list[str]
    test_images: torch.Tensor  # uint8 (N, 32, 32, 3), for captioned examples
    batch_size: int  # images per optimiser step (global), for images/s


class Tracker:
    """Receives rank 0's records. `previous` are the run's records from before this process (a
    resume), of which the first `kept` stay; the rest are about to be redone."""

    def __init__(self, info: RunInfo, settings: TrackingSettings, previous: list[dict[str, Any]], kept: int):
        pass

    def log(self, record: dict[str, Any], result: EvalResult | None = None) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


TRACKERS: dict[str, type[Tracker]] = {"none": Tracker}  # tracking.backend -> its class


def register(name: str) -> Callable[[type[Tracker]], type[Tracker]]:
    def add(cls: type[Tracker]) -> type[Tracker]:
        TRACKERS[name] = cls
        return cls

    return add


# ---------------------------------------------------------------------------- records: metrics.jsonl + the tracker


class Records(Protocol):
    """Where the loop's records go: `log` each (an evaluation with its result), `finish` with the
    summary; `lines`: the records of metrics.jsonl so far, which a checkpoint notes to resume from."""

    lines: int

    def log(self, record: dict[str, Any], result: EvalResult | None = None) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None: ...


class NoRecords:
    """The records of ranks other than 0: none."""

    lines = 0

    def log(self, record: dict[str, Any], result: EvalResult | None = None) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class MetricsAndTracker:
    """Rank 0's records: metrics.jsonl (always) and every `tracking.backend` tracker, in the order named."""

    def __init__(self, info: RunInfo, settings: TrackingSettings, keep: int):
        """Resume: of the records metrics.jsonl holds, the first `keep` stay (those of the checkpoint); the rest
        are about to be redone. Each tracker works out from all of them which steps it already has."""
        self.metrics = MetricsFile(info.run / METRICS, keep)
        self.trackers = [TRACKERS[name](info, settings, self.metrics.previous, self.metrics.lines)
                         for name in settings.backend]

    @property
    def lines(self) -> int:
        return self.metrics.lines

    def log(self, record: dict[str, Any], result: EvalResult | None = None) -> None:
        self.metrics.append(record)
        for tracker in self.trackers:
            tracker.log(record, result)

    def finish(self, summary: dict[str, Any]) -> None:
        self.metrics.close()
        for tracker in self.trackers:
            tracker.finish(summary)


def open_records(info: RunInfo, settings: TrackingSettings, *, keep: int, on_this_rank: bool) -> Records:
    """Rank 0's records (`on_this_rank`), or nothing."""
    return MetricsAndTracker(info, settings, keep) if on_this_rank else NoRecords()


# ---------------------------------------------------------------------------- tensorboard


@register("tensorboard")
class TensorBoardTracker(Tracker):
    """TensorBoard event files in `run.dir/tensorboard/`, against the run's own global step:
    the same scalars as wandb's (train/loss, train/lr, train/grad_norm, train/images_per_second,
    test/loss, test/accuracy, test/acc/<class>) and the confusion matrix as an image. A resumed run
    purges the steps it redoes (`purge_step`), so TensorBoard shows each step once.

    At the end, the HParams tab's session: the flattened config as its hyperparameters and the
    final metrics (final/test_accuracy, final/best_test_accuracy, final/test_loss,
    final/train_seconds) as scalars of the same run. Written with the plugin's own summaries
    (`torch.utils.tensorboard.summary.hparams`) into this run's event file: `add_hparams` would
    write them into a sub-run of its own, which the tab then shows apart from the run's scalars."""

    def __init__(self, info: RunInfo, settings: TrackingSettings, previous: list[dict[str, Any]], kept: int):
        from torch.utils.tensorboard import SummaryWriter

        redo_from = previous[kept - 1]["step"] + 1 if kept else 0
        self.writer = SummaryWriter(str(info.run / "tensorboard"), purge_step=redo_from if previous else None)
        self.classes, self.batch_size, self.config = info.classes, info.batch_size, info.config
        self._since = (previous[kept - 1]["step"], previous[kept - 1]["time"]) if kept else (0, 0.0)

    def log(self, record: dict[str, Any], result: EvalResult | None = None) -> None:
        step = record["step"]
        for key, value in record.items():
            if key == "per_class_accuracy":
                for c, v in value.items():
                    self.writer.add_scalar(f"test/acc/{c}", v, step)
            elif key in WANDB_KEYS:
                self.writer.add_scalar(WANDB_KEYS[key], value, step)
        if "train_loss" in record:
            steps, seconds = step - self._since[0], record["time"] - self._since[1]
            if steps > 0 and seconds > 0:
                self.writer.add_scalar("train/images_per_second", steps * self.batch_size / seconds, step)
        self._since = (step, record["time"])
        if result is not None:  # rows = true class, columns = predicted; shade = share of the true class
            share = result.confusion.double() / result.confusion.sum(1, keepdim=True).clamp(min=1)
            self.writer.add_image("test/confusion_matrix", share.float().unsqueeze(0), step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("summary", f"final test accuracy {summary['test_accuracy']:.4f}, "
                             f"best {summary['best_test_accuracy']:.4f}, {summary['train_seconds']} s")
        final = {f"final/{k}": summary[k] for k in HPARAM_METRICS}
        for part in hparams(hparam_values(self.config), final):
            self.writer.file_writer.add_summary(part)
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, summary["steps"])
        self.writer.close()


HPARAM_METRICS = ("test_accuracy", "best_test_accuracy", "test_loss", "train_seconds")  # summary.json's, to compare runs by


def hparam_values(config: dict[str, Any]) -> dict[str, int | float | str]:
    """The flattened config as the HParams plugin takes it: numbers and text. A list is its items
    joined by commas, as on a command line; a boolean is "true" or "false" (torch's `hparams`
    would store it as the number 1 or 0)."""
    def value(v: Any) -> int | float | str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return ",".join(map(str, v))
        return v if isinstance(v, (int, float, str)) else str(v)

    return {k: value(v) for k, v in flatten(config).items()}


# ---------------------------------------------------------------------------- wandb

# How wandb's history names our record keys; any other key keeps its name.
WANDB_KEYS = {"time": "train/seconds", "train_loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "test_loss": "test/loss", "test_accuracy": "test/accuracy"}
WANDB_PROJECT = "cifar-dist"  # when neither tracking.project nor WANDB_PROJECT names one
WANDB_CHECK_S = 3.0  # seconds at most that finding the wandb server unreachable may add to a run's start


@register("wandb")
class WandbTracker(Tracker):
    """wandb on rank 0, against our own global step; offline, with one line saying why, when there
    is no API key or no network.

    wandb's own settings: a `tracking.project`, `entity` or `group` that is set wins; one left
    empty is wandb's to read from WANDB_PROJECT, WANDB_ENTITY and WANDB_RUN_GROUP (project: else
    "cifar-dist"). Its files go under WANDB_DIR when that is set, else into the run dir.

    Resume: the wandb run id is the run id, so every restart and requeue continues one wandb run.
    A step is sent (committed) only once complete: when its evaluation (a step's last record) or a
    later step's record arrives, or at the end. So a process stopped for requeue never sends half a
    step (an epoch's last training record without the evaluation that the resumed process adds, which
    wandb would then drop as a step it already has), and the previous records tell which steps wandb
    has: all before the last record's step, and that one too when the last record is an evaluation.
    """

    def __init__(self, info: RunInfo, settings: TrackingSettings, previous: list[dict[str, Any]], kept: int):
        import wandb

        self.wandb, self.classes, self.test_images, self.batch_size = wandb, info.classes, info.test_images, info.batch_size
        mode, why_offline = _wandb_mode()
        if why_offline:
            print(f"wandb: {why_offline}; logging offline (the path and 'wandb sync' command come at the end)", flush=True)
        t = settings
        project = t.project or (None if os.environ.get("WANDB_PROJECT") else WANDB_PROJECT)
        init_args = dict(
            project=project, entity=t.entity or None, name=info.name, group=t.group or None,
            job_type=t.job_type, tags=t.tags or None, config=info.config, id=info.run.run_id, resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(info.run.path),
            settings=wandb.Settings(init_timeout=30, silent=True),
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
            # Per class in one table too: a hundred classes are easier to sort and search there than as keys.
            correct, images = result.confusion.diag().tolist(), result.confusion.sum(1).tolist()
            data["test/per_class"] = wandb.Table(columns=["class", "accuracy", "correct", "images"], data=[
                [c, acc, n, total] for c, acc, n, total in zip(classes, result.per_class, correct, images)])
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

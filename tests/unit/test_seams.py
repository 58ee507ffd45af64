"""The extension points, each tested through its seam: a data source, a model and a tracker are
one registered implementation each, and `train(cfg)` finds them by the config's name alone; the
run directory has one owner (its reader and writer). Through the commands (TensorBoard, the run
lock, a failed start): tests/e2e/test_seams.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifar_dist import models, sources, trackers
from cifar_dist.config import ConfigError, load_config
from cifar_dist.data import load_dataset
from cifar_dist.rundir import METRICS, MetricsFile, write_atomic
from cifar_dist.rundir import read_jsonl as tolerant_read
from cifar_dist.train import train
from tests.helpers import read_jsonl


@pytest.fixture
def registered():
    """Registries restored after a test adds to them."""
    saved = dict(models.MODELS), dict(sources.SOURCES), dict(trackers.TRACKERS)
    yield
    for registry, before in zip((models.MODELS, sources.SOURCES, trackers.TRACKERS), saved):
        registry.clear()
        registry.update(before)


def test_unregistered_names_are_refused_with_the_registered_ones_listed():
    for key, registry in (("model.name", models.MODELS), ("data.source", sources.SOURCES),
                          ("tracking.backend", trackers.TRACKERS)):
        with pytest.raises(ConfigError) as e:
            load_config("debug", [f"{key}=nothing-of-that-name"])
        assert str(e.value).startswith(key) and all(name in str(e.value) for name in registry)


def test_a_new_source_model_and_tracker_train_through_the_seams(registered, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_DIST_CACHE", str(cache_dir))
    stripes = torch.arange(32).view(1, 32, 1, 1).expand(-1, -1, 32, 3)  # class c: c-th stripe pattern, per image shifted

    @sources.register("stripes", identity=lambda o: [o.synthetic_train], needs_path=False)
    def _stripes(o) -> sources.Dataset:
        def split(n: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % 2
            x = ((stripes + shift + torch.arange(n).view(-1, 1, 1, 1)) % (4 + 4 * y.view(-1, 1, 1, 1)) < 2) * 255
            return x.to(torch.uint8).contiguous(), y
        return sources.Dataset(*split(o.synthetic_train, 0), *split(200, 1), ["narrow", "wide"])

    @models.register("tiny")
    class Tiny(nn.Module):
        def __init__(self, num_classes: int):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, num_classes)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    seen = []

    @trackers.register("memory")
    class Memory(trackers.Tracker):
        def log(self, record, result=None):
            seen.append((record, result))

        def finish(self, summary):
            seen.append(("finish", summary))

    cfg = load_config(None, ["data.source=stripes", "data.synthetic_train=512", "model.name=tiny", "tracking.backend=memory",
                             "train.epochs=2", "train.batch_size=64", "train.lr=0.05", "train.warmup_epochs=0.5",
                             f"run.dir={tmp_path / 'run'}", "run.progress=none"])
    summary = train(cfg)
    assert load_dataset(cfg.data).classes == ["narrow", "wide"]
    assert summary["model"] == "tiny" and list(summary["per_class_accuracy"]) == ["narrow", "wide"]
    # The tracker got every record metrics.jsonl holds, the evaluations with their results, then the summary.
    records = read_jsonl(tmp_path / "run" / METRICS)
    assert [r for r, _ in seen[:-1]] == records
    assert all((res is not None) == ("test_accuracy" in r) for r, res in seen[:-1])
    assert seen[-1] == ("finish", summary)


# ---------------------------------------------------------------------------- the run directory's owner


def test_the_metrics_reader_stops_at_a_torn_line_and_the_writer_keeps_whole_records(tmp_path):
    path = tmp_path / METRICS
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "train_lo')  # killed in mid-write
    assert tolerant_read(path) == [{"step": 1}, {"step": 2}]
    log = MetricsFile(path, keep=1)  # a resume from the checkpoint of step 1
    assert log.previous == [{"step": 1}, {"step": 2}] and log.lines == 1
    log.append({"step": 2, "again": True})
    log.close()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2, "again": True}]


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    write_atomic(tmp_path / "a.json", "one")
    write_atomic(tmp_path / "a.json", b"two")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"] and (tmp_path / "a.json").read_text() == "two"

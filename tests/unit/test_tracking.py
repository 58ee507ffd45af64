"""wandb tracking in-process: the reachability check is quick and reads the key where wandb does, and a
resumed sink sends wandb exactly the steps it lacks, checked against what wandb itself wrote (its `.wandb`
log read back with tests/helpers/wandb_records.py). Training runs with wandb: tests/e2e/test_tracking.py."""


from __future__ import annotations

import json
import socket
import time

import pytest
import torch
import wandb

from cifar_dist.config import load_config
from cifar_dist.metrics import EvalResult
from cifar_dist.rundir import METRICS, RunDir
from cifar_dist.trackers import WANDB_CHECK_S, MetricsAndTracker, RunInfo, _wandb_unreachable
from tests.helpers import read_jsonl
from tests.helpers.data import CIFAR10_CLASSES
from tests.helpers.wandb_records import history, wandb_files


def test_the_reachability_check_is_quick_and_reads_the_key_where_wandb_does(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert _wandb_unreachable().startswith("no API key")

    # `wandb login` writes the key to the netrc file under the server's host:port.
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1:{port}\n  login user\n  password {'k' * 40}\n")
    assert _wandb_unreachable() is None

    listening.close()
    start = time.monotonic()
    problem = _wandb_unreachable()
    assert problem.startswith(f"cannot reach http://127.0.0.1:{port}")
    assert time.monotonic() - start <= WANDB_CHECK_S + 0.5


@pytest.fixture
def wandb_here(monkeypatch):
    """wandb offline inside the test process, its service stopped afterwards even when the test fails."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    wandb.teardown()


def train_line(step: int) -> dict:
    return {"step": step, "epoch": step / 10, "time": step / 100, "train_loss": 2.0 - step / 100, "lr": 0.05}


@pytest.mark.parametrize(("written", "keep", "resent"), [
    # Stopped by a signal after step 6: step 3 went to wandb, step 6 was held back and is sent now, from metrics.jsonl.
    ([train_line(3), train_line(6)], 2, [6, 9, 10]),
    # Killed while writing the record of step 9, checkpoint at step 6: wandb has 3 and 6; 9 and 10 are redone and sent.
    ([train_line(3), train_line(6), train_line(9), '{"step": 1'], 2, [9, 10]),
])
def test_a_resumed_sink_sends_wandb_exactly_the_steps_it_lacks(written, keep, resent, wandb_here, tmp_path):
    (tmp_path / METRICS).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in written))
    cfg = load_config(None, ["tracking.backend=wandb", "train.batch_size=64"])
    info = RunInfo(RunDir(tmp_path, "unit"), "unit", cfg.to_dict(), CIFAR10_CLASSES,
                   torch.zeros(300, 32, 32, 3, dtype=torch.uint8), 64)
    records = MetricsAndTracker(info, cfg.tracking, keep)
    for step in (9, 10):
        records.log(train_line(step))
    result = EvalResult(torch.eye(10, dtype=torch.int64) * 30, 0.5, [(0, 0, 0)])
    records.log({"step": 10, "epoch": 1, "time": 0.2, "test_loss": 0.5, "test_accuracy": 1.0,
                 "per_class_accuracy": dict.fromkeys(CIFAR10_CLASSES, 1.0)}, result)
    records.finish({"test_accuracy": 1.0, "best_test_accuracy": 1.0, "train_seconds": 0.2, "images_per_second": 1.0,
                    "world_size": 1})

    # metrics.jsonl: the kept records, then the new ones; the torn line is gone.
    assert read_jsonl(tmp_path / METRICS)[:-1] == [*written[:keep], train_line(9), train_line(10)]
    (log,) = wandb_files(tmp_path)
    rows = history(log)
    assert [row["_step"] for row in rows] == resent
    assert rows[0]["train/loss"] == train_line(resent[0])["train_loss"]
    assert "test/accuracy" in rows[-1] and "train/loss" in rows[-1]  # step 10's two records, one row

"""wandb tracking, checked against what wandb itself wrote: real wandb in offline mode, its `.wandb`
log read back with tests/wandb_records.py, compared with the run's own metrics.jsonl."""

from __future__ import annotations

import glob
import http.server
import json
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from conftest import PY, ROOT, TINY, read_jsonl, run, train_cmd
from wandb_records import history, read_records, run_records, summary

from cifar_dist.config import load_config
from cifar_dist.distributed import EXIT_REQUEUE
from cifar_dist.metrics import EvalResult
from cifar_dist.rundir import CONFIG, METRICS, RunDir
from cifar_dist.trackers import WANDB_CHECK_S, MetricsAndTracker, RunInfo, _wandb_unreachable

# 10 steps per epoch of 64 images, 2 epochs; a training record every 3 steps and at each epoch's end.
ARGS = [*TINY, "data.synthetic_train=640", "train.log_every=3", "tracking.backend=wandb", "tracking.log_images=4"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def wandb_files(root: Path) -> list[Path]:
    """The offline wandb logs under `root` (WANDB_DIR when set: the `env` fixture's tmp_path; else the
    run dir), one per process that ran the run, in the order they started."""
    files = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    return sorted(files, key=lambda f: [(r.start_time.seconds, r.start_time.nanos) for r in run_records(f)])


def expected_rows(records: list[dict]) -> dict[int, dict]:
    """What wandb should hold at each step, built from metrics.jsonl (the records of one step merge)."""
    rows: dict[int, dict] = {}
    for r in records:
        row = rows.setdefault(r["step"], {})
        if "train_loss" in r:
            row.update({"train/loss": r["train_loss"], "train/lr": r["lr"], "epoch": r["epoch"]})
        else:
            row.update({"test/loss": r["test_loss"], "test/accuracy": r["test_accuracy"], "epoch": r["epoch"]})
            row.update({f"test/acc/{c}": v for c, v in r["per_class_accuracy"].items()})
    return rows


def assert_rows_match(rows: list[dict], records: list[dict]) -> None:
    expected = expected_rows(records)
    assert [row["_step"] for row in rows] == sorted(expected), "wandb's steps differ from metrics.jsonl's"
    for row in rows:
        want = expected[row["_step"]]
        assert {k: row.get(k) for k in want} == want, f"step {row['_step']}"
        if "train/loss" in want:
            assert row["train/images_per_second"] > 0


def test_offline_wandb_holds_what_metrics_jsonl_holds(env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(*ARGS, f"run.dir={run_dir}", "tracking.group=sweep-7", "tracking.tags=tiny,ci",
                         "tracking.job_type=smoke", "run.name=tiny-wandb"), env)
    (log,) = wandb_files(tmp_path)
    records = read_jsonl(run_dir / METRICS)
    final = RunDir(run_dir).summary()
    config = yaml.safe_load((run_dir / CONFIG).read_text())

    # The run: our run id, the sweep's group, and the resolved config.
    (info,) = run_records(log)
    assert info.run_id == config["run"]["id"] == final["run_id"]
    assert (info.run_group, info.job_type, list(info.tags), info.display_name) == ("sweep-7", "smoke", ["tiny", "ci"],
                                                                                  "tiny-wandb")
    logged_config = {item.key: json.loads(item.value_json) for item in info.config.update}
    assert logged_config["train"] == config["train"] and logged_config["data"] == config["data"]

    # Every record at its own step, per-class accuracies as ten separate keys, values exactly as in metrics.jsonl.
    rows = history(log)
    assert_rows_match(rows, records)
    evals = [row for row in rows if "test/accuracy" in row]
    assert [row["_step"] for row in evals] == [10, 20]
    assert all({f"test/acc/{c}" for c in CLASSES} <= row.keys() for row in evals)

    # At each evaluation: the confusion counts (the last equal summary.json's) and four labelled test images.
    files = log.parent / "files"
    for row in evals:
        table = json.loads((files / row["test/confusion_matrix_table/path"]).read_text())
        assert table["columns"] == ["Actual", "Predicted", "nPredictions"] and len(table["data"]) == 100
        assert row["test/examples/count"] == 4
        assert all(caption.split()[1] in CLASSES and caption.split()[4] in CLASSES
                   for caption in row["test/examples/captions"])
        assert all((files / name).is_file() for name in row["test/examples/filenames"])
    counts = [[0] * 10 for _ in range(10)]
    for actual, predicted, n in table["data"]:
        counts[CLASSES.index(actual)][CLASSES.index(predicted)] = n
    assert counts == final["confusion_matrix"]

    stored = summary(log)
    assert (stored["final_accuracy"], stored["best_accuracy"]) == (final["test_accuracy"], final["best_test_accuracy"])
    # WANDB_MODE=offline was asked for: no line about going offline, and at the end where the run is and how to upload it.
    assert "logging offline" not in proc.stdout + proc.stderr
    assert f"wandb: offline run saved in {log.parent}; upload it with: wandb sync" in proc.stdout

    # The reader checks every chunk: one that skipped damaged data could let the checks above pass on a broken log.
    data = bytearray(log.read_bytes())
    data[200] ^= 0xFF
    log.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="bad checksum"):
        list(read_records(log))


def last_step(run_dir: Path) -> int:
    f = run_dir / METRICS
    lines = f.read_text().splitlines() if f.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def stop_with_sigterm(cmd: list[str], env: dict[str, str], run_dir: Path) -> subprocess.CompletedProcess:
    """SIGTERM from outside once training passes a random step of the 20, as Slurm would send it."""
    target = random.Random().randint(3, 14)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while last_step(run_dir) < target:
        assert proc.poll() is None and time.monotonic() < deadline, f"no step {target} before the end or the deadline"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("stop", ["epoch_boundary", "sigterm"])
def test_a_resumed_run_continues_one_wandb_run_and_never_relogs_a_step(stop, env, tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"run.dir={run_dir}", "checkpoint.every_steps=4"]
    if stop == "epoch_boundary":
        # Stopped during epoch 0's last step: its training record is written, its evaluation comes after the
        # resume. wandb must get both in one step, once (a second log of step 10 would be dropped online).
        first = run([PY, "tests/run_with_faults.py", *args], dict(env, CIFAR_DIST_FAULT="signal:0:9"), check=False)
    else:
        first = stop_with_sigterm(train_cmd(*args), env, run_dir)
    assert first.returncode == EXIT_REQUEUE, first.stderr
    stopped_at = last_step(run_dir)
    second = run(train_cmd(*args), env)
    assert "resumed from" in second.stdout

    logs = wandb_files(tmp_path)
    assert len(logs) == 2
    run_id = yaml.safe_load((run_dir / CONFIG).read_text())["run"]["id"]
    assert [[r.run_id for r in run_records(f)] for f in logs] == [[run_id], [run_id]]
    parts = [history(f) for f in logs]
    steps = [row["_step"] for rows in parts for row in rows]
    assert steps == sorted(set(steps)), f"steps not strictly increasing across the two logs: {steps}"
    assert parts[1] and parts[1][0]["_step"] >= stopped_at  # the second process took over where the first stopped
    # Nothing lost, nothing changed: together the two logs hold every record of metrics.jsonl.
    assert_rows_match(parts[0] + parts[1], read_jsonl(run_dir / METRICS))
    if stop == "epoch_boundary":
        assert stopped_at == 10 and "test/accuracy" in parts[1][0] and "train/loss" in parts[1][0]
    # The printed upload command names both parts of the run.
    command = next(line for line in second.stdout.splitlines() if "wandb sync" in line).split("wandb sync ")[1]
    assert sorted(glob.glob(command)) == sorted(str(f.parent) for f in logs)


class NotWandb(http.server.BaseHTTPRequestHandler):
    """A server that answers, but is not wandb (a proxy, a wrong WANDB_BASE_URL)."""

    def do_GET(self) -> None:
        self.send_error(404)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def not_wandb():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotWandb)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("case", ["no_key", "server_is_not_wandb"])
def test_without_key_or_server_training_goes_offline_with_one_line(case, env, tmp_path, not_wandb):
    home = tmp_path / "home"  # no ~/.netrc, no wandb settings
    home.mkdir()
    env = {k: v for k, v in env.items() if k not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT", "NETRC")}
    env["HOME"] = str(home)
    if case == "no_key":
        env["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    else:  # a key and a server that answers, so wandb tries online and fails
        env.update(WANDB_API_KEY="x" * 40, WANDB_BASE_URL=not_wandb)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = run(train_cmd(*ARGS, f"run.dir={run_dir}"), env)
    took = time.monotonic() - start

    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "wandb" in line.lower()]
    assert len(said) == 2, said  # the reason it is offline, then where the run is and how to upload it
    reason = "no API key" if case == "no_key" else "cannot start online (CommError"
    assert said[0].startswith("wandb: ") and reason in said[0] and "logging offline" in said[0]
    assert said[1].startswith("wandb: offline run saved in")
    assert RunDir(run_dir).summary()["steps"] == 20
    (log,) = wandb_files(tmp_path)
    assert [row["_step"] for row in history(log)] == [3, 6, 9, 10, 12, 15, 18, 20]
    # The online attempt costs seconds, not wandb's init timeout (30 s).
    assert took < 60, f"training took {took:.0f} s"


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
    info = RunInfo(RunDir(tmp_path, "unit"), "unit", cfg.to_dict(), CLASSES, torch.zeros(300, 32, 32, 3, dtype=torch.uint8), 64)
    records = MetricsAndTracker(info, cfg.tracking, keep)
    for step in (9, 10):
        records.log(train_line(step))
    result = EvalResult(torch.eye(10, dtype=torch.int64) * 30, 0.5, [(0, 0, 0)])
    records.log({"step": 10, "epoch": 1, "time": 0.2, "test_loss": 0.5, "test_accuracy": 1.0,
                 "per_class_accuracy": dict.fromkeys(CLASSES, 1.0)}, result)
    records.finish({"test_accuracy": 1.0, "best_test_accuracy": 1.0, "train_seconds": 0.2, "images_per_second": 1.0,
                    "world_size": 1})

    # metrics.jsonl: the kept records, then the new ones; the torn line is gone.
    assert read_jsonl(tmp_path / METRICS)[:-1] == [*written[:keep], train_line(9), train_line(10)]
    (log,) = wandb_files(tmp_path)
    rows = history(log)
    assert [row["_step"] for row in rows] == resent
    assert rows[0]["train/loss"] == train_line(resent[0])["train_loss"]
    assert "test/accuracy" in rows[-1] and "train/loss" in rows[-1]  # step 10's two records, one row

"""wandb tracking in training runs, checked against what wandb itself wrote: real wandb in offline mode,
its `.wandb` log read back with tests/helpers/wandb_records.py, compared with the run's own
metrics.jsonl. The reachability check and a resumed sink in-process: tests/unit/test_tracking.py."""


from __future__ import annotations

import glob
import http.server
import json
import random
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from cifar_dist.distributed import EXIT_REQUEUE
from cifar_dist.rundir import CONFIG, METRICS, RunDir
from tests.helpers import FAULTS, ROOT, TINY, last_step, read_jsonl, run, train_cmd, wait_for
from tests.helpers.wandb_records import history, read_records, run_records, summary, wandb_files

# 10 steps per epoch of 64 images, 2 epochs; a training record every 3 steps and at each epoch's end.
ARGS = [*TINY, "data.synthetic_train=640", "train.log_every=3", "tracking.backend=wandb", "tracking.log_images=4"]


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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


def stop_with_sigterm(cmd: list[str], env: dict[str, str], run_dir: Path) -> subprocess.CompletedProcess:
    """SIGTERM from outside once training passes a random step of the 20, as Slurm would send it."""
    target = random.Random().randint(3, 14)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(run_dir) >= target, proc)
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
        first = run([*FAULTS, *args], dict(env, CIFAR_DIST_FAULT="signal:0:9"), check=False)
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
    proc = run(train_cmd(*ARGS, f"run.dir={run_dir}"), env)

    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "wandb" in line.lower()]
    assert len(said) == 2, said  # the reason it is offline, then where the run is and how to upload it
    reason = "no API key" if case == "no_key" else "cannot start online (CommError"
    assert said[0].startswith("wandb: ") and reason in said[0] and "logging offline" in said[0]
    assert said[1].startswith("wandb: offline run saved in")
    assert RunDir(run_dir).summary()["steps"] == 20
    (log,) = wandb_files(tmp_path)
    assert [row["_step"] for row in history(log)] == [3, 6, 9, 10, 12, 15, 18, 20]

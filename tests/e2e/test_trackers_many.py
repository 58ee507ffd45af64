"""Several trackers in one run, and the ecosystem's own settings: wandb and TensorBoard both get
every record; wandb takes WANDB_DIR, WANDB_PROJECT and WANDB_RUN_GROUP from the environment where
the config leaves them empty, and the config's where it sets them; TensorBoard's HParams tab gets
the flattened config and the final metrics, read back here with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cifar_dist.rundir import CONFIG, METRICS, RunDir
from tests.helpers import TINY, read_jsonl, run, train_cmd
from tests.helpers.wandb_records import history, run_records


def test_wandb_and_tensorboard_at_once_with_wandbs_environment_and_tensorboards_hparams(env, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb-files"
    wandb_dir.mkdir()
    env.update(WANDB_DIR=str(wandb_dir), WANDB_PROJECT="from-env", WANDB_RUN_GROUP="group-from-env")
    run(train_cmd(*TINY, "data.synthetic_train=640", "train.log_every=3", "tracking.backend=wandb,tensorboard",
                  "tracking.group=group-from-config", "train.clip_grad_norm=5", f"run.dir={run_dir}"), env)
    records, summary = read_jsonl(run_dir / METRICS), RunDir(run_dir).summary()
    config = yaml.safe_load((run_dir / CONFIG).read_text())

    # wandb: its files under WANDB_DIR (none in the run dir); the project from the environment, the
    # group from the config (set there, it wins); every record.
    assert not (run_dir / "wandb").exists()
    (log,) = [Path(p) for p in wandb_dir.glob("wandb/offline-run-*/run-*.wandb")]
    (info,) = run_records(log)
    assert (info.project, info.run_group, info.run_id) == ("from-env", "group-from-config", summary["run_id"])
    rows = history(log)
    assert [r["_step"] for r in rows] == sorted({r["step"] for r in records})
    assert [r["train/grad_norm"] for r in rows if "train/grad_norm" in r] == \
        [r["grad_norm"] for r in records if "grad_norm" in r]

    # TensorBoard: the same records, and the HParams session: the flattened config and the final metrics.
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    train_records = [r for r in records if "train_loss" in r]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["train_loss"])) for r in train_records]
    assert [e.value for e in events.Scalars("train/grad_norm")] == [pytest.approx(r["grad_norm"]) for r in train_records]
    content = events.PluginTagToContent("hparams")
    parsed = {tag: plugin_data_pb2.HParamsPluginData.FromString(blob) for tag, blob in content.items()}
    start = next(p.session_start_info for p in parsed.values() if p.HasField("session_start_info"))
    experiment = next(p.experiment for p in parsed.values() if p.HasField("experiment"))
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert hparams["train.lr"] == config["train"]["lr"] == 0.05
    assert hparams["model.name"] == "blitz" and hparams["train.nesterov"] == "true"
    assert hparams["tracking.backend"] == "wandb,tensorboard" and hparams["run.id"] == summary["run_id"]
    assert hparams["train.betas"] == "0.9,0.999"
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert metrics == {"final/test_accuracy", "final/best_test_accuracy", "final/test_loss", "final/train_seconds"}
    for name in ("test_accuracy", "best_test_accuracy", "test_loss"):
        (final,) = events.Scalars(f"final/{name}")
        assert (final.step, final.value) == (summary["steps"], pytest.approx(summary[name]))


def test_wandb_reads_its_project_where_the_config_leaves_it_empty_and_the_config_wins_where_set(env, tmp_path):
    env.update(WANDB_PROJECT="from-env", WANDB_RUN_GROUP="group-from-env")
    projects = {}
    for name, extra in (("env", []), ("config", ["tracking.project=from-config"])):
        run_dir = tmp_path / name
        run(train_cmd(*TINY, "train.epochs=1", "data.synthetic_train=320", "tracking.backend=wandb", *extra,
                      f"run.dir={run_dir}"), env)
        (log,) = [p for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
                  if run_records(p)[0].run_id == RunDir(run_dir).summary()["run_id"]]
        (info,) = run_records(log)
        projects[name] = (info.project, info.run_group)
    assert projects == {"env": ("from-env", "group-from-env"), "config": ("from-config", "group-from-env")}

"""Runs that start from other runs, and runs that end early, end to end through the real command:
fine-tuning (`train.init_from`: a 10-class model onto a 5-class image folder, the head replaced,
the rest loaded), `--resume-from` (a new run from another run's checkpoint ends where an unbroken
run ends, bit for bit), evaluate and predict given a checkpoint folder, an EMA run stopped by
SIGTERM and resumed bit-exactly, and an early stop (why, the best checkpoint kept, not redone)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess

import pytest
import torch
import yaml
from PIL import Image

from cifar_dist import checkpoint
from cifar_dist.config import load_config
from cifar_dist.distributed import EXIT_REQUEUE
from cifar_dist.finetune import last_linear, load_init, read_init
from cifar_dist.models import build_model
from cifar_dist.predict import load_model
from cifar_dist.rundir import CHECKPOINTS, CONFIG, METRICS, MODEL, RunDir, load_weights, save_model
from tests.helpers import FAULTS, PY, ROOT, TINY, assert_same_run, last_step, read_jsonl, run, train_cmd, wait_for
from tests.helpers.data import write_image_tree

# The medium net has dropout: an exact resume must restore every RNG state, not just weights.
CONFIG_ARGS = [*TINY, "model.name=medium", "train.log_every=3", "checkpoint.every_steps=7", "seed=5"]
FIVE = ["bird", "cat", "deer", "dog", "frog"]


@pytest.fixture(scope="module")
def module_env(cache_dir):
    return dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir), OMP_NUM_THREADS="1", WANDB_MODE="offline")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, module_env):
    """A whole run of CONFIG_ARGS: 10 classes, 2 epochs of 20 steps."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(train_cmd(*CONFIG_ARGS, f"run.dir={run_dir}"), module_env)
    return run_dir


# ---------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def five_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    write_image_tree(root, FIVE, {"train": 40, "test": 10})
    return root


def test_a_10_class_model_fine_tunes_onto_5_classes_with_the_head_replaced(reference, five_classes, module_env, tmp_path):
    """Everything but the head is the source's, bit for bit; the head is the fresh net's; the source
    file and its sha256 are in config.yaml and summary.json."""
    args = ["model.name=medium", "data.source=imagefolder", f"data.path={five_classes}", "train.epochs=1",
            "train.batch_size=40", "seed=3"]
    cfg = load_config(None, [*args, f"train.init_from={reference}"])
    init = read_init(cfg)
    digest = hashlib.sha256((reference / MODEL).read_bytes()).hexdigest()
    assert (init.file, init.sha256, cfg.train.init_sha256) == (reference / MODEL, digest, digest)
    net, fresh = build_model("medium", 5), build_model("medium", 5)
    fresh.load_state_dict(net.state_dict())
    line, replaced = load_init(net, init, "medium", FIVE)
    assert replaced and last_linear(net) == "fc4" and "head fc4 replaced (10 classes -> 5)" in line
    source = load_weights(reference / MODEL)["state_dict"]
    for name, value in net.state_dict().items():
        if name.startswith("fc4."):
            assert value.shape[0] == 5 and torch.equal(value, fresh.state_dict()[name]), name
        else:
            assert torch.equal(value, source[name]), name

    run_dir = tmp_path / "tuned"
    proc = run(train_cmd(*args, f"train.init_from={reference}", f"run.dir={run_dir}"), module_env)
    assert "head fc4 replaced (10 classes -> 5)" in proc.stdout
    saved = yaml.safe_load((run_dir / CONFIG).read_text())["train"]
    assert (saved["init_from"], saved["init_sha256"]) == (str(reference), digest)
    summary = RunDir(run_dir).summary()
    assert summary["init_from"] == {"path": str(reference), "file": str(reference / MODEL), "sha256": digest,
                                    "weights": "trained", "model": "medium", "classes": 10, "head": "replaced"}
    assert list(summary["per_class_accuracy"]) == FIVE

    # The same command resumes; a source file that changed under the run is refused.
    run(train_cmd(*args, f"train.init_from={reference}", f"run.dir={run_dir}"), module_env)
    changed = tmp_path / "changed.pt"
    blob = load_weights(reference / MODEL)
    save_model(changed, "medium", blob["classes"], {k: v + 1 for k, v in blob["state_dict"].items()}, blob["mean"],
               blob["std"])
    proc = run(train_cmd(*args, f"train.init_from={changed}", f"train.init_sha256={digest}",
                         f"run.dir={tmp_path / 'other'}"), module_env, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: train.init_from: {changed} has sha256")


def test_weights_that_do_not_fit_are_one_line_listing_every_mismatch(reference, module_env, tmp_path):
    blob = load_weights(reference / MODEL)
    state = dict(blob["state_dict"])
    state["conv9.weight"] = state.pop("conv2.weight")
    state["fc1.weight"] = torch.zeros(7, 7)
    bad = tmp_path / "bad.pt"
    save_model(bad, "medium", blob["classes"], state, blob["mean"], blob["std"])
    run_dir = tmp_path / "run"
    proc = run(train_cmd(*CONFIG_ARGS, f"train.init_from={bad}", f"run.dir={run_dir}"), module_env, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr == (f"error: train.init_from: {bad} does not fit the medium net: conv2.weight missing; "
                           "conv9.weight unexpected; fc1.weight [7, 7] vs [128, 512]\n")
    assert not run_dir.exists()
    proc = run(train_cmd(*CONFIG_ARGS, "model.name=blitz", f"train.init_from={reference}", f"run.dir={run_dir}"),
               module_env, check=False)
    assert proc.stderr == f"error: train.init_from: {reference / MODEL} holds a medium net, not model.name=blitz\n"
    proc = run(train_cmd(*CONFIG_ARGS, f"train.init_from={tmp_path / 'gone.pt'}", f"run.dir={run_dir}"), module_env,
               check=False)
    assert proc.stderr == f"error: train.init_from: {tmp_path / 'gone.pt'}: no such checkpoint or run directory\n"
    assert not run_dir.exists()


# ---------------------------------------------------------------------------- --resume-from; a checkpoint folder anywhere


def test_resume_from_another_runs_checkpoint_ends_where_an_unbroken_run_ends(reference, module_env, tmp_path):
    stopped = tmp_path / "stopped"
    proc = run(FAULTS + CONFIG_ARGS + [f"run.dir={stopped}"], dict(module_env, CIFAR_DIST_FAULT="signal:1:5"),
               check=False)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr
    chosen = checkpoint.list_checkpoints(stopped)[-1]
    assert chosen.step == 26
    before = sorted(p.name for p in stopped.rglob("*"))

    new = tmp_path / "new"
    # No --config: the checkpoint's own config (run.* aside), the overrides on top.
    proc = run(train_cmd("--resume-from", str(chosen.path), f"run.dir={new}", "run.progress=lines"), module_env)
    assert f"started from {chosen.path} of run" in proc.stdout
    same = load_weights(reference / MODEL)["state_dict"]
    got = load_weights(new / MODEL)["state_dict"]
    assert all(torch.equal(same[k], got[k]) for k in same), "final weights differ"
    ref_summary, new_summary = RunDir(reference).summary(), RunDir(new).summary()
    assert new_summary["test_accuracy"] == ref_summary["test_accuracy"]
    assert new_summary["confusion_matrix"] == ref_summary["confusion_matrix"]
    old_id = yaml.safe_load((stopped / CONFIG).read_text())["run"]["id"]
    assert new_summary["run_id"] != old_id
    assert new_summary["resumed_from"] == {"checkpoint": str(chosen.path), "run_id": old_id, "step": 26,
                                           "sha256": chosen.marker["sha256"]}
    # The new run's records are the unbroken run's from the checkpoint on; the source run is untouched.
    after = [r for r in read_jsonl(reference / METRICS) if r["step"] > 26]
    assert [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(new / METRICS)] == \
        [{k: v for k, v in r.items() if k != "time"} for r in after]
    assert sorted(p.name for p in stopped.rglob("*")) == before

    # A run dir as --resume-from is its newest checkpoint; a result-changing key is refused, naming it.
    proc = run(train_cmd("--resume-from", str(stopped), "train.lr=0.2", f"run.dir={tmp_path / 'x'}"), module_env,
               check=False)
    assert proc.returncode == 2
    assert proc.stderr == (f"error: checkpoint {chosen.path} was written by a different config (train.lr: 0.05 -> 0.2); "
                           "use checkpoint.allow_config_change=true\n")
    assert not (tmp_path / "x").exists()
    proc = run(train_cmd("--resume-from", str(tmp_path / "nothing")), module_env, check=False)
    assert proc.stderr == f"error: {tmp_path / 'nothing'}: no such checkpoint or run directory\n"


def test_evaluate_and_predict_take_a_checkpoint_folder(reference, module_env, tmp_path):
    folder = checkpoint.list_checkpoints(reference)[-1].path
    out = tmp_path / "eval.json"
    run([PY, "-m", "cifar_dist.cli", "evaluate", str(folder), "--json", str(out)], module_env)
    summary = RunDir(reference).summary()
    assert json.loads(out.read_text())["confusion_matrix"] == summary["confusion_matrix"]  # the final step's weights
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    by_folder = run([PY, "-m", "cifar_dist.cli", "predict", "--checkpoint", str(folder), str(tmp_path / "red.png")],
                    module_env)
    by_model = run([PY, "-m", "cifar_dist.cli", "predict", "--checkpoint", str(reference), str(tmp_path / "red.png")],
                   module_env)
    assert by_folder.stdout == by_model.stdout and "%" in by_folder.stdout


# ---------------------------------------------------------------------------- EMA: bit-exact resume


def test_an_ema_run_stopped_by_sigterm_resumes_bit_exactly(reference, module_env, tmp_path):
    """The average is in every checkpoint: a run stopped by a real SIGTERM at a random step resumes to
    the very weights and records of a run never stopped, and model.pt holds (and names) the average."""
    args = [*CONFIG_ARGS, "train.ema.decay=0.9", "train.ema.start_step=4", "eval.ema=true"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run(train_cmd(*args, f"run.dir={whole}"), module_env)
    cmd = train_cmd(*args, f"run.dir={stopped}")
    target = random.Random().randint(5, 30)
    proc = subprocess.Popen(cmd, env=module_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(stopped) >= target, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    stopped_at = checkpoint.list_checkpoints(stopped)[-1]
    assert stopped_at.step >= target
    assert checkpoint.load_state(stopped_at.path / checkpoint.STATE)["ema"]["n_averaged"] > 0
    run(cmd, module_env)
    assert_same_run(whole, stopped)
    model = load_weights(whole / MODEL)
    assert model["weights"] == "ema (decay 0.9, from step 4)"
    trained = checkpoint.load_state(checkpoint.list_checkpoints(whole)[-1].path / checkpoint.STATE)["model"]
    assert not torch.equal(model["state_dict"]["fc4.weight"], trained["fc4.weight"]), "model.pt holds the trained weights"
    # predict given the last checkpoint folder classifies with the weights evaluated: model.pt's.
    net = load_model(checkpoint.list_checkpoints(whole)[-1].path).net.state_dict()
    assert all(torch.equal(net[k], v) for k, v in model["state_dict"].items())
    # The average of the weights is not the plain run's: eval.ema evaluated something else.
    assert RunDir(whole).summary()["test_loss"] != RunDir(reference).summary()["test_loss"]


# ---------------------------------------------------------------------------- early stop


def test_an_early_stop_says_why_keeps_the_best_and_is_not_redone(module_env, tmp_path):
    """min_delta 1.0 of accuracy: no evaluation can improve on the first, so with patience 2 the
    run stops after its third of six epochs."""
    run_dir = tmp_path / "run"
    args = [*TINY, "train.epochs=6", "train.early_stop.metric=test_accuracy", "train.early_stop.patience=2",
            "train.early_stop.min_delta=1.0", f"run.dir={run_dir}"]
    proc = run(train_cmd(*args), module_env)
    summary = RunDir(run_dir).summary()
    evals = [r for r in read_jsonl(run_dir / METRICS) if "test_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40, 60] and summary["steps"] == 60
    stop = summary["early_stop"]
    assert (stop["step"], stop["epoch"], stop["metric"], stop["best"], stop["best_step"]) == \
        (60, 3, "test_accuracy", evals[0]["test_accuracy"], 20)
    assert stop["reason"] == (f"test_accuracy did not improve on {evals[0]['test_accuracy']:.4f} (step 20) by more than "
                              "1 in 2 evaluations")
    assert f"early stop at step 60 (epoch 3): {stop['reason']}" in proc.stdout
    best_step = max(evals, key=lambda r: (r["test_accuracy"], r["step"]))["step"]
    assert stop["best_checkpoint"] == f"{CHECKPOINTS}/step_{best_step:08d}"
    assert (run_dir / stop["best_checkpoint"] / checkpoint.MARKER).is_file()
    records = read_jsonl(run_dir / METRICS)
    again = run(train_cmd(*args), module_env)
    assert f"already finished at step 60 (stopped early: {stop['reason']})" in again.stdout
    assert read_jsonl(run_dir / METRICS) == records and RunDir(run_dir).summary() == summary

"""`cifar-dist predict`: top-k per image, bad files reported per file, checkpoints never run code,
damaged or mismatched weights refused in one line, inputs normalised as in training."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_dist.config import load_config
from cifar_dist.data import load_dataset
from cifar_dist.predict import load_classifier
from cifar_dist.rundir import CHECKPOINTS, MODEL, load_weights, save_model
from cifar_dist.sources import CIFAR10_STATS
from tests.helpers import PY, TINY, run, train_cmd


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    import os

    env = dict(os.environ, CIFAR_DIST_CACHE=str(cache_dir))
    run_dir = tmp_path_factory.mktemp("runs") / "p"
    run(train_cmd(*TINY, "train.epochs=1", f"run.dir={run_dir}", "checkpoint.every_steps=10"), env)
    return run_dir


def predict(env, *args):
    return run([PY, "-m", "cifar_dist.cli", "predict", *args], env, check=False)


def test_predict_good_and_bad_files(trained, env, tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("L", (100, 60), 90).save(tmp_path / "big_gray.jpg")  # any size or mode
    (tmp_path / "notes.png").write_text("not an image")
    proc = predict(env, "--checkpoint", str(trained), str(tmp_path / "red.png"), str(tmp_path / "notes.png"),
                   str(tmp_path / "big_gray.jpg"), "--json", "--top-k", "3")
    assert proc.returncode == 1  # something failed
    results = json.loads(proc.stdout)
    assert [r["file"].rsplit("/", 1)[-1] for r in results] == ["red.png", "notes.png", "big_gray.jpg"]
    good = [r for r in results if "top" in r]
    assert len(good) == 2 and "not a readable image" in results[1]["error"]
    for r in good:
        probs = [t["probability"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_predict_a_folder_from_a_checkpoint_file_in_text(trained, env, tmp_path):
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 80, 100, 50)).save(tmp_path / f"{i}.png")
    ckpt = sorted((trained / CHECKPOINTS).glob("step_*"))[-1] / "state.pt"
    proc = predict(env, "--checkpoint", str(ckpt), str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all("%" in line for line in lines)
    # The same weights give the same answer from model.pt.
    again = predict(env, "--checkpoint", str(trained / MODEL), str(tmp_path))
    assert again.stdout == proc.stdout


def test_a_checkpoint_that_would_run_code_is_refused(env, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / MODEL
    with open(evil, "wb") as f:
        pickle.dump({"model": "blitz", "classes": ["a"], "state_dict": Evil()}, f)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    proc = predict(env, "--checkpoint", str(evil), str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "refused" in proc.stderr
    assert not marker.exists()
    proc = predict(env, "--checkpoint", str(tmp_path / "missing.pt"), str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr


def test_torch_save_of_a_full_module_is_refused_too(env, tmp_path):
    torch.save({"model": "blitz", "classes": ["a"], "state_dict": torch.nn.Linear(2, 2)}, tmp_path / "m.pt")
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    proc = predict(env, "--checkpoint", str(tmp_path / "m.pt"), str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "refused" in proc.stderr


def one_line_error(proc, *said: str) -> None:
    """Exit 2 and one `error:` line on stderr holding each of `said`: no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert all(s in proc.stderr for s in said), proc.stderr


def test_model_pt_holds_the_training_statistics_and_a_checksum(trained, cache_dir):
    weights = load_weights(trained / MODEL)
    data = load_dataset(load_config(None, TINY + [f"data.cache_dir={cache_dir}"]).data)
    assert (tuple(weights["mean"]), tuple(weights["std"])) == (data.stats.mean, data.stats.std)
    assert data.stats != CIFAR10_STATS and len(weights["sha256"]) == 64
    net, classes, stats = load_classifier(trained / MODEL)
    assert stats == data.stats and classes == data.classes


def test_a_damaged_model_pt_is_refused_naming_it(trained, env, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    good = (trained / MODEL).read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # a weight's byte: torch.load reads it without complaint
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    assert torch.load(tmp_path / "flipped.pt", weights_only=True)["model"] == "blitz"
    one_line_error(predict(env, "--checkpoint", str(tmp_path / "flipped.pt"), str(tmp_path / "x.png")),
                   f"{tmp_path / 'flipped.pt'}: damaged (its contents do not match the sha256 saved with them)")
    (tmp_path / "short.pt").write_bytes(good[: len(good) // 2])
    one_line_error(predict(env, "--checkpoint", str(tmp_path / "short.pt"), str(tmp_path / "x.png")),
                   f"{tmp_path / 'short.pt'}: damaged or not a PyTorch file")


def test_a_model_pt_from_before_checksums_and_statistics_still_predicts(trained, env, tmp_path):
    """Files written before sha256 and statistics were stored: read unverified, with CIFAR-10's statistics."""
    blob = load_weights(trained / MODEL)
    old = tmp_path / "old.pt"
    torch.save({k: blob[k] for k in ("model", "classes", "state_dict")}, old)
    assert load_classifier(old)[2] == CIFAR10_STATS
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "x.png")
    proc = predict(env, "--checkpoint", str(old), str(tmp_path / "x.png"))
    assert proc.returncode == 0 and "%" in proc.stdout


def test_a_tensor_file_and_weights_of_another_shape_are_one_line(trained, env, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    torch.save(torch.zeros(3, 32, 32), tmp_path / "tensor.pt")
    one_line_error(predict(env, "--checkpoint", str(tmp_path / "tensor.pt"), str(tmp_path / "x.png")),
                   f"{tmp_path / 'tensor.pt'}: not a cifar-dist model or checkpoint (it holds a Tensor)")
    blob = load_weights(trained / MODEL)
    save_model(tmp_path / "three.pt", "blitz", ["a", "b", "c"], blob["state_dict"], blob["mean"], blob["std"])
    one_line_error(predict(env, "--checkpoint", str(tmp_path / "three.pt"), str(tmp_path / "x.png")),
                   "its weights do not fit the blitz net with 3 classes (size mismatch for fc3.weight")
    save_model(tmp_path / "medium.pt", "medium", blob["classes"], blob["state_dict"], blob["mean"], blob["std"])
    one_line_error(predict(env, "--checkpoint", str(tmp_path / "medium.pt"), str(tmp_path / "x.png")),
                   "its weights do not fit the medium net with 10 classes (Missing key(s)")


def test_a_folder_without_images_is_an_error(trained, env, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    one_line_error(predict(env, "--checkpoint", str(trained), str(tmp_path / "empty")),
                   f"{tmp_path / 'empty'}: no images in this folder (looked for .bmp, .gif, .jpeg")


def test_a_16_bit_png_is_predicted_as_its_8_bit_twin(trained, env, tmp_path):
    grey = (np.arange(32 * 32).reshape(32, 32) * 7 % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    proc = predict(env, "--checkpoint", str(trained), str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png"),
                   "--json", "--top-k", "10")
    assert proc.returncode == 0, proc.stderr
    eight, sixteen = json.loads(proc.stdout)
    assert eight["top"] == sixteen["top"]

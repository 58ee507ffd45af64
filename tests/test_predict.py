"""`cifar-dist predict`: top-k per image, bad files reported per file, checkpoints never run code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import PY, TINY, run, train_cmd
from PIL import Image

from cifar_dist.rundir import CHECKPOINTS, MODEL


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

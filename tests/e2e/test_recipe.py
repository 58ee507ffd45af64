"""The speed recipe as a training run: the whitening bias trains for its epochs, then stays. The
recipe's parts, each against its definition: tests/unit/test_recipe.py."""


from __future__ import annotations

import pytest
import torch

from cifar_dist import checkpoint
from tests.helpers import TINY, run, train_cmd


def test_whitening_bias_trains_for_its_epochs_then_stays(env, tmp_path):
    """train.whiten_bias_epochs=1 of 3: the bias moves during epoch 1, not after; its lr, weight
    decay per step and momentum are the BatchNorm biases' while it trains. Off: it never moves."""
    args = [*TINY, "model.name=fast", "data.synthetic_train=256", "train.epochs=3", "train.bias_lr_scale=8",
            "checkpoint.every_steps=4", "checkpoint.keep=4", "eval.every=0"]  # 4 steps an epoch
    on, off = tmp_path / "on", tmp_path / "off"
    run(train_cmd(*args, "train.whiten_bias_epochs=1", f"run.dir={on}"), env)
    run(train_cmd(*args, f"run.dir={off}"), env)

    def state(run_dir, step):
        found = {c.step: c.path for c in checkpoint.list_checkpoints(run_dir)}
        return checkpoint.load_state(found[step] / checkpoint.STATE)

    def bias(run_dir, step):
        return state(run_dir, step)["model"]["whiten.bias"]

    assert bias(on, 4).abs().sum() > 0  # starts at 0 (init_from_data), moved in epoch 1
    assert torch.equal(bias(on, 4), bias(on, 8)) and torch.equal(bias(on, 8), bias(on, 12))
    assert all(bias(off, s).abs().sum() == 0 for s in (4, 8, 12))
    groups = state(on, 12)["optimizer"]["param_groups"]
    main, norm_biases, whiten = groups
    assert whiten["steps"] == 4 and len(whiten["params"]) == 1 and whiten["lr"] == 0
    assert whiten["initial_lr"] == norm_biases["initial_lr"] == pytest.approx(8 * main["initial_lr"])
    assert whiten["weight_decay"] == norm_biases["weight_decay"]

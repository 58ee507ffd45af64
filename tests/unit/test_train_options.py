"""The training options of issue 27 in the config and the recipe: strict one-line refusals, the
config hash, the optimisers and their parameter groups, gradient accumulation (k micro-batches
of B/k are one batch of B; DDP all-reduces once per optimiser step), clipping, the EMA, and the
smoke run with all of them on."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as tdist

from cifar_dist.config import ConfigError, load_config
from cifar_dist.models import build_model
from cifar_dist.precision import autocast_context
from cifar_dist.recipe import EMA, make_optimizer, make_step
from cifar_dist.result_keys import config_hash
from cifar_dist.schema import set_key
from tests.helpers import PY, run, train_cmd


@pytest.mark.parametrize(("override", "key", "problem"), [
    ("train.optimizer=adam", "train.optimizer", "must be one of sgd, adamw"),
    ("train.betas=0.9,0.99,0.5", "train.betas", "must be two numbers in [0, 1)"),
    ("train.betas=0.9", "train.betas", "expected a list"),
    ("train.betas=0.9,1.0", "train.betas", "must be two numbers in [0, 1)"),
    ("train.eps=0", "train.eps", "must be > 0"),
    ("train.accumulate=0", "train.accumulate", "must be >= 1"),
    ("train.accumulate=3", "train.accumulate", "must divide train.batch_size=128"),
    ("train.clip_grad_norm=-1", "train.clip_grad_norm", "must be >= 0"),
    ("train.ema.decay=1", "train.ema.decay", "must be in [0, 1)"),
    ("train.ema.start_step=-1", "train.ema.start_step", "must be >= 0"),
    ("eval.ema=true", "eval.ema", "needs train.ema.decay > 0"),
    ("train.early_stop.metric=accuracy", "train.early_stop.metric", "must be one of test_accuracy, test_loss"),
    ("train.early_stop.patience=0", "train.early_stop.patience", "must be >= 1"),
    ("train.early_stop.min_delta=-0.1", "train.early_stop.min_delta", "must be >= 0"),
    ("train.early_stop.metric=test_loss eval.every=0", "train.early_stop.metric", "needs eval.every >= 1"),
    ("train.init_sha256=abc", "train.init_sha256", "must be 64 lowercase hex digits"),
    ("tracking.backend=wandb,mlflow", "tracking.backend", "must be one or more of"),
    ("tracking.backend=wandb,wandb", "tracking.backend", "names a tracker twice"),
    ("tracking.backend=none,tensorboard", "tracking.backend", "none cannot be combined"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, key, problem):
    with pytest.raises(ConfigError) as e:
        load_config("debug", override.split())
    assert str(e.value).startswith(f"{key}: {problem}") and "\n" not in str(e.value)


def test_the_command_line_refuses_in_one_line_with_exit_2(env, tmp_path):
    proc = run(train_cmd("train.accumulate=3", f"run.dir={tmp_path / 'r'}", config="debug"), env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: train.accumulate: must divide train.batch_size=128") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_trackers_are_a_list_written_any_of_three_ways(tmp_path):
    assert load_config(None, ["tracking.backend=wandb,tensorboard"]).tracking.backend == ["wandb", "tensorboard"]
    assert load_config(None, ["tracking.backend=tensorboard"]).tracking.backend == ["tensorboard"]
    assert load_config(None).tracking.backend == ["none"]
    for text, expected in (("backend: wandb", ["wandb"]), ("backend: [wandb, tensorboard]", ["wandb", "tensorboard"])):
        (tmp_path / "c.yaml").write_text(f"tracking: {{{text}}}\n")
        assert load_config(str(tmp_path / "c.yaml")).tracking.backend == expected


def test_the_new_keys_are_in_the_config_hash_and_the_recorded_sha256_is_not():
    base = config_hash(load_config("debug"))
    for override in ("train.optimizer=adamw", "train.accumulate=2", "train.clip_grad_norm=1", "train.ema.decay=0.9",
                     "train.early_stop.metric=test_loss", "train.decay_norms_and_biases=false", "train.betas=0.8,0.99"):
        assert config_hash(load_config("debug", [override])) != base, override
    assert config_hash(load_config("debug", ["train.ema.decay=0.9", "eval.ema=true"])) != \
        config_hash(load_config("debug", ["train.ema.decay=0.9"]))
    assert config_hash(load_config("debug", ["train.init_sha256=" + "a" * 64])) == base  # filled in by the run
    assert config_hash(load_config("debug", ["tracking.backend=tensorboard"])) == base


def net_and_config(*overrides: str):
    cfg = load_config(None, ["model.name=blitz", "train.batch_size=64", "train.epochs=1", *overrides])
    torch.manual_seed(0)
    return build_model("blitz"), cfg


def test_adamw_with_its_settings_and_no_decay_on_norms_and_biases():
    net, cfg = net_and_config("train.optimizer=adamw", "train.betas=0.8,0.95", "train.eps=1e-6",
                              "train.weight_decay=0.05", "train.decay_norms_and_biases=false")
    optimizer, _ = make_optimizer(cfg, net, 10, 10)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, undecayed = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    assert (decayed["betas"], decayed["eps"]) == ((0.8, 0.95), 1e-6)
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in undecayed["params"]} == {n for n, p in net.named_parameters() if n.endswith(".bias")}
    assert all(p.ndim > 1 for p in decayed["params"])
    # The default keeps this project's SGD recipes as they were: one group, every parameter decayed.
    sgd, _ = make_optimizer(net_and_config()[1], net, 10, 10)
    assert isinstance(sgd, torch.optim.SGD) and len(sgd.param_groups) == 1 and sgd.param_groups[0]["nesterov"]


def batch(n: int = 64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_steps(model, net, cfg, steps: int = 5):
    optimizer, scheduler = make_optimizer(cfg, net, steps, steps)
    step = make_step(cfg, model, optimizer, scheduler, autocast_context("fp32", torch.device("cpu")))
    x, y = batch()
    losses = [float(step(x, y)) for _ in range(steps)]
    return losses, step


def test_four_micro_batches_of_b_over_4_give_the_weights_of_one_batch_of_b():
    """Float32: the gradient of one batch is summed in another order than four quarter-batch
    gradients are; after 5 SGD steps the weights agree to 1e-6 (seen: below 1e-7). A micro-batch
    loss not divided by k would give 4x the gradient, and weights that differ by ~1e-2."""
    net1, cfg1 = net_and_config()
    net4, cfg4 = net_and_config("train.accumulate=4")
    loss1, _ = train_steps(net1, net1, cfg1)
    loss4, _ = train_steps(net4, net4, cfg4)
    assert loss4 == pytest.approx(loss1, rel=1e-6)
    for (name, a), b in zip(net1.state_dict().items(), net4.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(net1.fc3.weight, build_model("blitz").fc3.weight)  # it trained


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-rank gloo process group in this process (DDP's code paths, all-reduces included)."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                             timeout=datetime.timedelta(seconds=60))
    yield
    tdist.destroy_process_group()


def test_ddp_all_reduces_once_per_optimiser_step_not_per_micro_batch(gloo_group):
    """DDP's communication hook is called once per gradient bucket per all-reduce: with 4
    micro-batches, the first three backward passes run in no_sync and only the last one reduces."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    calls = {}
    for k in (1, 4):
        net, cfg = net_and_config(f"train.accumulate={k}")
        model = DistributedDataParallel(net)
        calls[k] = 0

        def counting(state, bucket, k=k):
            calls[k] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting)
        train_steps(model, net, cfg, steps=3)
    assert calls[1] >= 3 and calls[4] == calls[1]


def test_clipping_bounds_the_global_norm_and_reports_it_unclipped():
    net, cfg = net_and_config("train.clip_grad_norm=0.05", "train.lr=0.01")
    x, y = batch()
    loss = torch.nn.functional.cross_entropy(net(x), y, label_smoothing=cfg.train.label_smoothing)
    loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()]))
    net.zero_grad()
    _, step = train_steps(net, net, cfg, steps=1)
    assert float(step.grad_norm) == pytest.approx(float(expected), rel=1e-5)
    assert float(step.grad_norm) > 0.05  # so clipping was in effect


def test_ema_copies_until_its_start_then_averages():
    net, _ = net_and_config()
    ema = EMA(net, decay=0.5, start_step=2)
    for step in (1, 2):
        with torch.no_grad():
            net.fc3.weight.add_(1.0)
        ema.after(net, step)
        assert torch.equal(ema.net.fc3.weight, net.fc3.weight), step  # before its start: the weights themselves
    before = ema.net.fc3.weight.clone()
    with torch.no_grad():
        net.fc3.weight.add_(1.0)
    ema.after(net, 3)
    torch.testing.assert_close(ema.net.fc3.weight, (before + net.fc3.weight) / 2)
    assert EMA(net, decay=0.0, start_step=0).net is None


def test_smoke_runs_every_new_option(env, tmp_path):
    """--smoke with every option on (and a fine-tune of a finished run): each phase says what it saw of them."""
    source = tmp_path / "source"
    run(train_cmd("train.epochs=1", "data.synthetic_train=512", f"run.dir={source}", config="debug"), env)
    proc = run([PY, "-m", "cifar_dist.cli", "train", "--smoke", "--config", "debug", "train.optimizer=adamw",
                "train.lr=0.003", "train.accumulate=2", "train.clip_grad_norm=1", "train.ema.decay=0.9",
                "train.ema.start_step=50", "eval.ema=true", "train.early_stop.metric=test_loss", f"train.init_from={source}",
                "tracking.backend=tensorboard,wandb", "data.synthetic_classes=5", f"run.dir={tmp_path / 'smoke'}"], env)
    out = proc.stdout
    assert "smoke passed" in out, out
    assert "adamw optimiser and LR schedule built, EMA of the weights (decay 0.9)" in out
    assert f"weights from {source / 'model.pt'}" in out and "head replaced" in out
    assert "in 2 micro-batches" in out and "clipped at 1" in out
    assert "the moving average's weights: eval.ema" in out and "early stop watched test_loss" in out
    assert "with the EMA weights" in out and "ema (decay 0.9, from step 1) weights" in out
    assert "trackers tensorboard, wandb (wandb offline for the smoke)" in out
    assert os.listdir(tmp_path / "smoke")  # run.dir given: kept


def test_a_single_tracker_string_sets_the_list(tmp_path):
    """`set_key` is how a sweep spec's overrides reach the config: a plain string is a one-name list."""
    cfg = load_config(None)
    set_key(cfg, "tracking.backend", "tensorboard")
    assert cfg.tracking.backend == ["tensorboard"]

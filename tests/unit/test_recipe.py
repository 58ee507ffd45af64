"""The speed recipe's parts (airbench's ideas, restated): the LR schedule's ends, BatchNorm biases
at a scaled LR, dirac-initialised convs with frozen BatchNorm scales, alternating flips and
multi-crop test-time augmentation, the whitening bias trained early on only (in a training run:
tests/e2e/test_recipe.py). Each is checked against its definition, written out by hand."""


from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist import recipe
from cifar_dist.config import DataConfig, EvalConfig, load_config
from cifar_dist.data import Dataset, TrainBatches, normalize
from cifar_dist.distributed import Distributed
from cifar_dist.exact_eval import evaluate
from cifar_dist.models import build_model
from cifar_dist.recipe import Lookahead, make_optimizer, make_step
from cifar_dist.sources import CIFAR10_STATS


def lrs(overrides: list[str], steps_per_epoch: int = 10) -> list[float]:
    cfg = load_config("debug", overrides)
    net = nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(cfg, net, steps_per_epoch, cfg.train.epochs * steps_per_epoch)
    out = []
    for _ in range(cfg.train.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_default_schedule_ramps_from_zero_and_decays_to_zero():
    got = lrs(["train.epochs=4", "train.lr=1.0", "train.warmup_epochs=1"])
    warm = [(s + 1) / 10 for s in range(10)]
    decay = [1 - (s - 10) / 30 for s in range(10, 40)]
    assert got == pytest.approx(warm + decay)


def test_schedule_starts_and_ends_at_the_given_fractions():
    got = lrs(["train.epochs=4", "train.lr=2.0", "train.warmup_epochs=1", "train.warmup_start=0.2",
               "train.final_lr=0.07"])
    assert got[0] == pytest.approx(2.0 * (0.2 + 0.8 / 10))
    assert got[9] == pytest.approx(2.0)  # the warm-up's last step is at the peak
    assert got[-1] == pytest.approx(2.0 * (0.07 + 0.93 * (1 - 29 / 30)))
    assert min(got) > 2.0 * 0.07 - 1e-12
    cosine = lrs(["train.epochs=4", "train.lr=2.0", "train.warmup_epochs=1", "train.schedule=cosine",
                  "train.final_lr=0.5"])
    assert min(cosine[10:]) >= 1.0 - 1e-12 and cosine[10] == pytest.approx(2.0)


def test_batchnorm_biases_get_a_scaled_lr_and_the_same_decay_per_step():
    net = build_model("fast")
    cfg = load_config("fast", ["train.lr=1.5", "train.weight_decay=0.002", "train.bias_lr_scale=64",
                               "train.whiten_bias_epochs=0"])
    optimizer, _ = make_optimizer(cfg, net, 10, 100)
    main, biases = optimizer.param_groups
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {id(p) for p in biases["params"]} == {id(p) for p in norm_biases}
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert len(main["params"]) + len(biases["params"]) == len(trainable)
    assert biases["initial_lr"] == pytest.approx(64 * main["initial_lr"])
    assert biases["initial_lr"] * biases["weight_decay"] == pytest.approx(main["initial_lr"] * main["weight_decay"])
    # At scale 1 nothing is split: the optimiser (and its checkpoints) look as before.
    plain, _ = make_optimizer(load_config("fast", ["train.bias_lr_scale=1", "train.whiten_bias_epochs=0"]), net, 10, 100)
    assert len(plain.param_groups) == 1


def test_a_fraction_of_a_step_of_whitening_bias_training_is_one_step():
    """A tiny train.whiten_bias_epochs still gives the bias its own group (one step), never the
    main group's full schedule."""
    net = build_model("fast")
    net.whiten.bias.requires_grad_(True)  # as make_net does when train.whiten_bias_epochs > 0
    optimizer, scheduler = make_optimizer(load_config("fast", ["train.whiten_bias_epochs=0.01"]), net, 10, 100)
    whiten = optimizer.param_groups[-1]
    assert whiten["params"] == [net.whiten.bias] and whiten["steps"] == 1
    assert all(net.whiten.bias is not p for p in optimizer.param_groups[0]["params"])
    assert whiten["lr"] > 0
    optimizer.step()
    scheduler.step()
    assert whiten["lr"] == 0


@pytest.mark.parametrize("compile_, mode", [(True, "max-autotune"), (True, "default"), (False, "reduce-overhead")])
def test_model_compile_mode_is_the_mode_torch_compile_gets(monkeypatch, compile_, mode):
    """Wiring only: torch.compile is replaced by a recorder (a real compile takes ~50 s on this CPU,
    and the CUDA-graph modes need a GPU)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: calls.append(mode) or model)
    cfg = load_config("fast", [f"model.compile={str(compile_).lower()}", f"model.compile_mode={mode}"])
    net = build_model("fast")
    optimizer, scheduler = make_optimizer(cfg, net, 10, 100)
    step = make_step(cfg, net, optimizer, scheduler, contextlib.nullcontext())
    assert calls == ([mode] if compile_ else [])
    assert step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])).ndim == 0


def test_fast_net_convs_start_as_identity_and_batchnorm_scales_are_frozen():
    net = build_model("fast")
    for block in net.layers:
        convs = [m for m in block if isinstance(m, nn.Conv2d)]
        x = torch.randn(2, convs[0].in_channels, 8, 8)
        assert torch.allclose(convs[0](x)[:, : convs[0].in_channels], x, atol=1e-6)
        y = torch.randn(2, convs[1].in_channels, 8, 8)
        assert torch.allclose(convs[1](y), y, atol=1e-6)  # square: the identity on every channel
        for norm in (m for m in block if isinstance(m, nn.BatchNorm2d)):
            assert not norm.weight.requires_grad and norm.bias.requires_grad
            assert norm.momentum == 0.4 and norm.eps == 1e-12


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    images = torch.randint(0, 256, (200, 32, 32, 3), dtype=torch.uint8)
    batches = TrainBatches(images, torch.arange(200), DataConfig(flip=True, flip_alternate=True, translate=0),
                           global_batch=40, rank=0, world=1, seed=5, stats=CIFAR10_STATS)
    flips = [batches.plan(e)["flip"].clone() for e in range(4)]
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0]) and torch.equal(flips[3], ~flips[0])
    assert 60 < int(flips[0].sum()) < 140  # epoch 0's coins are still random
    assert not torch.equal(batches.plan(0)["order"], batches.plan(1)["order"])  # the order still reshuffles
    random = TrainBatches(images, torch.arange(200), DataConfig(flip=True, translate=0), global_batch=40, rank=0, world=1,
                          seed=5, stats=CIFAR10_STATS)
    assert torch.equal(random.plan(0)["flip"], flips[0])  # epoch 0 is the plain random flip
    assert not torch.equal(random.plan(1)["flip"], flips[1])


class Corner(nn.Module):
    """Logits = the first row of channel 0, first 10 columns: every shift and mirror shows in them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :10]


def test_multi_crop_tta_averages_the_mirrored_and_shifted_views_with_their_weights():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 10, (6,))
    dist = Distributed("cpu")  # world size 1: the collectives are the identity
    try:
        data = Dataset(images[:0], labels[:0], images, labels, classes=[str(c) for c in range(10)], stats=CIFAR10_STATS)
        got = evaluate(Corner(), data, dist, EvalConfig(batch_size=4, tta_flip=True, tta_translate=1))
    finally:
        dist.close()
    x = normalize(images, CIFAR10_STATS)
    # Shifted by one pixel down-right / up-left, reflected at the border: built by indexing.
    down = torch.tensor([1, *range(31)])
    up = torch.tensor([*range(1, 32), 30])
    views = [x, x[:, :, down][:, :, :, down], x[:, :, up][:, :, :, up]]

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return (Corner()(v) + Corner()(v.flip(3))) / 2

    logits = mirrored(views[0]) / 2 + mirrored(views[1]) / 4 + mirrored(views[2]) / 4
    assert got.loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    expected = torch.bincount(labels * 10 + logits.argmax(1), minlength=100).view(10, 10)
    assert torch.equal(got.confusion, expected)


def test_lookahead_pulls_weights_and_statistics_to_their_slow_average():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ahead = Lookahead(net, every=2, total_steps=9)
    start = {k: v.clone() for k, v in net.state_dict().items()}

    def move() -> dict[str, torch.Tensor]:  # what an optimiser step (and a forward) would do
        with torch.no_grad():
            for t in [*net.parameters(), net[1].running_mean]:
                t.add_(torch.randn_like(t))
        return {k: v.clone() for k, v in net.state_dict().items()}

    moved = move()
    ahead.after(1)  # not a multiple of 2: nothing
    assert all(torch.equal(net.state_dict()[k], moved[k]) for k in moved)
    moved = move()
    ahead.after(2)
    d = 0.95**2 * (2 / 9) ** 3
    for k in ("0.weight", "1.bias", "1.running_mean"):
        expected = d * start[k] + (1 - d) * moved[k]
        assert torch.allclose(net.state_dict()[k], expected) and torch.allclose(ahead.avg[k], expected)
    assert torch.equal(net.state_dict()["1.num_batches_tracked"], moved["1.num_batches_tracked"])  # not a float
    pulled = {k: v.clone() for k, v in ahead.avg.items()}
    moved = move()
    ahead.after(9)  # the last step is pulled too, though 9 is odd
    assert torch.allclose(net.state_dict()["0.weight"], 0.95**2 * pulled["0.weight"] + (1 - 0.95**2) * moved["0.weight"])
    off = Lookahead(net, every=0, total_steps=9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    off.after(9)
    assert off.avg == {} and all(torch.equal(net.state_dict()[k], before[k]) for k in before)


@pytest.mark.parametrize(("name", "kwargs"), [("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
                                            ("AdamW", {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1})])
def test_the_optimisers_step_as_torchs_own_do(name, kwargs):
    # recipe.SGD/AdamW unwrap torch.optim's dynamo wrappers (start-up: benchmarks/bench_startup.py);
    # their steps, state and step hooks must be torch's. Same start, same gradients, 5 steps.
    nets = [nn.Linear(4, 3), nn.Linear(4, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    ours = getattr(recipe, name)(nets[0].parameters(), **kwargs)
    torchs = getattr(torch.optim, name)(nets[1].parameters(), **kwargs)
    hooked = []
    ours.register_step_post_hook(lambda opt, args, kwargs: hooked.append(opt))
    torch.manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 4)
        for net, opt in zip(nets, (ours, torchs)):
            net(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
    assert hooked == [ours] * 5
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b) and a.grad is None and a.abs().sum() > 0
    assert not any(t.requires_grad for t in ours.state_dict()["state"][0].values())  # stepped under no_grad
    torch.testing.assert_close(ours.state_dict(), torchs.state_dict())
    torchs.load_state_dict(ours.state_dict())  # their checkpoints are each other's
    ours.load_state_dict(torchs.state_dict())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_recipe_builds_the_unwrapped_optimisers(optimizer):
    made, _ = make_optimizer(load_config("debug", [f"train.optimizer={optimizer}"]), nn.Linear(2, 2), 10, 10)
    assert type(made) is {"sgd": recipe.SGD, "adamw": recipe.AdamW}[optimizer]


def test_deterministic_algorithms_are_on_whether_or_not_the_net_is_compiled():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        for compiled in (False, True):
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = True
            recipe.deterministic_algorithms(compiled)
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
            assert not torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill

"""The seeds' nets exactly (same layers, same parameter counts), and the project's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cifar_dist.config import load_config
from cifar_dist.models import MODELS, build_model, count_parameters
from cifar_dist.recipe import make_net
from cifar_dist.result_keys import config_hash
from cifar_dist.sources import CIFAR10_STATS


def test_blitz_is_the_tutorial_net():
    net = build_model("blitz")
    # conv1 3->6 5x5, conv2 6->16 5x5, fc 400->120->84->10
    assert count_parameters(net) == (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert count_parameters(net) == 62_006
    assert [type(m).__name__ for m in net.children()] == ["Conv2d", "MaxPool2d", "Conv2d", "Linear", "Linear", "Linear"]


def test_medium_is_the_article_net():
    net = build_model("medium")
    assert count_parameters(net) == 169_578
    convs = [(m.in_channels, m.out_channels, m.kernel_size) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(3, 32, (3, 3)), (32, 64, (3, 3)), (64, 128, (3, 3))]
    fcs = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert fcs == [(512, 128), (128, 64), (64, 32), (32, 10)]
    assert net.dropout1.p == 0.2


def tutorial_forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tutorials' own forward passes, ReLU before max-pooling, written out from their code."""
    convs = [net.conv1, net.conv2] + ([net.conv3] if hasattr(net, "conv3") else [])
    for conv in convs:
        x = net.pool(F.relu(conv(x)))
    x = torch.flatten(x, 1)
    fcs = [m for m in net.children() if isinstance(m, torch.nn.Linear)]
    for fc in fcs[:-1]:
        x = F.relu(fc(x))
    return fcs[-1](x)


@pytest.mark.parametrize("name", ["blitz", "medium"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooling_before_the_relu_gives_the_tutorials_outputs_and_gradients(name, dtype):
    torch.manual_seed(0)
    net = build_model(name).eval()  # eval: no dropout masks to match
    x = torch.randn(16, 3, 32, 32)
    grads = []
    for forward in (net, lambda x: tutorial_forward(net, x)):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = forward(x)
        F.cross_entropy(out, torch.arange(16) % 10).backward()
        grads.append((out, [p.grad.clone() for p in net.parameters()]))
    (ours, our_grads), (theirs, their_grads) = grads
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a, b) and a.abs().sum() > 0 for a, b in zip(our_grads, their_grads))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    net = build_model(name).eval()
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_fast_whitening_is_frozen_and_whitens():
    net = build_model("fast")
    x = torch.randn(64, 3, 32, 32) * torch.tensor([1.0, 3.0, 0.2]).view(1, 3, 1, 1)
    net.init_from_data(x)
    assert not net.whiten.weight.requires_grad
    out = net.whiten(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(out.T.double())
    assert torch.allclose(cov, torch.eye(12, dtype=torch.double), atol=0.05)


def test_resnet18_is_adapted_to_32x32():
    net = build_model("resnet18")
    assert net.conv1.stride == (1, 1) and net.conv1.kernel_size == (3, 3)
    assert isinstance(net.maxpool, torch.nn.Identity)
    assert 11_000_000 < count_parameters(net) < 11_300_000


@pytest.mark.parametrize(("dropout", "drops"), [(-1, True), (0.5, True), (0, False)])
def test_model_dropout_sets_the_nets_dropout_for_training(dropout, drops):
    """model.dropout: -1 keeps medium's own 0.2; 0 makes a training forward the evaluation forward."""
    cfg = load_config("debug", ["model.name=medium", f"model.dropout={dropout}"])
    images = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    net = make_net(cfg, images, 10, torch.contiguous_format, stats=CIFAR10_STATS)
    assert {m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)} == {0.2 if dropout == -1 else dropout}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.train()(x), net.eval()(x)) is not drops
    # A run's result depends on it: its config hash counts it when set, and runs made before the key existed keep theirs.
    assert (config_hash(cfg) != config_hash(load_config("debug", ["model.name=medium"]))) is (dropout != -1)

"""Checks that need a CUDA GPU: skipped here and in CI (no GPU), run first by
benchmarks/gpu_session.sh on a lent GPU machine, where a failure shows before any time is measured."""

from __future__ import annotations

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.data import TrainBatches
from cifar_dist.precision import autocast_context
from cifar_dist.recipe import Lookahead, make_net, make_optimizer, make_step
from cifar_dist.sources import CIFAR10_STATS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_training_step_never_waits_for_the_gpu():
    """Batch, augmentation, forward, backward, optimiser, schedule and Lookahead queue their work
    without one synchronising call, so the CPU runs ahead of the GPU. Only the records (every
    train.log_every steps) and an epoch's first batch (its plan goes to the GPU) may wait."""
    cfg = load_config("fast", ["model.compile=false"])
    device = torch.device("cuda")
    images = torch.randint(0, 256, (5000, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (5000,), device=device)
    batches = TrainBatches(images, labels, cfg.data, global_batch=cfg.train.batch_size, rank=0, world=1, seed=0,
                           memory_format=torch.channels_last, stats=CIFAR10_STATS)
    net = make_net(cfg, images, 10, torch.channels_last, stats=CIFAR10_STATS)
    optimizer, scheduler = make_optimizer(cfg, net, batches.steps_per_epoch, 10 * batches.steps_per_epoch)
    lookahead = Lookahead(net, cfg.train.lookahead_every, 10 * batches.steps_per_epoch)
    step = make_step(cfg, net, optimizer, scheduler, autocast_context(cfg.train.precision, device))
    step(*batches.batch(0, 0))  # the epoch's plan is uploaded here, and the first step's lazy set-up is done
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(1, batches.steps_per_epoch):
            step(*batches.batch(0, s))
            lookahead.after(5 * s)  # every call a Lookahead pull
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

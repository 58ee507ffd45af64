"""Evaluation that is exact at any world size: each rank classifies a disjoint contiguous shard
of the test set (no padding, no duplicates) and the confusion counts are summed over ranks."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.data import eval_shard, normalize
from cifar_dist.distributed import Distributed


@dataclass
class EvalResult:
    confusion: torch.Tensor  # (C, C) int64 counts, rows = true class, columns = predicted
    loss: float  # mean cross-entropy per test image (no label smoothing)
    samples: list[tuple[int, int, int]]  # (test index, true, predicted) for a few images, rank 0's shard

    @property
    def accuracy(self) -> float:
        return int(self.confusion.diag().sum()) / int(self.confusion.sum())

    @property
    def per_class(self) -> list[float]:
        return (self.confusion.diag().double() / self.confusion.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def evaluate(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, dist: Distributed,
             batch_size: int, tta_flip: bool = False, autocast: contextlib.AbstractContextManager | None = None,
             memory_format: torch.memory_format = torch.contiguous_format, n_samples: int = 0,
             tta_translate: int = 0) -> EvalResult:
    """Test-time augmentation averages logits: of the image and its mirror (`tta_flip`), and with
    `tta_translate` = t also of the image shifted by t pixels down-right and up-left (reflected at
    the borders), weighted 1/2, 1/4, 1/4 (airbench's multi-crop evaluation)."""

    def view(x: torch.Tensor) -> torch.Tensor:
        logits = net(x).float()  # averaged in fp32, not in the autocast dtype
        return (logits + net(x.flip(3)).float()) / 2 if tta_flip else logits

    def classify(x: torch.Tensor) -> torch.Tensor:
        if not tta_translate:
            return view(x)
        t = tta_translate
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        shifted = [padded[..., : -2 * t, : -2 * t], padded[..., 2 * t :, 2 * t :]]
        return view(x) / 2 + sum(view(v.contiguous(memory_format=memory_format)) for v in shifted) / 4

    was_training = net.training
    net.eval()
    dist.broadcast_buffers(net)
    shard = eval_shard(len(labels), dist.rank, dist.world)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=images.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=images.device)
    samples: list[tuple[int, int, int]] = []
    for start in range(shard.start, shard.stop, batch_size):
        stop = min(start + batch_size, shard.stop)
        x = normalize(images[start:stop]).contiguous(memory_format=memory_format)
        y = labels[start:stop]
        with autocast or contextlib.nullcontext():
            logits = classify(x)
        pred = logits.argmax(1)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        counts += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes)
        if len(samples) < n_samples:
            k = min(n_samples - len(samples), len(y))
            samples += [(start + i, int(y[i]), int(pred[i])) for i in range(k)]
    counts, loss_sum = dist.sum(counts), dist.sum(loss_sum)
    net.train(was_training)
    return EvalResult(counts.view(num_classes, num_classes).cpu(), float(loss_sum) / len(labels), samples)


def main(argv: list[str] | None = None) -> int:
    """`cifar-dist evaluate RUN_DIR|CHECKPOINT [key=value ...]`: the test-set evaluation of a
    trained model at any world size (under torchrun or accelerate launch), exact."""
    import argparse
    import json
    import sys
    from pathlib import Path

    import yaml

    from cifar_dist.config import ConfigError, config_from_dict, load_config, validate
    from cifar_dist.data import DataError, load_dataset
    from cifar_dist.distributed import DistributedError
    from cifar_dist.predict import PredictError, load_classifier
    from cifar_dist.report import format_eval
    from cifar_dist.schema import set_key
    from cifar_dist.train import autocast_context

    parser = argparse.ArgumentParser(prog="cifar-dist evaluate", description=main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a run directory, its model.pt or a checkpoint's state.pt")
    parser.add_argument("--json", type=Path, help="also write the result here (rank 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.path=... eval.tta_flip=true")
    args = parser.parse_intermixed_args(argv)
    try:
        run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
        saved = next((p for p in (run_dir / "config.yaml", run_dir.parent.parent / "config.yaml") if p.is_file()), None)
        cfg = config_from_dict(yaml.safe_load(saved.read_text())) if saved else load_config()
        for item in args.overrides:
            key, _, value = item.partition("=")
            set_key(cfg, key, value, from_text=True)
        validate(cfg)
        dist = Distributed(cfg.train.device)
        data = load_dataset(cfg.data, announce=dist.print).to(dist.device)
        net, classes = load_classifier(args.checkpoint)
        if classes != data.classes:
            raise DataError(f"the model's classes {classes} are not the data's {data.classes}")
        # The run's precision and memory format: the same numbers as training's final evaluation.
        fmt = torch.channels_last
        result = evaluate(net.to(dist.device, memory_format=fmt), data.test_x, data.test_y, len(classes), dist,
                          cfg.eval.batch_size, cfg.eval.tta_flip, autocast_context(cfg, dist.device), fmt,
                          tta_translate=cfg.eval.tta_translate)
    except (ConfigError, DataError, DistributedError, PredictError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dist.print(format_eval({"epoch": "-", "step": "-"}, result, classes))
    if args.json and dist.is_main:
        args.json.write_text(json.dumps({
            "test_accuracy": result.accuracy, "test_loss": result.loss, "world_size": dist.world,
            "per_class_accuracy": dict(zip(classes, result.per_class)), "confusion_matrix": result.confusion.tolist(),
        }, indent=2))
    dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

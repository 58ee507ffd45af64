"""`cifar-dist evaluate RUN_DIR|CHECKPOINT [key=value ...]`: a trained model's test-set evaluation
at any world size (plain, under torchrun or accelerate launch), exact, in the run's own precision
and test-time augmentation, so that it repeats the run's final evaluation to the image.

    torchrun --nproc_per_node 3 -m cifar_dist.evaluate runs/my-run --json eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from cifar_dist import schema
from cifar_dist.config import config_from_dict, load_config, validate
from cifar_dist.console import format_eval
from cifar_dist.data import load_dataset
from cifar_dist.distributed import Distributed
from cifar_dist.errors import DataError, UserError, run_command
from cifar_dist.exact_eval import evaluate
from cifar_dist.precision import autocast_context
from cifar_dist.predict import load_classifier
from cifar_dist.rundir import CONFIG, RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cifar-dist evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory, its model.pt or a checkpoint's state.pt")
    parser.add_argument("--json", type=Path, help="also write the result here (rank 0)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.path=... eval.tta_flip=true")
    args = parser.parse_intermixed_args(argv)
    if args.json and not args.json.parent.is_dir():
        raise UserError(f"--json: folder {args.json.parent} does not exist")
    if args.json and args.json.is_dir():  # told now, not after the evaluation
        raise UserError(f"--json: {args.json} is a folder; name the file to write")
    # The run's config: beside model.pt, or two levels up from checkpoints/step_N/state.pt.
    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    saved = next((p for p in (run_dir / CONFIG, run_dir.parent.parent / CONFIG) if p.is_file()), None)
    cfg = config_from_dict(schema.read_yaml_mapping(saved, "run config")) if saved else load_config()
    if saved and (summary := RunDir(saved.parent).summary()):
        cfg.train.precision = summary.get("precision", cfg.train.precision)  # what the run used, wherever it ran
    for item in args.overrides:
        key, _, value = item.partition("=")
        schema.set_key(cfg, key, value, from_text=True)
    validate(cfg)
    net, classes, stats = load_classifier(args.checkpoint)  # before the data: a wrong path is told at once
    dist = Distributed(cfg.train.device)
    data = load_dataset(cfg.data, announce=dist.print).to(dist.device)
    if classes != data.classes:
        raise DataError(f"the model's classes {classes} are not the data's {data.classes}")
    # The run's precision and memory format: the same numbers as training's final evaluation.
    fmt = torch.channels_last
    result = evaluate(net.to(dist.device, memory_format=fmt), data, dist, cfg.eval, stats=stats,
                      autocast=autocast_context(cfg.train.precision, dist.device), memory_format=fmt)
    dist.print(format_eval({"epoch": "-", "step": "-"}, result, classes))
    if args.json and dist.is_main:
        args.json.write_text(json.dumps({
            "test_accuracy": result.accuracy, "test_loss": result.loss, "world_size": dist.world,
            "per_class_accuracy": dict(zip(classes, result.per_class)), "confusion_matrix": result.confusion.tolist(),
        }, indent=2))
    dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))

"""`cifar-dist train | lr-find | evaluate | predict | serve | export | compare | data | sweep | launch`,
and `--version`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifar_dist.errors import UserError, run_command

USAGE = """usage: cifar-dist COMMAND [ARGS]

commands:
  train    [--config NAME|PATH ...] [--print-config] [key=value ...]  train (and evaluate) one run
  train    --smoke [--config NAME|PATH ...] [key=value ...]           every path of a config on a few batches
  train    --resume-from CHECKPOINT [--config ...] [key=value ...]    a new run from a checkpoint's whole state
  lr-find  [--config NAME|PATH ...] [--steps N] [key=value ...]       LR range test: loss vs LR plot, a peak LR
  evaluate RUN_DIR|FILE [--json OUT] [key=value ...]                 exact test-set evaluation, any world size
  predict  --checkpoint RUN_DIR|FILE IMAGE|DIR... [--top-k K] [--json]
  serve    RUN_DIR|FILE [--port P] [--backend torch|onnx] [--max-batch N]  HTTP API and upload page, batched
  export   RUN_DIR --format onnx|torchscript|safetensors [--out PATH]  one file for other runtimes, checked
  compare  RUN_OR_SWEEP_DIR... [--out DIR]                            table and plots from run dirs
  data prepare [--config NAME|PATH ...] [key=value ...]               decode the data into the cache
  data show --out PNG [--config NAME|PATH ...] [key=value ...]        a labelled grid of augmented training images
  sweep    SPEC.yaml | --config NAME|PATH [--grid|-m] KEY=V1,V2 ...   Slurm sweeps (= python jobs/submit.py)
  sweep    status|wait|cancel|resubmit SWEEP_DIR                      a submitted sweep
  launch   LAUNCHER ARGS...                                           torchrun or accelerate launch, exiting as the run did

'cifar-dist COMMAND --help' for a command's options; 'cifar-dist --version'."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return run_command(train_main, rest)
    if command == "evaluate":
        from cifar_dist.evaluate import main as evaluate_main

        return run_command(evaluate_main, rest)
    if command == "predict":
        from cifar_dist.predict import main as predict_main

        return run_command(predict_main, rest)
    if command == "serve":
        from cifar_dist.serve.command import main as serve_main

        return run_command(serve_main, rest)
    if command == "export":
        from cifar_dist.export import main as export_main

        return run_command(export_main, rest)
    if command == "compare":
        from cifar_dist.compare import compare_main

        return run_command(compare_main, rest)
    if command == "sweep":
        from cifar_dist.sweep.commands import main as sweep_main

        return sweep_main(rest, prog="cifar-dist sweep")
    if command == "launch":
        from cifar_dist.launcher import main as launch_main

        return run_command(launch_main, rest)
    if command == "data":
        return run_command(data_main, rest)
    if command == "lr-find":
        from cifar_dist.lr_find import main as lr_find_main

        return run_command(lr_find_main, rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def version() -> str:
    """This package's version and torch's, read from the installed metadata (without importing torch)."""
    from importlib import metadata

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"cifar-dist {of('cifar-dist')} (torch {of('torch')}, Python {sys.version.split()[0]})"


def train_main(argv: list[str]) -> int:
    """`cifar-dist train`: the training command line (train.py), and --smoke, which runs above it (smoke.py)."""
    from cifar_dist import smoke, train

    parser = train.argument_parser("cifar-dist train")
    smoke.add_arguments(parser)
    args, cfg = train.parse_args(argv, parser=parser)
    if (args.smoke or args.smoke_compile) and not args.print_config:
        if args.resume_from:
            raise UserError("--smoke trains a few steps of its own from scratch; it does not take --resume-from "
                            "(smoke the checkpoint's config instead: --config with its run's config.yaml)")
        return smoke.run_smoke(cfg, compile_too=args.smoke_compile)
    return train.run_parsed(args, cfg)


def data_main(argv: list[str]) -> int:
    from cifar_dist.config import add_config_arguments, load_config
    from cifar_dist.data import cache_path, load_cached, load_dataset, shown_samples
    from cifar_dist.errors import UserError
    from cifar_dist.metrics import MANY_CLASSES
    from cifar_dist.plots import plot_image_grid

    parser = argparse.ArgumentParser(prog="cifar-dist data", description="prepare: decode a data source into the cache "
                                     "ahead of training (for example on a login node with internet, before offline "
                                     "jobs). show: draw a few training images per class as the net sees them, after "
                                     "the config's augmentation, labelled, to check the data before a long run.")
    parser.add_argument("action", choices=["prepare", "show"])
    add_config_arguments(parser, " (its data section and seed are used)")
    parser.add_argument("--out", type=Path, metavar="PNG", help="show: the picture to write")
    parser.add_argument("--per-class", type=int, default=6, metavar="K", help="show: images per class (default 6)")
    parser.add_argument("--epoch", type=int, default=0, metavar="E", help="show: the epoch whose augmentation is shown")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.action == "prepare":
        ds = load_cached(cfg.data)
        names = ds.classes if len(ds.classes) <= MANY_CLASSES else [*ds.classes[:5], "...", *ds.classes[-2:]]  # one line
        print(f"{cache_path(cfg.data)}: {len(ds.train_y):,} training and {len(ds.test_y):,} test images, "
              f"{len(ds.classes)} classes ({', '.join(names)}); mean {ds.stats.mean}, std {ds.stats.std}")
        return 0
    if args.out is None or args.out.suffix.lower() != ".png":
        raise UserError(f"data show: --out must name a .png file, got {args.out}")
    if not args.out.parent.is_dir():
        raise UserError(f"--out: folder {args.out.parent} does not exist")
    if not 1 <= args.per_class <= 32 or args.epoch < 0:  # 32 a class: already a 20-inch row
        raise UserError(f"data show: --per-class must be in [1, 32] and --epoch >= 0, got {args.per_class} and {args.epoch}")
    d = cfg.data
    ds = load_dataset(d)
    images = shown_samples(ds, d, cfg.seed, args.per_class, args.epoch)
    flip = ("alternating" if d.flip_alternate else "random") if d.flip else "off"
    title = (f"data.source={d.source}: {len(ds.train_y):,} training images, {len(ds.classes)} classes\n"
             f"{images.shape[1]} per class as epoch {args.epoch} of seed {cfg.seed} augments them: flip {flip}, "
             f"translate \u00b1{d.translate} px, cutout {d.cutout} px\n"
             f"normalised with mean {ds.stats.mean} and std {ds.stats.std}; shown un-normalised")
    plot_image_grid(images.numpy(), ds.classes, title, args.out)
    print(f"{args.out}: {images.shape[1]} training images per class for {len(ds.classes)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

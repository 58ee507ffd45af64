"""`cifar-dist train | predict | compare | data prepare`."""

from __future__ import annotations

import argparse
import sys

from cifar_dist.errors import run_command

USAGE = """usage: cifar-dist COMMAND [ARGS]

commands:
  train    [--config NAME|PATH ...] [--print-config] [key=value ...]  train (and evaluate) one run
  evaluate RUN_DIR|FILE [--json OUT] [key=value ...]                 exact test-set evaluation, any world size
  predict  --checkpoint RUN_DIR|FILE IMAGE|DIR... [--top-k K] [--json]
  compare  RUN_OR_SWEEP_DIR... [--out DIR]                            table and plots from run dirs
  data prepare [--config NAME|PATH ...] [key=value ...]               decode the data into the cache
  sweep    SPEC.yaml | status|wait|cancel|resubmit SWEEP_DIR            Slurm sweeps (= python jobs/submit.py)

'cifar-dist COMMAND --help' for a command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from cifar_dist.train import main as train_main

        return run_command(lambda a: train_main(a, prog="cifar-dist train"), rest)
    if command == "evaluate":
        from cifar_dist.evaluate import main as evaluate_main

        return run_command(evaluate_main, rest)
    if command == "predict":
        from cifar_dist.predict import main as predict_main

        return run_command(predict_main, rest)
    if command == "compare":
        from cifar_dist.report import compare_main

        return run_command(compare_main, rest)
    if command == "sweep":
        from cifar_dist.sweep.commands import main as sweep_main

        return sweep_main(rest)
    if command == "data":
        return run_command(data_main, rest)
    print(f"error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


def data_main(argv: list[str]) -> int:
    from cifar_dist.config import add_config_arguments, load_config
    from cifar_dist.data import cache_path, load_cached

    parser = argparse.ArgumentParser(prog="cifar-dist data", description="Decode a data source into the cache ahead "
                                     "of training (for example on a login node with internet, before offline jobs).")
    parser.add_argument("action", choices=["prepare"])
    add_config_arguments(parser, " (its data section is used)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    ds = load_cached(cfg.data)
    print(f"{cache_path(cfg.data)}: {len(ds.train_y):,} training and {len(ds.test_y):,} test images, "
          f"classes {', '.join(ds.classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

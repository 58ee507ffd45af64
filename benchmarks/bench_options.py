"""Training options measured on the whole run, one at a time: `cifar-dist train --config CONFIG`
with each arm's overrides, the arms in turn in every round, on the same data, ranks and seed; one
table appended to benchmarks/RESULTS.md, a row per arm, the first arm the reference.

    python benchmarks/bench_options.py --data cifar10-jpeg.tar.gz --config medium_sprint --ranks 2 \\
        --arm eager --arm compile model.compile=true --extra train.epochs=1 [--rounds 3]

An arm is a name and its overrides (`--arm NAME [KEY=VALUE ...]`); `--extra` goes to every arm.
Each run reports from its summary.json: the loop's images/s (steps and evaluations, without start-up
or compile), the compile seconds apart, the final test accuracy, and the command's wall seconds
(interpreter, imports, data, compile, training, saving). A bare step's speed (bench_step.py) says
little about an option that changes the optimizer's or the data path's work: this measures what a
user's run gets. Without --data the runs train on synthetic images (a check of the plumbing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_table, run_training, spread  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="the CIFAR-10 image-folder archive; default: synthetic images")
    parser.add_argument("--config", default="medium_sprint")
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks, sharing the cores (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per arm, round i with seed=i (default 3)")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE]",
                        help="a row: its name, then its overrides; the first arm is the reference")
    parser.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    args = parser.parse_args()
    if len({a[0] for a in args.arm}) != len(args.arm):
        parser.error("--arm: each arm needs its own name")
    data = (["data.source=imagefolder", f"data.path={args.data.absolute()}"] if args.data
            else ["data.source=synthetic"])
    runs: dict[str, list[dict]] = {a[0]: [] for a in args.arm}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-options-") as tmp:
        for i in range(args.rounds):  # every arm in each round: a drift of a shared machine falls on all of them
            for name, *overrides in args.arm:
                summary = run_training(args.config, args.ranks, [*data, *args.extra, *overrides, f"seed={i}"],
                                       Path(tmp) / f"{name}-{i}")
                runs[name].append(summary)
                print(f"{name} round {i}: {summary['images_per_second']:,.0f} images/s, compile "
                      f"{summary['compile_seconds']:.1f} s, {100 * summary['test_accuracy']:.2f}%, "
                      f"wall {summary['wall_seconds']:.1f} s", flush=True)
    reference = statistics.median(r["images_per_second"] for r in runs[args.arm[0][0]])
    rows = []
    for name, *overrides in args.arm:
        rs = runs[name]
        speed = [r["images_per_second"] for r in rs]
        rows.append([f"`{name}`", " ".join(overrides) or "(none)", spread(speed, "{:,.0f}"),
                     f"{statistics.median(speed) / reference:.2f}x", spread([r["compile_seconds"] for r in rs]),
                     spread([r["train_seconds"] for r in rs]), spread([r["wall_seconds"] for r in rs]),
                     spread([100 * r["test_accuracy"] for r in rs], "{:.2f}")])
    source = f"{args.data.name} (data.source=imagefolder)" if args.data else "synthetic images"
    notes = [f"`cifar-dist train --config {args.config}` on {args.ranks} rank(s) of "
             f"{max(1, (os.cpu_count() or 1) // args.ranks)} thread(s), {source}"
             + (f", with {' '.join(args.extra)}" if args.extra else ""),
             f"{args.rounds} round(s), every arm once per round, round i with seed=i; median (min-max, rounds)",
             "images/s: summary.json's, the training loop's (steps and evaluations) without start-up and compile; "
             "wall: the whole command", f"whole benchmark: {time.monotonic() - start:.0f} s"]
    append_table(f"Training options on the whole run: `{args.config}`, {' vs '.join(a[0] for a in args.arm)} "
                 "(bench_options.py)", notes,
                 ["arm", "overrides", "images/s", f"vs `{args.arm[0][0]}`", "compile s", "train s", "wall s",
                  "final test accuracy %"], rows)


if __name__ == "__main__":
    main()

"""The project against the seed tutorials' own loops (../shared/baselines/seed_loop.py), side by
side in one run, on the real CIFAR-10 JPEG archive: the project's time to reach the accuracy the
seed loop reaches in its full schedule, against the seed loop's time.

    python benchmarks/bench_vs_seed.py --data ../shared/data/cifar10-jpeg.tar.gz \\
        [--runs medium:medium_sprint medium blitz] [--repeats 3] [--ranks 2] \\
        [--recorded medium=1293:0.729 --seed-epochs medium=2] [--seed-loop ../shared/baselines/seed_loop.py]

Each of --runs is NET or NET:CONFIG (a shipped config; default: the net's own), one table row each;
the seed loop runs once per net.

The seed loop's time is its training loop alone (it decodes JPEGs in its DataLoader every
epoch); the project's time is metrics.jsonl's `time`: training and its evaluations, without the
one-time decode into the cache (timed apart below) and without process start-up.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, append_table, spread, train_launcher  # noqa: E402

from cifar_dist.rundir import RunDir

SEED_EPOCHS = {"blitz": 2, "medium": 20}  # the tutorials' own schedules


def run_seed_loop(seed_loop: Path, net: str, image_root: Path, epochs: int) -> dict[str, float]:
    out = subprocess.run([PY, str(seed_loop), net, str(image_root), str(epochs)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"train_secs=([\d.]+) img_per_s=(\d+) test_acc=([\d.]+)", out)
    assert m, out
    return {"seconds": float(m[1]), "images_per_second": float(m[2]), "accuracy": float(m[3]) / 100}


def seed_baseline(seed_loop: Path, net: str, image_root: Callable[[], Path], recorded: str | None) -> dict:
    """The seed loop's full-schedule seconds and accuracy: run here in full (`here`), or recorded
    (SECONDS:ACCURACY)."""
    full = SEED_EPOCHS[net]
    if recorded is None:
        seed = run_seed_loop(seed_loop, net, image_root(), full)
        return {**seed, "here": seed["seconds"],
                "label": f"{full} epochs here: {seed['seconds']:,.0f} s, {100 * seed['accuracy']:.1f}%"}
    seconds, accuracy = (float(v) for v in recorded.split(":"))
    return {"seconds": seconds, "accuracy": accuracy, "label": f"{full} epochs: {seconds:,.0f} s recorded, {100 * accuracy:.1f}%"}


def seed_here(seed_loop: Path, net: str, image_root: Callable[[], Path], epochs: int) -> float:
    """`epochs` of the seed loop timed here, scaled to its full schedule: seconds."""
    return run_seed_loop(seed_loop, net, image_root(), epochs)["seconds"] / epochs * SEED_EPOCHS[net]


def run_project(config: str, data: Path, ranks: int, run_dir: Path, extra: list[str]) -> list[dict]:
    env = dict(os.environ)
    if ranks > 1 and not _has_gpu():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    args = ["--config", config, "data.source=imagefolder", f"data.path={data}", f"run.dir={run_dir}", "run.progress=none"]
    subprocess.run(train_launcher(ranks) + args + extra, check=True, cwd=ROOT, env=env)
    return RunDir(run_dir).metrics()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def time_to(records: list[dict], accuracy: float) -> float | None:
    hit = next((r for r in records if r.get("test_accuracy", 0) >= accuracy), None)
    return hit["time"] if hit else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="cifar10-jpeg.tar.gz")
    parser.add_argument("--runs", nargs="+", default=["medium", "blitz"], metavar="NET[:CONFIG]")
    parser.add_argument("--repeats", type=int, default=3, help="project runs per net")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="run i trains with seed FIRST_SEED+i (seeds not used to choose the recipe)")
    parser.add_argument("--ranks", type=int, default=1, help="project ranks (data-parallel on this machine)")
    parser.add_argument("--seed-loop", type=Path, default=ROOT.parent / "shared" / "baselines" / "seed_loop.py")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for the project runs")
    parser.add_argument("--recorded", nargs="*", default=[], metavar="NET=SECONDS:ACCURACY",
                        help="use a recorded seed-loop result instead of running it (labelled so in the table), "
                             "e.g. medium=1293:0.729 from ../shared/baselines/README.md")
    parser.add_argument("--seed-epochs", nargs="*", default=[], metavar="NET=N",
                        help="with --recorded: also time N epochs of the seed loop here, before each project run, and "
                             "scale its per-epoch time to the full schedule; each run's ratio is to the epochs timed "
                             "just before it (for a full run too long to repeat)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)

        def image_root() -> Path:  # the seed loop reads an unpacked image tree; unpacked once, when first needed
            if not (tmp_path / "images").exists():
                with tarfile.open(args.data) as tar:
                    tar.extractall(tmp_path / "images", filter="data")
            return next(p.parent for p in (tmp_path / "images").rglob("train") if (p.parent / "test").is_dir())
        env_cache = os.environ.setdefault("CIFAR_DIST_CACHE", str(tmp_path / "cache"))
        t = time.perf_counter()
        subprocess.run([PY, "-m", "cifar_dist.cli", "data", "prepare", "data.source=imagefolder", f"data.path={args.data}"],
                       check=True, cwd=ROOT)
        decode_seconds = time.perf_counter() - t

        rows, notes, seeds = [], [], {}
        recorded = dict(r.split("=", 1) for r in args.recorded)
        seed_epochs = {k: int(v) for k, v in (e.split("=", 1) for e in args.seed_epochs)}
        for item in args.runs:
            net, _, config = item.partition(":")
            config = config or net
            if net not in seeds:
                seeds[net] = seed_baseline(args.seed_loop, net, image_root, recorded.get(net))
                print(f"seed {net}: {seeds[net]}", flush=True)
            seed, paired = seeds[net], net in recorded and net in seed_epochs
            hits, finals, totals, heres, here_ratios = [], [], [], [], []
            for i in range(args.repeats):
                if paired:  # the seed loop's epochs timed again just before each run, so a drift falls on both
                    heres.append(seed_here(args.seed_loop, net, image_root, seed_epochs[net]))
                elif "here" in seed:  # the whole seed loop, run here once
                    heres.append(seed["here"])
                run_seed = args.first_seed + i
                records = run_project(config, args.data, args.ranks, tmp_path / f"{config}-{i}",
                                      [*args.extra, f"seed={run_seed}"])
                evals = [r for r in records if "test_accuracy" in r]
                hit = time_to(records, seed["accuracy"])
                print(f"project {config} run {i} (seed {run_seed}): reached {seed['accuracy']:.1%} at {hit} s; "
                      f"final {evals[-1]['test_accuracy']:.2%}, test loss {evals[-1]['test_loss']:.6f}, at {evals[-1]['time']} s"
                      + (f"; seed loop here {heres[-1]:,.0f} s" if paired else ""), flush=True)
                if hit is not None:
                    hits.append(hit)
                    if heres:
                        here_ratios.append(heres[-1] / hit)
                finals.append(100 * evals[-1]["test_accuracy"])
                totals.append(evals[-1]["time"])
            label = seed["label"]
            if paired:
                per_epoch = [h / SEED_EPOCHS[net] for h in heres]
                label += f"; here {spread(per_epoch, '{:,.0f}')} s/epoch ({seed_epochs[net]} timed before each run)"
            rows.append([f"{net} (`--config {config}`)", label, f"{spread(hits)} ({len(hits)}/{args.repeats} reached it)",
                         spread([seed["seconds"] / h for h in hits], "{:.1f}x"),
                         spread(here_ratios, "{:.1f}x") if heres else "n/a",
                         spread(finals, "{:.1f}%"), spread(totals)])
        notes += [f"data: {args.data.name}; the project's one-time decode into its cache took {decode_seconds:.0f} s "
                  f"(cache {env_cache}), not counted below",
                  f"project: `cifar-dist train --config CONFIG seed=i` (shipped recipes; seeds {args.first_seed}-"
                  f"{args.first_seed + args.repeats - 1}, one a run) "
                  f"on {args.ranks} rank(s)"
                  + (" (torchrun, gloo, 1 thread each)" if args.ranks > 1 else "")
                  + (f", overrides {' '.join(args.extra)}" if args.extra else ""),
                  "seed loop: its own training loop time (batch 4-5, DataLoader with 2 workers), run in this same "
                  "invocation (all of it once, or the epochs named before each project run, scaled to its full "
                  "schedule; each run's ratio is then to the epochs timed just before it)"]
        append_table("Project vs seed loops: time to the seed's accuracy", notes,
                     ["net", "seed loop (full schedule)", "project: time to seed accuracy, s", "speed-up",
                      "speed-up vs the seed timed here", "project final accuracy", "project total time, s"], rows)


if __name__ == "__main__":
    main()

"""The `fast` recipe against a public CIFAR-10 speed-run script, side by side in one run on one GPU.

    python benchmarks/bench_peer.py --data .data/cifar10-jpeg.tar.gz --peer .peer/airbench94.py [--repeats 5]

The peer is a script of the airbench family (cifar10-airbench's airbench94.py or
airbench94_compiled.py), fetched onto the GPU machine for the run only and never committed. It runs
unchanged but for its data: it reads `cifar10/train.pt` and `cifar10/test.pt` (uint8 NHWC images,
labels, class names) from its working directory, which this script writes from the project's own
cache of the same archive, so both sides train and test on the same images. The peer's numbers are
its own printout: test accuracy with its test-time augmentation, and its timed seconds (training
and evaluation, without compile or data upload). The project's are summary.json's, as in
bench_fast.py: first step to final evaluation, with records and the final checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fast import framework_run  # noqa: E402
from common import PY, append_table, spread  # noqa: E402

from cifar_dist.config import load_config  # noqa: E402
from cifar_dist.data import load_dataset  # noqa: E402


def write_peer_data(data: Path, workdir: Path) -> None:
    """The archive as the peer's loader reads it: {'images': uint8 (N, 32, 32, 3), 'labels', 'classes'}."""
    ds = load_dataset(load_config(None, ["data.source=imagefolder", f"data.path={data}"]).data)
    (workdir / "cifar10").mkdir(parents=True)
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        torch.save({"images": x.contiguous(), "labels": y, "classes": ds.classes}, workdir / "cifar10" / f"{split}.pt")


def parse_peer(output: str) -> list[tuple[float, float]]:
    """(test accuracy %, seconds) of each run: the rows the peer prints with epoch 'eval', read by
    the column names of its own header row; its compile warm-up run (run 'warmup') is left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in output.splitlines()
            if line.startswith("|")]
    header = next(r for r in rows if "tta_val_acc" in r)
    run, epoch = header.index("run"), header.index("epoch")
    acc, secs = header.index("tta_val_acc"), header.index("total_time_seconds")
    runs, current = [], ""
    for r in rows:
        if r is header or len(r) != len(header):
            continue
        current = r[run] or current  # the peer prints a run's number on its first row only
        if r[epoch] == "eval" and current != "warmup":
            runs.append((100 * float(r[acc]), float(r[secs])))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--peer", type=Path, required=True, help="the speed-run script (not part of this repository)")
    parser.add_argument("--config", default="fast")
    parser.add_argument("--repeats", type=int, default=5, help="project runs (the peer runs as many as it is written to)")
    parser.add_argument("--extra", nargs="*", default=[])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_peer.py needs a CUDA GPU (the peer scripts are CUDA-only)")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "peer"
        write_peer_data(args.data, workdir)
        proc = subprocess.run([PY, str(args.peer.resolve())], cwd=workdir, capture_output=True, text=True)
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        proc.check_returncode()
        peer = parse_peer(proc.stdout)
        ours = []
        for i in range(args.repeats):
            summary, _ = framework_run(args.config, args.data, Path(tmp) / f"r{i}", args.extra + [f"seed={i}"])
            ours.append((100 * summary["test_accuracy"], summary["train_seconds"], summary["compile_seconds"]))
            print(f"project run {i}: {ours[-1][0]:.2f}% in {ours[-1][1]:.2f} s (+{ours[-1][2]:.1f} s compile)", flush=True)

    rows = [[f"{args.peer.name} (peer)", str(len(peer)), f"{statistics.mean(a for a, _ in peer):.2f}",
             spread([a for a, _ in peer], "{:.2f}"), spread([s for _, s in peer], "{:.2f}"), "n/a (not timed by it)"],
            [f"`cifar-dist train --config {args.config}`", str(len(ours)), f"{statistics.mean(a for a, _, _ in ours):.2f}",
             spread([a for a, _, _ in ours], "{:.2f}"), spread([s for _, s, _ in ours], "{:.2f}"),
             spread([c for _, _, c in ours], "{:.1f}")]]
    append_table(
        f"`{args.config}` recipe vs a public speed-run script, one GPU, side by side",
        [f"data: {args.data.name} for both (the peer reads the project's decoded copy)",
         "peer seconds: its own timer (training + its test-time-augmented evaluation, no compile, no upload); "
         "project seconds: summary.json train_seconds (first step to final evaluation, records and checkpoint "
         "included, no compile, no upload)",
         f"project overrides: {' '.join(args.extra) or 'none'}; seeds 0..{len(ours) - 1}"],
        ["side", "runs", "mean test accuracy %", "test accuracy %", "seconds", "compile seconds"], rows)


if __name__ == "__main__":
    main()

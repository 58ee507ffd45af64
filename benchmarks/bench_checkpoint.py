"""Checkpoint save and load times (the full training state: model, optimiser, schedule, RNG)
for the `fast` and `resnet18` nets, through the project's own atomic save and validated load.

    python benchmarks/bench_checkpoint.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_table, spread  # noqa: E402

from cifar_dist import checkpoint  # noqa: E402
from cifar_dist.models import build_model, count_parameters  # noqa: E402


def state_for(name: str) -> dict:
    net = build_model(name)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(torch.randn(8, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers exist, as in a real run
    return {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "ranks": [{"rng": checkpoint.rng_state()}],
            "position": {"step": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in ("fast", "resnet18"):
        state = state_for(name)
        saves, loads = [], []
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp)
            for i in range(args.repeats):
                t = time.perf_counter()
                checkpoint.save(run_dir, i + 1, state, keep=2)
                saves.append(time.perf_counter() - t)
                t = time.perf_counter()
                found = checkpoint.load_latest(run_dir, warn=print)
                loads.append(time.perf_counter() - t)
                assert found is not None and found[0].step == i + 1
            size = (found[0].path / checkpoint.STATE).stat().st_size
        rows.append([name, f"{count_parameters(build_model(name)):,}", f"{size / 2**20:.1f}",
                     spread([s * 1000 for s in saves], "{:.0f}"), spread([s * 1000 for s in loads], "{:.0f}")])
    append_table(
        "Checkpoint save and load (CPU)",
        ["save = write to a temp dir, fsync, rename, sha256 marker, prune; load = find newest, verify size and sha256, "
         "torch.load(weights_only=True)", "state = model + SGD momentum + RNG states (no data)"],
        ["net", "parameters", "file (MiB)", "save ms: median (min-max)", "load ms: median (min-max)"], rows)


if __name__ == "__main__":
    main()

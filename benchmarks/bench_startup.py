"""Start-up and teardown: what a `cifar-dist train --config debug` run costs outside its own training
(wall time minus the train_seconds its summary.json reports: interpreter, imports, data, net, final
checkpoint, model.pt, plots, exit), beside `python -c "import torch"` and beside torch plus one
step of torch.optim's own SGD (its wrappers import torch._dynamo on first use; the project's
optimisers, recipe.SGD and recipe.AdamW, step without them). With --before REF, the same run of
that commit's code too. Every arm runs once per round, in turn, so a loaded machine slows them
alike; the table gives medians (min-max) over the rounds.

    python benchmarks/bench_startup.py [--repeats 5] [--before integ3] [-- key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, append_table, spread  # noqa: E402

IMPORT_TORCH = "import torch"
OPTIM_STEP = ("import torch; p = torch.zeros(1, requires_grad=True); o = torch.optim.SGD([p], lr=0.1); "
              "p.sum().backward(); o.step()")


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of `cmd`, from start to exit."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall


def export(ref: str, into: Path) -> Path:
    """The package as committed at `ref` (git archive), to run in place of this tree's."""
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "cifar_dist"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def commit_of(ref: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ref], capture_output=True, text=True,
                          check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each runs every arm once (default 5)")
    parser.add_argument("--config", default="debug", help="the training config (default debug)")
    parser.add_argument("--before", metavar="REF", help="also time the training run of this commit's code")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the training run")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"this tree": ROOT}
        if args.before:
            trees[f"{args.before} ({commit_of(args.before)})"] = export(args.before, work / "before")
        walls: dict[str, list[float]] = {IMPORT_TORCH: [], OPTIM_STEP: [], **{name: [] for name in trees}}
        trained: dict[str, list[float]] = {name: [] for name in trees}
        for round_ in range(-1, args.repeats):  # round -1: a warm-up (bytecode caches, page cache), not counted
            for arm in walls:
                # PYTHONPATH picks the code; the working directory holds no package of its own.
                env = {**os.environ, "PYTHONPATH": str(trees.get(arm, ROOT))}
                if arm in trees:
                    run_dir = work / f"run-{round_ + 1}-{arm.split()[0]}"
                    cmd = [PY, "-m", "cifar_dist.cli", "train", "--config", args.config, f"run.dir={run_dir}",
                           *args.overrides]
                    wall = timed(cmd, env, work)
                    trained_s = json.loads((run_dir / "summary.json").read_text())["train_seconds"]
                else:
                    wall, trained_s = timed([PY, "-c", arm], env, work), None
                if round_ >= 0:
                    walls[arm].append(wall)
                    if trained_s is not None:
                        trained[arm].append(trained_s)
            if round_ >= 0:
                print(f"round {round_ + 1}/{args.repeats}: "
                      + ", ".join(f"{a[:24]} {w[-1]:.2f} s" for a, w in walls.items()), flush=True)
    load_after = os.getloadavg()
    torch_walls = walls[IMPORT_TORCH]
    rows = [[f'`python -c "{IMPORT_TORCH}"`', spread(torch_walls, "{:.2f}"), "-", spread(torch_walls, "{:.2f}"), "0"],
            ["`import torch` + one torch.optim SGD step", spread(walls[OPTIM_STEP], "{:.2f}"), "-",
             spread(walls[OPTIM_STEP], "{:.2f}"),
             spread([w - t for w, t in zip(walls[OPTIM_STEP], torch_walls)], "{:+.2f}")]]
    for name in trees:
        outside = [w - t for w, t in zip(walls[name], trained[name])]
        rows.append([f"`train --config {args.config}`, {name}", spread(walls[name], "{:.2f}"),
                     spread(trained[name], "{:.2f}"), spread(outside, "{:.2f}"),
                     spread([o - t for o, t in zip(outside, torch_walls)], "{:+.2f}")])
    cores = os.cpu_count() or 1
    loaded = max(load_before[0], load_after[0]) > 0.5 * cores
    append_table(
        f"Start-up and teardown: `cifar-dist train --config {args.config}` outside its training",
        [f"{args.repeats} rounds, each running every arm once in turn; overrides: {' '.join(args.overrides) or 'none'}",
         "training = summary.json's train_seconds (the loop: steps and evaluations); outside = wall - training "
         "(interpreter, imports, data, net and optimiser, final checkpoint, model.pt, plots, exit)",
         "vs import torch: outside minus the same round's `import torch` wall time",
         "`import torch` + one torch.optim SGD step: torch.optim's wrappers import torch._dynamo (with sympy and "
         "torch.distributed.tensor) on first use; what a run would pay with torch.optim's own classes "
         "(the project's recipe.SGD/AdamW step without those wrappers)",
         "load average (1, 5, 15 min) at start " + ", ".join(f"{v:.2f}" for v in load_before) + "; at end "
         + ", ".join(f"{v:.2f}" for v in load_after) + f"; {cores} cores"
         + (": a shared, loaded machine, so every number is inflated and noisy" if loaded else ""),
         "goal (issue 32): outside at most +0.75 s over `import torch`"],
        ["command", "wall s", "training s", "outside s", "vs import torch s"], rows)


if __name__ == "__main__":
    main()

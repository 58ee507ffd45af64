"""The `fast` recipe on a GPU: accuracy and training time over repeated runs, the framework's
per-step overhead against a bare loop of the same compiled step, and (with --peer) a public
speed-run script run side by side on the same data.

    python benchmarks/bench_fast.py --data .data/cifar10-jpeg.tar.gz [--repeats 5] [--config fast] \\
        [--peer .peer/airbench94.py]

Training time is summary.json's `train_seconds`: first step to final evaluation, with the
framework's records and final checkpoint, without process start-up, data upload and compile
(`compile_seconds`, reported apart).

The peer is a script of the airbench family (cifar10-airbench's legacy/airbench94.py or
airbench94_compiled.py), fetched onto the GPU machine for the run only and never committed. It runs
unchanged but for its data: it reads `cifar10/train.pt` and `cifar10/test.pt` (uint8 NHWC images,
labels, class names) from its working directory, which this script writes from the project's own
cache of the same archive, so both sides train and test on the same images. Its numbers are its
own printout: test accuracy with its test-time augmentation, and its timed seconds (training and
evaluation, without compile or data upload). It runs after the project's runs, so that a peer
that fails costs the table only its own row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, ROOT, append_table, spread  # noqa: E402

from cifar_dist.rundir import RunDir


def overrides(data: Path, extra: list[str]) -> list[str]:
    """The key=value overrides of every run here: the archive, then the caller's."""
    return ["data.source=imagefolder", f"data.path={data}", *extra]


def framework_run(config: str, data: Path, run_dir: Path, extra: list[str]) -> tuple[dict, list[dict]]:
    subprocess.run([PY, "-m", "cifar_dist.train", "--config", config, f"run.dir={run_dir}", "run.progress=none",
                    *overrides(data, extra)], check=True, cwd=ROOT)
    summary = RunDir(run_dir).summary()
    records = RunDir(run_dir).metrics()
    return summary, records


def bare_step_seconds(config: str, data: Path, extra: list[str], steps: int) -> float:
    """Seconds per step of the recipe's step (the same step function, and Lookahead's pulls) in a
    bare loop: no records, no checkpoint checks, no DDP wrapper."""
    from cifar_dist.config import load_config
    from cifar_dist.data import TrainBatches, load_dataset
    from cifar_dist.precision import autocast_context
    from cifar_dist.recipe import Lookahead, make_net, make_optimizer, make_step

    cfg = load_config(config, overrides(data, extra))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: to try the script out
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    ds = load_dataset(cfg.data).to(device)
    batches = TrainBatches(ds.train_x, ds.train_y, cfg.data, global_batch=cfg.train.batch_size, rank=0, world=1,
                           seed=cfg.seed, memory_format=torch.channels_last, stats=ds.stats)
    net = make_net(cfg, ds.train_x, len(ds.classes), torch.channels_last, stats=ds.stats)
    optimizer, scheduler = make_optimizer(cfg, net, batches.steps_per_epoch, 10**6)
    step = make_step(cfg, net, optimizer, scheduler, autocast_context(cfg.train.precision, device))
    lookahead = Lookahead(net, cfg.train.lookahead_every, 10**6)
    for s in range(10):
        step(*batches.batch(0, s % batches.steps_per_epoch))
    sync()
    t = time.perf_counter()
    for s in range(steps):
        step(*batches.batch(1 + s // batches.steps_per_epoch, s % batches.steps_per_epoch))
        lookahead.after(s + 1)
    sync()
    return (time.perf_counter() - t) / steps


def write_peer_data(config: str, data: Path, extra: list[str], workdir: Path) -> None:
    """The project's decoded data as the peer's loader reads it: {'images': uint8 (N, 32, 32, 3), 'labels', 'classes'}."""
    from cifar_dist.config import load_config
    from cifar_dist.data import load_dataset

    ds = load_dataset(load_config(config, overrides(data, extra)).data)
    (workdir / "cifar10").mkdir(parents=True)
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        torch.save({"images": x.contiguous(), "labels": y, "classes": ds.classes}, workdir / "cifar10" / f"{split}.pt")


def parse_peer(output: str) -> list[tuple[float, float]]:
    """(test accuracy %, seconds) of each run: the rows the peer prints with epoch 'eval', read by
    the column names of its own header row; its compile warm-up run (run 'warmup') is left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in output.splitlines()
            if line.startswith("|")]
    header = next((r for r in rows if "tta_val_acc" in r), None)
    if header is None:
        return []
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


def peer_row(peer: Path, config: str, data: Path, extra: list[str], timeout: float | None) -> list[str]:
    """The peer's table row. Past `timeout` seconds it is stopped and the runs it finished are kept
    (it runs 25 by default), so that a slow peer cannot cost the whole benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        write_peer_data(config, data, extra, Path(tmp))
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # its rows so far are readable if it is stopped
        try:
            proc = subprocess.run([PY, str(peer.resolve())], cwd=tmp, capture_output=True, text=True, env=env,
                                  timeout=timeout)
            out, err, stopped = proc.stdout, proc.stderr, False
            problem = f"exit {proc.returncode}" if proc.returncode else ""
        except subprocess.TimeoutExpired as e:  # its captured output is bytes whatever text= says
            out, err = (b.decode(errors="replace") if isinstance(b, bytes) else b or "" for b in (e.stdout, e.stderr))
            stopped, problem = True, f"stopped after {timeout:.0f} s"
    print(out[-4000:], err[-2000:], flush=True)
    runs = parse_peer(out)
    if not runs or (problem and not stopped):
        last = (err.strip() or out.strip() or "no output").splitlines()[-1]
        return [f"{peer.name} (peer)", f"failed ({problem or 'no result rows'}, {len(runs)} runs read): {last[:120]}",
                "", "", "", "", "", ""]
    accs, secs = [a for a, _ in runs], [s for _, s in runs]
    name = f"{peer.name} (peer, {problem})" if stopped else f"{peer.name} (peer)"
    return [name, str(len(runs)), f"{statistics.mean(accs):.2f}", spread(accs, "{:.2f}"), spread(secs, "{:.2f}"),
            "n/a (not timed by it)", "n/a", "n/a"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", default="fast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="run i has seed first_seed + i")
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--bare-steps", type=int, default=200, help="steps of the bare loop timed")
    parser.add_argument("--peer", type=Path, help="a speed-run script to run beside (not part of this repository)")
    parser.add_argument("--peer-timeout", type=float, help="seconds; past them the peer is stopped, its finished runs kept")
    args = parser.parse_args()
    if args.peer and not args.peer.is_file():
        sys.exit(f"error: --peer {args.peer}: no such file")
    accs, secs, compiles, step_secs = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            seed = [f"seed={args.first_seed + i}"]
            summary, records = framework_run(args.config, args.data, Path(tmp) / f"r{i}", args.extra + seed)
            accs.append(100 * summary["test_accuracy"])
            secs.append(summary["train_seconds"])
            compiles.append(summary["compile_seconds"])
            last_train = [r for r in records if "train_loss" in r][-1]
            step_secs.append(last_train["time"] / last_train["step"])
            print(f"run {i}: {accs[-1]:.2f}% in {secs[-1]:.2f} s (+{compiles[-1]:.1f} s compile)", flush=True)
    bare = bare_step_seconds(args.config, args.data, args.extra, steps=args.bare_steps)
    overhead = [100 * (s / bare - 1) for s in step_secs]
    rows = [[f"`cifar-dist train --config {args.config}`", str(len(accs)), f"{statistics.mean(accs):.2f}",
             spread(accs, "{:.2f}"), spread(secs, "{:.2f}"), spread(compiles, "{:.1f}"),
             spread([1000 * s for s in step_secs], "{:.2f}"), spread(overhead, "{:.1f}%")]]
    if args.peer:
        rows.append(peer_row(args.peer, args.config, args.data, args.extra, args.peer_timeout))
    append_table(
        f"`{args.config}` recipe on {'one GPU' if torch.cuda.is_available() else 'the CPU'}: accuracy and time",
        [f"data: {args.data.name}; `cifar-dist train --config {args.config}` {' '.join(args.extra)}; "
         f"seeds {args.first_seed}..{args.first_seed + len(accs) - 1}",
         "seconds: the project's summary.json train_seconds (first step to final evaluation, records and final "
         "checkpoint included; no process start-up, data upload or compile)"
         + ("; the peer's its own timer (training and its test-time-augmented evaluation; no compile, no upload), "
            "on the project's decoded copy of the same data" if args.peer else ""),
         f"bare loop of the same step: {1000 * bare:.2f} ms/step; framework overhead = framework ms/step / bare - 1"],
        ["side", "runs", "mean test accuracy %", "test accuracy %", "train seconds", "compile seconds", "ms/step",
         "framework overhead"], rows)


if __name__ == "__main__":
    main()

"""Shared by the benchmark scripts: the machine, package versions, statistics, and the table
appended to benchmarks/RESULTS.md (append-only: earlier measurements stay as they were)."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from cifar_dist.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
# CIFAR_DIST_RESULTS: another file, for trying a script out without touching the record.
RESULTS = Path(os.environ.get("CIFAR_DIST_RESULTS", ROOT / "benchmarks" / "RESULTS.md"))
PY = sys.executable


def train_launcher(ranks: int) -> list[str]:
    """`python -m cifar_dist.train` for one rank, under torchrun (free port) for several."""
    if ranks == 1:
        return [PY, "-m", "cifar_dist.train"]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "localhost:0", "-m", "cifar_dist.train"]


def run_training(config: str, ranks: int, overrides: list[str], run_dir: Path) -> dict:
    """One `cifar-dist train` run on `ranks` ranks sharing the machine's cores (threads split evenly
    among them): its summary.json with the command's wall seconds added."""
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    start = time.perf_counter()
    subprocess.run([*train_launcher(ranks), "--config", config, *overrides, f"run.dir={run_dir}", "run.progress=none"],
                   check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=threads))
    return {**RunDir(run_dir).summary(), "wall_seconds": time.perf_counter() - start}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    info = Path("/proc/cpuinfo")
    if info.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    extra = ""
    try:
        import torch

        from cifar_dist.precision import cpu_has_bf16

        # bf16 on a CPU runs ~10x slower without these instructions: a CPU table means little without it.
        extra = f" ({torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if cpu_has_bf16() else 'emulated'})"
        if torch.cuda.is_available():
            extra += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores{extra}"


def versions() -> str:
    out = []
    for name in ("torch", "torchvision", "accelerate", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out.append(f"{name} {metadata.version(name)}")
    return f"Python {platform.python_version()}, " + ", ".join(out)


def git_version() -> str:
    """The commit, marked when tracked files differ from it (the numbers are then not that commit's)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (proc.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """median (min-max, n runs)"""
    if not values:
        return "n/a"
    if len(values) == 1:
        return fmt.format(values[0]) + " (1 run)"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))}, {len(values)} runs)"


def append_table(title: str, notes: list[str], header: list[str], rows: list[list[str]]) -> str:
    lines = [f"## {title}", "", f"- when: {time.strftime('%Y-%m-%d %H:%M %Z')}; code {git_version()}",
             f"- machine: {machine()}", f"- versions: {versions()}", *[f"- {n}" for n in notes], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach section is appended by the script it names; numbers are as measured.\n\n")
    with open(RESULTS, "a") as f:
        f.write(text)
    print(text)
    return text

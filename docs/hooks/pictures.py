"""MkDocs hook: the pages' pictures, made by the commands they illustrate, at build time.

Two short runs of the `debug` config on the synthetic source (a learnable set the package makes
itself) with two learning rates, then `cifar-dist compare` on them; `cifar-dist data show` on the
same data; and a six-trial search of `train.lr` (SEARCH, run in this process by the sweep's debug
executor: no Slurm) and `compare` on its sweep dir. The plots in the pages are what these
commands draw today. Two to three minutes on two CPU cores; made once per build process (`mkdocs
serve` reuses them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DATA = ["--config", "debug", "data.synthetic_train=2048", "data.synthetic_test=500"]
RUNS = {"lr-0.02": "train.lr=0.02", "lr-0.2": "train.lr=0.2"}
SEARCH = """name: docs-search
cluster: local
base: debug
overrides: {train.epochs: 2, data.synthetic_train: 2048, data.synthetic_test: 500, eval.every: 1, run.progress: none}
search: {trials: 6, workers: 1, sampler: random, seed: 1, pruner: asha, params: {train.lr: {loguniform: [0.01, 0.5]}}}
resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, time_min: 10}
"""
PICTURES = ("compare_curves.png", "compare_per_class.png", "compare_confusion.png", "data_show.png",
            "search_params.png", "search_curves.png")
_made: Path | None = None


def cifar_dist(*args: str, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "cifar_dist.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"docs pictures: cifar-dist {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def make_pictures() -> Path:
    """A folder holding PICTURES."""
    global _made
    if _made is None:
        work = Path(tempfile.mkdtemp(prefix="cifar-dist-docs-"))
        env = {**os.environ, "CIFAR_DIST_CACHE": str(work / "cache"), "WANDB_MODE": "offline"}
        out = work / "img"
        out.mkdir()
        cifar_dist("data", "show", *DATA, "--out", str(out / "data_show.png"), "--per-class", "6", cwd=work, env=env)
        for name, override in RUNS.items():
            cifar_dist("train", *DATA, override, "train.epochs=3", f"run.dir=runs/{name}", "run.progress=none",
                       cwd=work, env=env)
        cifar_dist("compare", *(f"runs/{name}" for name in RUNS), "--out", str(out), cwd=work, env=env)
        (work / "search.yaml").write_text(SEARCH)
        cifar_dist("sweep", "search.yaml", "--executor", "debug", cwd=work, env=env)
        cifar_dist("compare", "sweeps/docs-search", "--out", "search", cwd=work, env=env)
        (work / "search" / "compare_params.png").rename(out / "search_params.png")
        (work / "search" / "compare_curves.png").rename(out / "search_curves.png")
        _made = out
    return _made


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    folder = make_pictures()
    for name in PICTURES:
        files.append(File.generated(config, f"img/{name}", abs_src_path=str(folder / name)))
    return files

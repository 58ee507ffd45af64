"""MkDocs hook: the pages' pictures, made by the commands they illustrate, at build time.

Two short runs of the `debug` config on the synthetic source (a learnable set the package makes
itself) with two learning rates, then `cifar-dist compare` on them; `cifar-dist data show` on the
same data; and a six-trial search of `train.lr` (SEARCH, run in this process by the sweep's debug
executor: no Slurm) and `compare` on its sweep dir; `cifar-dist serve` on the second run, its
upload page shown by headless Chromium with one image picked. The plots in the pages are what these
commands draw today. Two to three minutes on two CPU cores; made once per build process (`mkdocs
serve` reuses them).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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
            "search_params.png", "search_curves.png", "serve_page.png")
CHROMIUM = Path("/usr/bin/chromium")  # Debian's (`make browser-packages`), driven by playwright
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
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # kept while this build or `mkdocs serve` runs
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
        serve_page(work / "runs" / "lr-0.2", out / "serve_page.png", cwd=work, env=env)
        _made = out
    return _made


def serve_page(run: Path, shot: Path, cwd: Path, env: dict[str, str]) -> None:
    """A screenshot of `cifar-dist serve RUN`'s upload page with one image of the run's data picked."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise RuntimeError(f"docs pictures: the serve page needs {CHROMIUM} (make browser-packages)")
    image = cwd / "picked.png"
    with Image.open(shot.parent / "data_show.png") as grid:  # one picture of `data show`'s grid: an image of the data
        grid.convert("RGB").crop((grid.width // 2 - 48, grid.height // 2 - 48, grid.width // 2 + 48,
                                  grid.height // 2 + 48)).save(image)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "cifar_dist.cli", "serve", str(run), "--port", str(port)], cwd=cwd,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docs pictures: cifar-dist serve {run} did not become ready")
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 800, "height": 560})
                page.goto(url + "/")
                page.set_input_files("#file", str(image))
                page.wait_for_selector("#result li")
                page.screenshot(path=str(shot))
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(30)


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    folder = make_pictures()
    for name in PICTURES:
        files.append(File.generated(config, f"img/{name}", abs_src_path=str(folder / name)))
    return files

"""README.md's commands and what the README tests do with each (RULES): run here, run on the dev
cluster, or not run, with the reason; and a copy of the checkout holding what the README assumes a
user has (tests/e2e/test_readme.py and tests/slurm/test_readme.py run the commands in it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from PIL import Image

from tests.helpers import PY, ROOT
from tests.helpers.data import CIFAR10_CLASSES, write_cifar100, write_cifar_pickles, write_image_tree

LOCAL, SLURM = "run here", "run on the dev cluster"
# (the start of a command, what the README tests do with it): first match wins.
RULES = [
    ("make test", "not run: it is the test suite that runs this test (CI runs it through .ci/run)"),
    ("make train", LOCAL),
    ("accelerate launch --multi_gpu --num_processes 4", "not run: 4 GPUs (on a CPU: 4 compiles of the fast net)"),
    ("srun ", SLURM),
    ("python jobs/submit.py", SLURM),
    ("python benchmarks/", "not run: the real archive and an hour of CPU (benchmarks record their tables)"),
    ("cifar-dist serve ", "not run: a server runs until it is stopped (tests/test_serve.py and test_export.py start it)"),
    ("curl ", "not run: it needs the server above (tests/test_serve.py sends the same requests)"),
    ("cifar-dist ", LOCAL),
    ("python -m cifar_dist.", LOCAL),
    ("torchrun ", LOCAL),
]


def readme_commands() -> list[str]:
    """The commands of README.md's bash blocks: continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command:
                commands.append(" ".join(command.split()))
    return commands


def rule(command: str) -> str:
    return next(what for start, what in RULES if command.startswith(start))


def readme_yaml(name: str) -> str:
    """The README's yaml block that starts with `name: ...` (the sweep spec)."""
    return next(b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                if b.startswith(f"name: {name}"))


def make_checkout(root: Path) -> Path:
    """A copy of the checkout at `root` with what the README's commands expect a user to have."""
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "sweeps", "__pycache__", "*.egg-info",
                                                               ".pytest_cache", ".ruff_cache", ".data", ".peer"))
    images = root / "jpeg-src" / "cifar10-jpeg"
    write_image_tree(images, CIFAR10_CLASSES, {"train": 30, "test": 5})
    with tarfile.open(root / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(images, arcname="cifar10-jpeg")
    shutil.rmtree(root / "jpeg-src")
    write_cifar_pickles(root / "data", n_per_batch=60)  # the shipped configs' data.path: data (300 training images)
    write_cifar100(root / "data")  # the cifar100 config's, beside it (300 training images)
    (root / "my.yaml").write_text("model: {name: blitz}\ndata: {source: synthetic, synthetic_train: 640, "
                                  "synthetic_test: 200}\ntrain: {batch_size: 64}\n")
    Image.new("RGB", (48, 40), (200, 40, 40)).save(root / "photo.jpg")
    (root / "more_images").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40, 90 * i, 200)).save(root / "more_images" / f"{i}.png")
    (root / "sweep.yaml").write_text(readme_yaml("lr-sweep"))
    return root


def user_env(root) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    venv_bin = os.path.dirname(PY)  # `cifar-dist`, `python`, `torchrun` as the set-up installed them
    env.update(PATH=f"{venv_bin}:{env['PATH']}", CIFAR_DIST_CACHE=str(root / ".cache"), WANDB_MODE="offline",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def run_as_printed(command: str, root, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(command.split(), cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc

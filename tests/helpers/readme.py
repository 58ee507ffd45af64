"""The commands of README.md and the docs pages (docs/*.md, in the site's order) and what the README
tests do with each (RULES): run here, run on the dev cluster, or not run, with the reason; and a
copy of the checkout holding what those pages assume a user has (tests/e2e/test_readme.py and
tests/slurm/test_readme.py run the commands in it)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path

import yaml
from PIL import Image

from tests.helpers import PY, ROOT
from tests.helpers.data import CIFAR10_CLASSES, write_cifar100, write_cifar_pickles, write_image_tree

LOCAL, SLURM = "run here", "run on the dev cluster"
# (the start of a command, what the README tests do with it): first match wins.
RULES = [
    ("make test", "not run: it is the test suite that runs this test (CI runs it through .ci/run)"),
    ("make docs", "not run: CI builds the site strictly (.ci/run); tests/unit/test_docs_reference.py checks its references"),
    ("make train", LOCAL),
    ("pip install ", "not run: `make setup` installs the package; tests/e2e/test_packaging.py installs it in a fresh virtualenv"),
    ("accelerate launch --multi_gpu --num_processes 4", "not run: 4 GPUs (on a CPU: 4 compiles of the fast net)"),
    ("srun ", SLURM),
    ("sbatch --nodes 2 --gpus-per-node 8", "not run: two nodes of 8 GPUs each"),
    ("sbatch ", "not run: tests/slurm/test_launch.py submits slurm/train.sbatch and pre-empts it on the dev cluster"),
    ("LAUNCHER=torchrun sbatch ", "not run: tests/slurm/test_launch.py runs each LAUNCHER on the dev cluster"),
    ("slurm/dev-cluster.sh ", "not run: the Slurm tests start and stop the dev cluster themselves (tests/helpers/slurm.py)"),
    ("python jobs/submit.py search.yaml", "not run: a 32-trial study of 12-epoch runs; tests/e2e/test_search.py and "
                                          "tests/slurm/test_search_slurm.py run small studies"),
    ("python jobs/submit.py status sweeps/lr-search", "not run: it needs the study above"),
    ("python jobs/submit.py resubmit sweeps/lr-search", "not run: it needs the study above"),
    ("cifar-dist compare sweeps/lr-search", "not run: it needs the study above (tests/e2e/test_search.py compares a study)"),
    ("optuna-dashboard ", "not run: a server that runs until stopped, not installed by make setup"),
    ("python slurm/check_dashboard.py", "not run: it needs optuna-dashboard and the study above"),
    ("python jobs/submit.py", SLURM),
    ("cifar-dist sweep -m ", "not run: it submits four trainings; the --dry-run before it makes the same points"),
    ("python benchmarks/", "not run: the real archive and an hour of CPU (benchmarks record their tables)"),
    ("cifar-dist serve ", "not run: a server runs until it is stopped (tests/e2e/test_serve.py and test_export.py start it)"),
    ("curl ", "not run: it needs the server above (tests/e2e/test_serve.py sends the same requests)"),
    ("pkill ", "not run: it signals every training process on the machine, the other test worker's too "
               "(tests/e2e/test_launch.py sends it to one run's processes)"),
    ("cifar-dist ", LOCAL),
    ("python -m cifar_dist.", LOCAL),
    ("torchrun ", LOCAL),
]
DOCS_SITE = ROOT / "mkdocs.yml"


def doc_files() -> list[Path]:
    """README.md, then the docs pages in the order the site lists them (the generated references have no file)."""
    def pages(nav: list) -> list[str]:
        return [p for item in nav for v in item.values() for p in (pages(v) if isinstance(v, list) else [v])]

    nav = yaml.safe_load(DOCS_SITE.read_text())["nav"]
    return [ROOT / "README.md", *(ROOT / "docs" / p for p in pages(nav) if (ROOT / "docs" / p).is_file())]


def readme_commands() -> list[str]:
    """The commands of the bash blocks of README.md and the docs pages, in order: continuation lines
    joined, comments dropped."""
    text = "\n".join(f.read_text() for f in doc_files())
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
    """The first yaml block of the README and docs pages that starts with `name: ...` (a sweep spec)."""
    text = "\n".join(f.read_text() for f in doc_files())
    return next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith(f"name: {name}"))


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
    """The command split as a shell splits it (quotes kept together, never through a shell), its
    stdout written to the file after a trailing `> FILE`."""
    words, out = shlex.split(command), None
    if len(words) > 2 and words[-2] == ">":
        words, out = words[:-2], Path(root) / words[-1]
    proc = subprocess.run(words, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if out is not None:
        out.write_text(proc.stdout)
    return proc

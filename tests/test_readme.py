"""README.md's commands, run exactly as printed, in the order printed, in a copy of the checkout
(`cifar_dist/train.py`, `jobs/submit.py` and `runs/...` are paths relative to it). The copy holds
what the README assumes a user has: `cifar10-jpeg.tar.gz`, `data/cifar-10-batches-py/` and
`data/cifar-100-python/` (small files in the real formats: the real archives are not there in CI), `my.yaml`, `photo.jpg`,
`more_images/`, the README's own `sweep.yaml`, and the runs the README names (`runs/my-run`,
`runs/a`, `runs/b`). Every command of the README is in RULES: run here, run on the dev cluster,
or not run, with the reason; a command added to the README without a rule fails this test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile

import pytest
from conftest import PY, ROOT, write_image_tree
from PIL import Image
from slurm_fixtures import cluster_skip_reason, dev_cluster
from test_cifar100 import write_cifar100
from test_data import write_cifar_pickles

from cifar_dist.rundir import SUMMARY, RunDir

LOCAL, SLURM = "run here", "run on the dev cluster"
# (the start of a command, what this test does with it): first match wins.
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
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the checkout with what the README's commands expect a user to have."""
    root = tmp_path_factory.mktemp("readme") / "cifar-dist"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "sweeps", "__pycache__", "*.egg-info",
                                                               ".pytest_cache", ".ruff_cache", ".data", ".peer"))
    images = root / "jpeg-src" / "cifar10-jpeg"
    write_image_tree(images, CLASSES, {"train": 30, "test": 5})
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


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert len(commands) >= 20
    assert [c for c in commands if not any(c.startswith(start) for start, _ in RULES)] == []


def test_readme_commands_run_as_printed(checkout):
    env = user_env(checkout)
    # The runs the README's later commands name, made the way a user would have made them.
    for name in ("runs/my-run", "runs/a", "runs/b", "sweeps/lr-sweep/runs/000"):  # compare also takes a sweep dir
        subprocess.run([PY, "-m", "cifar_dist.train", "--config", "debug", "train.epochs=1", f"run.dir={name}"],
                       cwd=checkout, env=env, check=True, capture_output=True, timeout=300)
    for command in readme_commands():
        if rule(command) == LOCAL:
            if command.startswith("make train"):  # the make target runs in the real checkout, with its venv
                run_as_printed(command, ROOT, env)
            else:
                run_as_printed(command, checkout, env)
    assert RunDir(checkout / "runs" / "my-run").summary()["test_accuracy"] >= 0
    assert (checkout / "eval.json").is_file() and (checkout / "plots" / "compare_curves.png").is_file()


@pytest.mark.slurm
def test_readme_slurm_commands_run_as_printed(checkout, tmp_path):
    if reason := cluster_skip_reason(1):
        pytest.skip(reason)
    shutil.rmtree(checkout / "sweeps", ignore_errors=True)
    with dev_cluster(1) as conf:
        env = {**user_env(checkout), **conf}  # SLURM_CONF: what a real cluster's /etc/slurm gives its users
        for command in readme_commands():
            if rule(command) == SLURM:
                run_as_printed(command, checkout, env)
    runs = sorted((checkout / "sweeps" / "lr-sweep" / "runs").iterdir())
    assert len(runs) == 4 and all((r / SUMMARY).is_file() for r in runs)

"""A plain `pip install .` (not editable) into a fresh virtualenv holds everything the commands
need: the sweep machinery, its shipped cluster profiles and the shipped configs.

The new environment sees this one's third-party packages (torch is not installed again) through
a path line in a .pth file. A path line only adds that folder to sys.path; the .pth files inside
it are not run, so this environment's editable install of the checkout stays out of the new one
(checked below: cifar_dist is not importable there before the install)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from cifar_dist.rundir import RunDir
from tests.helpers import ROOT

SPEC = {"name": "pk", "cluster": "example-gpu", "base": "fast", "sweep": {"grid": {"train.lr": [0.2, 0.4]}},
        "resources": {"nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8, "cpus_per_task": 8, "time_min": 60}}


def run(args: list[str | Path], env: dict[str, str], cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_plain_install_runs_a_sweep_dry_run_and_training(tmp_path, cache_dir):
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    # Nothing of this checkout may leak in: no PYTHONPATH, no active virtualenv.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "venv", "--without-pip", venv], env, tmp_path)
    python, cli = venv / "bin" / "python", venv / "bin" / "cifar-dist"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, work).strip())
    (site / "outer-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    absent = "import importlib.util as u; print(u.find_spec('cifar_dist'))"
    assert run([python, "-c", absent], env, work).strip() == "None", "the outer editable install leaked in"

    # pip, setuptools and the dependencies come from the outer environment: offline, no build isolation.
    # A copy of the sources: building writes build/ and *.egg-info beside them.
    src = tmp_path / "src"
    shutil.copytree(ROOT / "cifar_dist", src / "cifar_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed", "--no-index",
         src], env, work)
    where = run([python, "-c", "import cifar_dist, importlib.metadata as m; print(cifar_dist.__file__); "
                 "print(sorted({str(f).split('/')[0] for f in m.distribution('cifar-dist').files}))"], env, work)
    module, top = where.splitlines()
    assert Path(module).is_relative_to(site), f"not the installed copy: {module}"
    assert "jobs" not in top, f"jobs/ must not be installed as a top-level package: {top}"

    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    out = run([cli, "sweep", spec, "--dry-run", "--executor", "slurm"], env, work)
    assert "#SBATCH --array=0-1" in out and "#SBATCH --account=my-lab" in out and "module load cuda/12.4" in out, out
    spec.write_text(yaml.safe_dump({**SPEC, "cluster": "local", "resources": {}}))
    out = run([cli, "sweep", spec, "--dry-run", "--executor", "local"], env, work)
    assert "cluster profile local, executor local" in out and "(executor local: no sbatch script" in out, out
    assert sorted(p.name for p in work.iterdir()) == ["spec.yaml"], "a dry run writes nothing"

    run_dir = tmp_path / "run"
    run([cli, "train", "--config", "debug", f"run.dir={run_dir}", "train.epochs=1", "train.warmup_epochs=0.5",
         "run.progress=none"], {**env, "CIFAR_DIST_CACHE": str(cache_dir), "WANDB_MODE": "offline"}, work)
    assert "test_accuracy" in RunDir(run_dir).summary()

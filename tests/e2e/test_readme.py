"""The commands of README.md and the docs pages (docs/*.md), run exactly as printed, in the order
printed (a command printed twice runs once), in a copy of the checkout
(`cifar_dist/train.py`, `jobs/submit.py` and `runs/...` are paths relative to it). The copy holds
what the README assumes a user has: `cifar10-jpeg.tar.gz`, `data/cifar-10-batches-py/` and
`data/cifar-100-python/` (small files in the real formats: the real archives are not there in CI),
`my.yaml`, `photo.jpg`, `more_images/`, the README's own `sweep.yaml`, and the runs the README
names (`runs/my-run`, `runs/a`, `runs/b`). Every command of the pages is in RULES
(tests/helpers/readme.py): run here, run on the dev cluster (tests/slurm/test_readme.py), or not
run, with the reason; a command added to a page without a rule fails this test."""

from __future__ import annotations

import subprocess

import pytest

from cifar_dist.rundir import RunDir
from tests.helpers import PY, ROOT
from tests.helpers.readme import LOCAL, RULES, make_checkout, readme_commands, rule, run_as_printed, user_env


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return make_checkout(tmp_path_factory.mktemp("readme") / "cifar-dist")


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
    for command in dict.fromkeys(readme_commands()):  # each distinct command once, in order
        if rule(command) == LOCAL:
            if command.startswith("make train"):  # the make target runs in the real checkout, with its venv
                run_as_printed(command, ROOT, env)
            else:
                run_as_printed(command, checkout, env)
    assert RunDir(checkout / "runs" / "my-run").summary()["test_accuracy"] >= 0
    assert (checkout / "eval.json").is_file() and (checkout / "plots" / "compare_curves.png").is_file()

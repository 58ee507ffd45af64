"""The Slurm commands of README.md and the docs pages, run exactly as printed, in the order printed,
on the dev cluster, in a copy of the checkout holding what the pages assume a user has
(tests/helpers/readme.py). The other commands: tests/e2e/test_readme.py."""

from __future__ import annotations

import shutil

import pytest

from cifar_dist.rundir import SUMMARY
from tests.helpers.readme import SLURM, make_checkout, readme_commands, rule, run_as_printed, user_env
from tests.helpers.slurm import cluster_skip_reason, dev_cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return make_checkout(tmp_path_factory.mktemp("readme") / "cifar-dist")


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

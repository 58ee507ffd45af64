"""The executor seam (cifar_dist/sweep/executors.py): every executor answers the same methods, and
the ones that need no Slurm submit, report their queue and cancel through them. The Slurm one is
exercised on the real dev cluster by tests/slurm/test_slurm.py and tests/slurm/test_multinode.py."""

from __future__ import annotations

import functools
import time

import pytest

from cifar_dist.errors import ConfigError
from cifar_dist.sweep.executors import EXECUTORS, Executor
from cifar_dist.sweep.profiles import load_profile
from cifar_dist.sweep.resources import Resources


def public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_every_executor_is_the_same_interface():
    assert list(EXECUTORS) == ["slurm", "local", "debug"]
    for name, cls in EXECUTORS.items():
        assert cls.name == name and issubclass(cls, Executor)
        assert public(cls) == public(Executor) | {"name"}, f"{name}: commands may only call the Executor interface"


@pytest.mark.parametrize("name", list(EXECUTORS))
def test_checks_and_texts(name, tmp_path):
    ex = EXECUTORS[name](tmp_path / "sw", load_profile("example-gpu"))
    ex.check(Resources())
    assert ex.where(2) and ex.preview("x", Resources(array_parallelism=2), 3).endswith("\n")
    if name == "slurm":
        ex.check(Resources(nodes=2, tasks_per_node=8))
        assert "#SBATCH --array=0-2%2" in ex.preview("x", Resources(array_parallelism=2), 3)
        assert ex.run_slots(Resources()) == 0, "Slurm decides what runs"
        return
    with pytest.raises(ConfigError, match=f"resources.nodes: 2 nodes need Slurm; the {name} executor"):
        ex.check(Resources(nodes=2))
    assert ex.queue_states([]) == {}


def test_local_executor_submits_reports_and_cancels(tmp_path):
    ex = EXECUTORS["local"](tmp_path / "sw", load_profile("local"))
    assert ex.run_slots(Resources(array_parallelism=3)) == 3
    [job] = ex.submit("x", Resources(time_min=2), [functools.partial(time.sleep, 60)])
    job_id = str(job.job_id)
    assert ex.queue_states([job_id, "999999999"]) == {job_id: "pending"}, "alive, no run slot taken"
    ex.cancel([job_id])
    deadline = time.monotonic() + 30
    while ex.queue_states([job_id]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ex.queue_states([job_id]) == {}


def test_debug_executor_runs_its_jobs_at_finish(tmp_path):
    ex = EXECUTORS["debug"](tmp_path / "sw", load_profile("local"))
    with pytest.raises(ConfigError, match="resources.tasks_per_node"):
        ex.check(Resources(tasks_per_node=2))
    jobs = ex.submit("x", Resources(), [functools.partial(dict, point=0), functools.partial(dict, point=1)])
    assert ex.queue_states([str(j.job_id) for j in jobs]) == {}
    ex.finish(jobs)
    assert [j.result() for j in jobs] == [{"point": 0}, {"point": 1}]

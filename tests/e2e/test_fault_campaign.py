"""A seeded slice of the fault campaign (benchmarks/fault_campaign.py, issue #16): 8 trials, every
non-Slurm kind at least once (a signal or SIGKILL in a step, an evaluation, a checkpoint write or
data decoding; a damaged checkpoint; one of 2 gloo ranks killed). Each ends identical to the
uninterrupted run. A failure names the trial; `--seed 16 --only N` reruns it alone. And one trial of
each storage kind (issue #28, as root): the run dir removed, the disk full, the run dir read-only,
each refused in one line, then finished identical once the fault is undone."""

from __future__ import annotations

import os
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from fault_campaign import KINDS, STORAGE_KINDS, campaign  # noqa: E402

SEED, TRIALS = 16, 8


@pytest.mark.slow
def test_a_seeded_slice_of_the_fault_campaign_ends_identical(tmp_path):
    trials = campaign(range(TRIALS), SEED, KINDS, tmp_path, jobs=2)
    assert {t.fault.kind for t in trials} == set(KINDS)
    assert {t.index: t.problems for t in trials if not t.identical} == {}
    assert any(t.redone > 0 for t in trials), "no trial lost work: the slice no longer kills where it should"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs and drops root's rights: run as root")
def test_each_storage_fault_is_refused_in_one_line_and_the_run_then_ends_identical(tmp_path):
    trials = campaign(range(len(STORAGE_KINDS)), SEED, STORAGE_KINDS, tmp_path, jobs=2)
    assert {t.fault.kind for t in trials} == set(STORAGE_KINDS)
    assert {t.index: t.problems for t in trials if not t.identical} == {}
    assert all(t.exit_codes[0] == 2 for t in trials)

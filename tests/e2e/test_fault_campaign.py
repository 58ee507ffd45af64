"""A seeded slice of the fault campaign (benchmarks/fault_campaign.py, issue #16): 8 trials, every
non-Slurm kind at least once (a signal or SIGKILL in a step, an evaluation, a checkpoint write or
data decoding; a damaged checkpoint; one of 2 gloo ranks killed). Each ends identical to the
uninterrupted run. A failure names the trial; `--seed 16 --only N` reruns it alone."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from fault_campaign import KINDS, campaign  # noqa: E402

SEED, TRIALS = 16, 8


@pytest.mark.slow
def test_a_seeded_slice_of_the_fault_campaign_ends_identical(tmp_path):
    trials = campaign(range(TRIALS), SEED, KINDS, tmp_path, jobs=2)
    assert {t.fault.kind for t in trials} == set(KINDS)
    assert {t.index: t.problems for t in trials if not t.identical} == {}
    assert any(t.redone > 0 for t in trials), "no trial lost work: the slice no longer kills where it should"

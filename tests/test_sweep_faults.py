"""The sweep commands under faults, without a cluster: the time-out rule for any time limit, the
sweep dir's record guarded against concurrent commands, results accepted only from the point's
own run and job, and `wait`/`status` riding out an unreachable scheduler. The same on the real
dev cluster: tests/test_slurm.py."""

from __future__ import annotations

import time

import psutil

from cifar_dist.sweep.task import process_age_s, timed_out


def test_a_stop_is_a_time_out_only_within_the_signals_reach_of_the_limit():
    # 5 min limit, signal asked 30 s before it: Slurm sends it from 300 - 30 - 60 (early) = 210 s
    # into the life on; 10 s more for the job's start before this process.
    assert not timed_out(199, 5, 30), "a pre-emption, although submitit counts every signal of a <= 10 min job"
    assert timed_out(200, 5, 30) and timed_out(290, 5, 30)
    assert not timed_out(3 * 3600, 240, 90) and timed_out(240 * 60 - 160, 240, 90)


def test_process_age_is_the_time_since_this_process_started():
    expected = time.time() - psutil.Process().create_time()
    assert abs(process_age_s() - expected) < 1.0

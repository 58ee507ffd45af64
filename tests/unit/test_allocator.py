"""allocator.keep_freed_memory: a CPU training step stops faulting its activations in afresh.
Each arm runs in a process of its own (the setting is process-wide), on this machine's glibc."""

from __future__ import annotations

import pytest

from cifar_dist.allocator import USER_SETTINGS, glibc, keep_freed_memory
from tests.helpers import PY, run

# Training steps of the medium net (forward and backward, batch 64, one thread); prints whether
# the thresholds were set, and the minor page faults per step after 5 steps of warm-up. The
# "give-back" arm pins glibc's thresholds at the values it starts with (128 KiB each): glibc
# raises them by itself after some frees, at moments that depend on the process's history, so
# left alone a process may or may not give its activations back; pinned, it always does.
STEPS = """
import ctypes, resource, sys
import torch
import torch.nn.functional as F
from cifar_dist.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory
from cifar_dist.models import build_model

if sys.argv[1] == "give-back":
    libc = ctypes.CDLL(None)
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) and libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.set_num_threads(1)
net, x, y = build_model("medium"), torch.randn(64, 3, 32, 32), torch.arange(64) % 10
for i in range(25):
    if i == 5:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    F.cross_entropy(net(x), y).backward()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 20)
"""


@pytest.mark.skipif(not glibc(), reason="glibc's malloc only")
def test_kept_freed_memory_ends_the_page_faults_of_each_step(env):
    env = {k: v for k, v in env.items() if k not in USER_SETTINGS}
    (kept_before, given_back), (kept, after) = (run([PY, "-c", STEPS, arm], env).stdout.split()
                                                for arm in ("give-back", "keep"))
    assert kept_before == "False" and kept == "True"
    # Given back, the step's activations are faulted in again: thousands of 4 KiB pages a step
    # (each conv1 output alone is 64 x 32 x 30 x 30 floats, 7.4 MB). Kept, next to none.
    assert float(given_back) > 500
    assert float(after) < float(given_back) / 20


@pytest.mark.parametrize("setting", USER_SETTINGS)
def test_an_allocator_set_in_the_environment_is_left_alone(setting):
    assert keep_freed_memory({setting: "x"}) is False

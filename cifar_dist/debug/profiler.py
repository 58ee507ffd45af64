"""profile.steps=N: where does a step spend its time? torch.profiler over N training steps after
profile.wait steps (its last one the profiler's own warm-up), on rank 0; then the trace and the top
operators by self time are written to run.dir/profile/ and the profiler stops: training goes on
unprofiled. The loop holds it as torchtitan's trainer holds its profiler:

    with maybe_profile(cfg.profile, dist, run_dir, after_step=pos.step) as profiler:
        for x, y in batches:
            step(x, y)
            if profiler:
                profiler.step()

The trace names each step by the run's global step (`ProfilerStep#7` is step 7, resumed or not),
the same numbers the console says.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cifar_dist.config import ProfileConfig
from cifar_dist.distributed import Distributed
from cifar_dist.rundir import OPS, PROFILE_DIR, TRACE, write_atomic

OPS_ROWS = 30  # operators in the table


def maybe_profile(cfg: ProfileConfig, dist: Distributed, run_dir: Path, *,
                  after_step: int) -> contextlib.AbstractContextManager[StepProfiler | None]:
    """A `StepProfiler` for the steps after global step `after_step` when profile.steps > 0, on rank 0;
    else None."""
    if not cfg.steps or not dist.is_main:
        return contextlib.nullcontext()
    return StepProfiler(cfg, device=dist.device, folder=run_dir / PROFILE_DIR, say=dist.print, after_step=after_step)


class StepProfiler:
    """torch.profiler over profile.steps steps; `.step()` after each training step. Leaving the
    block normally writes what was traced if the run ended inside the window; leaving it on an
    exception (a stop signal, an error) stops the profiler and writes nothing."""

    def __init__(self, cfg: ProfileConfig, *, device: torch.device, folder: Path, say: Callable[[str], None],
                 after_step: int):
        cuda = device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        self.cfg, self.folder, self.say = cfg, folder, say
        start = after_step + 1  # the first step the profiler sees
        self.first = start + cfg.wait  # the first traced step
        self.last = self.first + cfg.steps - 1
        self.next = start  # the step running now
        # The schedule counts global steps, from which torch names the trace's steps. The profiler reads its
        # first state at step 0, before it is told to count from `start`: 0 reads as `start`.
        by_global_step = torch.profiler.schedule(skip_first=start, wait=cfg.wait - 1, warmup=1, active=cfg.steps, repeat=1)
        self.prof: torch.profiler.profile | None = torch.profiler.profile(
            activities=activities, schedule=lambda step: by_global_step(max(step, start)), on_trace_ready=self._write)
        self.written = self.discard = False

    def __enter__(self) -> StepProfiler:
        self.say(f"profile: tracing steps {self.first}-{self.last} on rank 0 into {self.folder}/")
        self.prof.step_num = self.next
        self.prof.start()
        return self

    def step(self) -> None:
        """After each training step; past the window the profiler stops."""
        if self.prof is None:
            return
        self.next += 1
        self.prof.step()  # after the window's last step this writes the files (on_trace_ready)
        if self.next > self.last:
            self._stop()

    def __exit__(self, error_type: type[BaseException] | None, *_: Any) -> None:
        if self.prof is None:
            return
        self.discard = error_type is not None
        self._stop()
        if not self.written and not self.discard:
            self.say(f"profile: the run ended before step {self.first}; nothing traced")

    def _stop(self) -> None:
        self.prof.stop()
        self.prof = None

    def _write(self, prof: torch.profiler.profile) -> None:
        if self.discard:
            return
        last = min(self.last, self.next - 1)  # the run may have ended inside the window
        self.folder.mkdir(parents=True, exist_ok=True)
        export = self.folder / f".{TRACE}.export"  # torch writes in place; the run dir's files are written whole
        prof.export_chrome_trace(str(export))
        write_atomic(self.folder / TRACE, export.read_bytes())
        export.unlink()
        table = prof.key_averages().table(sort_by=self.sort, row_limit=OPS_ROWS)
        write_atomic(self.folder / OPS, f"steps {self.first}-{last}, rank 0: top operators by {self.sort}\n{table}\n")
        self.written = True
        self.say(f"profile: steps {self.first}-{last} traced: {self.folder / TRACE} (open in https://ui.perfetto.dev "
                 f"or chrome://tracing); top operators by self time: {self.folder / OPS}")

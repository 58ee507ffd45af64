"""Rank logic in one place: the accelerator, the world-size check, the rank-0 gate, the
collectives the loop needs, and the stop signals (pre-emption, time-out).

The training loop never asks "am I rank 0?": it calls `dist.print`, `dist.main_only`, the
reductions here, and the tracker (a no-op on other ranks).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from cifar_dist.allocator import keep_freed_memory
from cifar_dist.errors import UserError

# A distinct exit code meaning "stopped on a signal after writing a checkpoint: resume me".
# 75 is EX_TEMPFAIL in sysexits.h: a temporary failure, try again later.
EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Ranks waiting for rank 0's disk writes wait on a gloo side group with this long timeout, so a
# slow disk never trips the main group's (NCCL watchdog) timeout; a dead peer still ends the wait
# at once because its socket closes.
WAIT_TIMEOUT = timedelta(hours=2)

T = TypeVar("T")


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C; the run is just as resumable
_stop_requested = False  # set by a stop signal; read at step boundaries
interrupted = False  # the stop came from Ctrl-C (SIGINT) in this process


def install_stop_handlers() -> None:
    """From here on SIGUSR1/SIGUSR2/SIGTERM only set a flag (the loop acts at a step boundary), so a
    signal during start-up (data decoding, compile) is never fatal either: the run then stops with 75.
    The first Ctrl-C does the same (exit 130); a second one aborts at once."""
    def on_signal(signum: int, frame: Any) -> None:
        global _stop_requested, interrupted
        _stop_requested = True
        if signum == signal.SIGINT:
            interrupted = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C raises KeyboardInterrupt

    for sig in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(sig, on_signal)


def slurm_task_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), read from Slurm's own when this process is one of the tasks of a
    multi-task `srun` step; {} otherwise. This is where the Slurm variables are read: `srun -n 2
    python -m cifar_dist.train ...` forms one process group of 2 instead of training 2 copies."""
    env = os.environ if environ is None else environ
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)  # srun sets the SLURM_STEP_* variables; sbatch's shell does not
    if "SLURM_STEP_ID" not in env or tasks < 2:
        return {}
    per_node = _expand_counts(env["SLURM_STEP_TASKS_PER_NODE"])  # "2(x2),1" -> [2, 2, 1]
    job, step = int(env["SLURM_JOB_ID"]), int(env["SLURM_STEP_ID"])
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "LOCAL_WORLD_SIZE": str(per_node[int(env.get("SLURM_NODEID", "0"))]),
        "MASTER_ADDR": first_host(env["SLURM_STEP_NODELIST"]),
        # One port per job step: steps of different jobs may share a node.
        "MASTER_PORT": str(20000 + (job * 16 + step) % 20000),
    }


def check_asked_for(env: Mapping[str, str]) -> None:
    """Refuse a process that was asked for as one of several but started alone, naming what gives
    the N asked for. Called once the launcher's variables are read (WORLD_SIZE absent: no group)."""
    if "WORLD_SIZE" in env:
        return
    if "ACCELERATE_DYNAMO_BACKEND" in env and "MASTER_ADDR" in env:
        # accelerate's one-process launcher sets MASTER_ADDR only when --num_processes (or num_machines) > 1
        raise DistributedError(
            "accelerate launch was asked for several processes (--num_processes, or num_processes in its config) but "
            "started this one alone: without GPUs (or with --cpu, or distributed_type MULTI_CPU) it starts N only with "
            "--multi_gpu --num_processes N, which then train as gloo CPU ranks")
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "SLURM_STEP_ID" not in env:  # the job script's own shell (or salloc's), not a task of a step
        raise DistributedError(
            f"this Slurm job has {tasks} tasks (SLURM_NTASKS={tasks}) but this process was started without srun, so it "
            f"would train alone: start it as `srun python -m cifar_dist.train ...` (one task per rank), or ask for one task")


def launched_world_size(env: Mapping[str, str]) -> int:
    """The number of processes a launcher started (WORLD_SIZE; 1 without one). A WORLD_SIZE that is
    no number, or above 1 without the variables every launcher sets beside it (a value left over in a
    shell, a job script that exports it by hand), is refused: the process group could never form."""
    raw = env.get("WORLD_SIZE", "1")
    if not raw.strip().isdigit() or int(raw) < 1:
        raise DistributedError(f"WORLD_SIZE={raw[:40]!r} is not a number of processes; unset it, or start the ranks "
                               "with torchrun or accelerate launch, which set it")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if int(raw) > 1 and missing:
        raise DistributedError(f"WORLD_SIZE={int(raw)} is set but {', '.join(missing)} not: no launcher started this "
                               "process; start the ranks with torchrun, accelerate launch or srun, or unset WORLD_SIZE")
    return int(raw)


def _expand_counts(counts: str) -> list[int]:
    out: list[int] = []
    for item in counts.split(","):
        n, _, times = item.partition("(x")
        out += [int(n)] * int(times.rstrip(")") or 1)
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ("node[1-2]" -> "node1"), as `scontrol show hostnames` says."""
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.split():
        raise DistributedError(f"srun: cannot read the step's node list {nodelist!r} ({proc.stderr.strip()})")
    return proc.stdout.split()[0]


def gather_mean(group, bucket):  # no annotations: DDP checks them and this module's are strings
    """DDP's gradient average for two gloo ranks (a comm hook: the ProcessGroup or None, a
    GradBucket -> a Future of the averaged bucket): each rank's bucket gathered, then summed in rank
    order and halved on both. Between two ranks an all-gather moves the bytes gloo's ring all-reduce
    moves, in one exchange instead of its chunked rounds: 1.4 ms against 2.5 ms for the `medium`
    net's 680 KB of gradients on a 2-core VM (the all-reduce was a tenth of its step). Halving is
    exact in floating point, so both ranks get the all-reduce's mean bit for bit
    (tests/e2e/test_distributed.py)."""
    grads = bucket.buffer()
    world = tdist.get_world_size(group)
    gathered = torch.empty(world * grads.numel(), dtype=grads.dtype, device=grads.device)
    gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor  # its newer name, where torch has it
    done = gather(gathered, grads, group=group, async_op=True).get_future()
    return done.then(lambda _: torch.sum(gathered.view(world, -1), 0, out=grads).div_(world))


class StopOrSave(NamedTuple):
    """What all ranks agreed at a step boundary (`Distributed.stop_or_save`)."""

    stop: bool  # some rank received a stop signal: checkpoint and exit for requeue
    save: bool  # some rank's checkpoint is due


class DistributedError(UserError):
    """The processes do not form the process group they were launched as."""


class Distributed:
    """This process's place in the job: rank, world size, device, and the collectives."""

    def __init__(self, device: str = "auto"):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        if not torch.cuda.is_available():  # torch's CUDA builds log this when torch.compile (inductor) starts
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
        if "WORLD_SIZE" not in os.environ:  # no launcher: maybe the tasks of one `srun -n N` step
            os.environ.update(slurm_task_environment())
        check_asked_for(os.environ)
        launched = launched_world_size(os.environ)
        if cpu:
            keep_freed_memory()
        if cpu and launched > 1 and "OMP_NUM_THREADS" not in os.environ:
            # N ranks on one machine share its cores; accelerate would warn and pick this itself.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", launched))
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local))
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # Precision and compile are the project's own (precision.py): accelerate must not wrap the
        # forward in autocast or compile it because its launcher's config says so.
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision="no", dynamo_backend="no",
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=30))],
        )
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.local_rank = self.accelerator.local_process_index
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        if launched != self.world:
            raise DistributedError(
                f"launched as {launched} ranks (WORLD_SIZE={launched}) but this process joined a group of "
                f"{self.world}: without GPUs the ranks must be CPU ranks (train.device=cpu or auto, or "
                "ACCELERATE_USE_CPU=1); refusing to train N separate copies"
            )
        if device == "cuda" and self.device.type != "cuda":
            raise DistributedError("train.device=cuda but no CUDA GPU is visible")
        if not self.is_main:
            warnings.filterwarnings("ignore")  # quiet ranks: errors still reach stderr
        self._wait_group = tdist.new_group(backend="gloo", timeout=WAIT_TIMEOUT) if self.world > 1 else None

    # ---- rank-0 gate

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def main_only(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 while the other ranks wait (barrier, long timeout); rank 0's
        exception is raised on rank 0 and the others see its death as a broken barrier."""
        result = fn() if self.is_main else None
        self.wait()
        return result

    def wait(self) -> None:
        if self._wait_group is not None:
            tdist.barrier(group=self._wait_group)

    # ---- collectives (identity at world size 1)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def broadcast(self, obj: T) -> T:
        """Rank 0's value of `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, net: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics (as DDP does at each forward), so that
        evaluation and checkpoints see the same model on every rank."""
        if self.world > 1:
            for buf in net.buffers():
                tdist.broadcast(buf.data, src=0)

    def prepare(self, net: nn.Module, sync_bn: bool) -> nn.Module:
        """The module to train: DDP-wrapped (gradients averaged over ranks) when world > 1."""
        if sync_bn and self.world > 1:
            if self.device.type != "cuda":  # PyTorch's SyncBatchNorm runs on CUDA only
                raise DistributedError("train.sync_bn=true needs CUDA devices; on CPU ranks BatchNorm stays per rank")
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        if self.world == 1:
            # Nothing to wrap. accelerate's prepare would only place the net, after importing
            # torch.distributed.tensor to look for DTensor parameters (0.5 s on a 2-core CPU).
            return net.to(self.device)
        model = self.accelerator.prepare(net)
        if self.world == 2 and tdist.get_backend() == "gloo":
            model.register_comm_hook(None, gather_mean)
        return model

    # ---- stop signals: the handler only sets a flag (install_stop_handlers); the loop acts at a step boundary

    def stop_or_save(self, save_due: bool) -> StopOrSave:
        """What every rank does at this step boundary: stop when any rank has received a stop signal;
        save a checkpoint when any rank's `save_due`. One small all-reduce, on the gloo side group
        with CPU tensors: on GPUs a reduction on the main group would end in a device-to-host read
        each step, stalling the CPU until the GPU drained its queue."""
        if self.world == 1:
            return StopOrSave(_stop_requested, save_due)
        flags = torch.tensor([int(_stop_requested), int(save_due)])
        tdist.all_reduce(flags, op=tdist.ReduceOp.SUM, group=self._wait_group)
        return StopOrSave(bool(flags[0]), bool(flags[1]))

    def stop_requested(self) -> bool:
        """Whether any rank has received a stop signal (every rank gets the same answer)."""
        return self.stop_or_save(save_due=False).stop

    def close(self) -> None:
        if self.world > 1 and tdist.is_initialized():
            self.wait()
            tdist.destroy_process_group()


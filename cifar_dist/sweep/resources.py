"""What a sweep's jobs ask Slurm for: the spec's `resources:` block, its checks, and the rules
that keep a value from becoming more than one sbatch option.

    resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, time_min: 30,
                sbatch: {gres: "gpu:a100:8", exclude: "node[1-3]"}}

`resources.sbatch` options reach sbatch as `#SBATCH` lines, each checked against SBATCH_OPTIONS
and SBATCH_VALUE first. The time limit must leave room for the pre-emption signal's timing
(EARLY_SIGNAL_S, STARTUP_S), and `check_fits` refuses what the cluster profile cannot give.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cifar_dist.errors import ConfigError
from cifar_dist.sweep.profiles import Profile

# Values that end up on #SBATCH lines: Slurm names and constraint expressions, nothing a shell or
# sbatch's own parser could read as more than one value.
SLURM_VALUE = re.compile(r"[A-Za-z0-9_.,:|&*\[\]+-]{1,128}")
# resources.sbatch: the options a spec may pass through to sbatch. Left out: what the sweep sets
# itself (job name, array, output files, nodes, tasks, CPUs, memory, time limit and signal,
# requeue) or reads back (the account, partition, qos and constraint are resources keys).
SBATCH_OPTIONS = ("begin", "comment", "dependency", "exclude", "exclusive", "gpu-bind", "gres", "gres-flags", "hint",
                  "licenses", "mail-type", "mail-user", "network", "nice", "nodelist", "prefer", "reservation",
                  "switches", "tmp", "wckey")
# Their values: one token, as SLURM_VALUE plus @ (mail-user, switches) and = (gres-flags=...).
SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:|&*\[\]+@=-]{1,128}")
# The pre-emption signal's timing. Slurm may send it up to EARLY_SIGNAL_S before the
# signal_delay_s asked for (its event resolution), and a run needs about STARTUP_S (Python,
# torch, data, process group) before it can stop cleanly: a shorter first life dies in start-up.
EARLY_SIGNAL_S = 60
STARTUP_S = 60
PROFILE_KEYS = ("partition", "account", "qos", "constraint")  # resources keys checked against the cluster profile


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # ranks per node: one per GPU, or CPU ranks on CPU nodes
    cpus_per_task: int = 1
    mem: float | None = None  # GB per node; None = the cluster's default
    time_min: int = 60  # the job's time limit, minutes
    array_parallelism: int | None = None  # points running at once; None = submitit's default (256)
    signal_delay_s: int = 90  # USR2 this many seconds before the time limit: time to checkpoint and requeue
    max_timeouts: int = 3  # requeues after a time-out before the point is left stopped (pre-emptions are free)
    partition: str | None = None  # None = the profile's first partition
    account: str | None = None  # None = the profile's account
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict[str, str | int | bool] = field(default_factory=dict)  # more sbatch options (SBATCH_OPTIONS)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def check_resources(r: Resources) -> None:
    """Refuse impossible numbers, a time limit too short for the signal's timing and Slurm values
    that are not one token; the sbatch options are normalised to sbatch's spelling (mail-type)."""
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "array_parallelism"):
        if getattr(r, key) is not None and getattr(r, key) < 1:
            raise ConfigError(f"resources.{key}: must be >= 1, got {getattr(r, key)}")
    for key in ("gpus_per_node", "signal_delay_s", "max_timeouts"):
        if getattr(r, key) < 0:
            raise ConfigError(f"resources.{key}: must be >= 0, got {getattr(r, key)}")
    if r.mem is not None and r.mem <= 0:
        raise ConfigError(f"resources.mem: must be > 0 GB, got {r.mem}")
    before_signal = 60 * r.time_min - r.signal_delay_s
    if before_signal < EARLY_SIGNAL_S + STARTUP_S:
        shortest = math.ceil((r.signal_delay_s + EARLY_SIGNAL_S + STARTUP_S) / 60)
        raise ConfigError(f"resources.time_min: {r.time_min} min leaves {max(before_signal, 0)} s before the signal "
                          f"(signal_delay_s {r.signal_delay_s}), but Slurm may send it {EARLY_SIGNAL_S} s early and a "
                          f"run needs about {STARTUP_S} s to start; give time_min >= {shortest} or a smaller signal_delay_s")
    for key in PROFILE_KEYS:
        value = getattr(r, key)
        if value is not None and not SLURM_VALUE.fullmatch(value):
            raise ConfigError(f"resources.{key}: {value!r} is not a Slurm name (letters, digits and _ . , : | & * [ ] + -)")
    r.sbatch = {_sbatch_option(k): _sbatch_value(k, v) for k, v in r.sbatch.items()}


def _sbatch_option(key: str) -> str:
    name = key.replace("_", "-")
    if name in PROFILE_KEYS:
        raise ConfigError(f"resources.sbatch.{key}: use resources.{name} (checked against the cluster profile)")
    if name not in SBATCH_OPTIONS:
        raise ConfigError(f"resources.sbatch.{key}: not an option a spec may pass to sbatch (allowed: "
                          f"{', '.join(SBATCH_OPTIONS)}; the others are set from resources)")
    return name


def _sbatch_value(key: str, value: str | int | bool) -> str | bool:
    """A flag (true) or one token; anything a shell or sbatch's own parser could split is refused."""
    if value is True:
        return True
    if value is False:
        raise ConfigError(f"resources.sbatch.{key}: false; leave the option out instead")
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"resources.sbatch.{key}: must be >= 0, got {value}")
    if not SBATCH_VALUE.fullmatch(str(value)):
        raise ConfigError(f"resources.sbatch.{key}: {value!r} is not one sbatch value (letters, digits and "
                          "_ . , : | & * [ ] + @ = -)")
    return str(value)


def check_fits(r: Resources, profile: Profile) -> None:
    """Resources that the cluster profile cannot give are refused before submission."""
    prof = f"cluster profile {profile.name!r}"
    if r.nodes > profile.max_nodes:
        raise ConfigError(f"resources.nodes: {r.nodes} nodes, but {prof} allows at most {profile.max_nodes}")
    if r.gpus_per_node > profile.gpus_per_node:
        raise ConfigError(f"resources.gpus_per_node: {r.gpus_per_node}, but {prof} nodes have {profile.gpus_per_node}")
    if r.gpus_per_node and r.tasks_per_node != r.gpus_per_node:
        raise ConfigError(f"resources.tasks_per_node: {r.tasks_per_node}, but must equal gpus_per_node "
                          f"({r.gpus_per_node}): one task per GPU")
    if r.tasks_per_node * r.cpus_per_task > profile.cpus_per_node:
        raise ConfigError(f"resources.cpus_per_task: {r.tasks_per_node} tasks x {r.cpus_per_task} CPUs per node, "
                          f"but {prof} nodes have {profile.cpus_per_node} CPUs")
    if r.mem is not None and profile.mem_per_node_gb and r.mem > profile.mem_per_node_gb:
        raise ConfigError(f"resources.mem: {r.mem:g} GB, but {prof} nodes have {profile.mem_per_node_gb:g} GB")
    if profile.max_time_min and r.time_min > profile.max_time_min:
        raise ConfigError(f"resources.time_min: {r.time_min}, but {prof} allows at most {profile.max_time_min} minutes")
    if profile.partitions and r.partition is not None and r.partition not in profile.partitions:
        raise ConfigError(f"resources.partition: {r.partition!r} is not one of {prof}'s: {', '.join(profile.partitions)}")

"""What a sweep's jobs ask Slurm for: the spec's `resources:` block, its checks, and the rules
that keep a value from becoming more than one sbatch option.

    resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, time_min: 30,
                sbatch: {gres: "gpu:a100:8", exclude: "node[1-3]"}}

Slurm's and submitit's spellings are read too (`read_resources`, the table SPELLINGS): `mem: 32G`
or `mem_gb: 32`, `time: "2:00:00"` or `"1-00:00:00"` or `timeout_min: 120`, `ntasks_per_node`,
`gres`, `exclusive`, `reservation`, submitit's `slurm_` prefix, and sbatch's own option names
under `sbatch:` (`sbatch: {account: my-lab, mem: 32000}`, a bare number there being Slurm's MB).
Each becomes one internal form (the `Resources` field, or an entry of `sbatch`), which the dry
run shows (`resources_line`); two spellings of one thing are an error.

`resources.sbatch` options reach sbatch as `#SBATCH` lines, each checked against SBATCH_OPTIONS
and SBATCH_VALUE first. The time limit must leave room for the pre-emption signal's timing
(EARLY_SIGNAL_S, STARTUP_S), and `check_fits` refuses what the cluster profile cannot give.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cifar_dist import schema
from cifar_dist.errors import ConfigError
from cifar_dist.sweep.profiles import Profile

# Values that end up on #SBATCH lines: Slurm names and constraint expressions, nothing a shell or
# sbatch's own parser could read as more than one value.
SLURM_VALUE = re.compile(r"[A-Za-z0-9_.,:|&*\[\]+-]{1,128}")
# resources.sbatch: the options a spec may pass through to sbatch. Left out: what the sweep sets
# itself (job name, array, output files, signal, requeue) and what resources keys hold (nodes,
# tasks, CPUs, GPUs, memory, time limit, account, partition, qos, constraint), which `sbatch:` may
# still spell the Slurm way (SBATCH_SPELLINGS) and which are read into those keys.
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


# ---------------------------------------------------------------------------- spellings


def _size_gb(where: str, value: Any, bare_unit: str = "G") -> float:
    """A memory size in GB: a number (in `bare_unit`, written as people write numbers: schema.convert),
    or Slurm's `32G`, `500M`, `1.5T`, `32GB`."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTkmgt])[Bb]?\s*", value) if isinstance(value, str) else None
    if m:
        number, unit = float(m[1]), m[2].upper()
    else:
        try:
            number, unit = schema.convert(where, float, value), bare_unit
        except ConfigError:
            raise ConfigError(f"{where}: expected a size such as 32G, 500M or a number of "
                              f"{'GB' if bare_unit == 'G' else 'MB'}, got {value!r}") from None
    return number * {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]


_DURATION = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def _minutes(where: str, value: Any) -> int:
    """A time limit in whole minutes from Slurm's forms: minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S
    (seconds round up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _DURATION.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{where}: expected minutes or Slurm's [days-]hours:minutes:seconds, got {value!r}")
    days, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m[1] is None:  # M, M:S, H:M:S
        hours, minutes, seconds = (0, a, b) if m[4] is None else (a, b, c)
    else:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = 24 * days + a, b, c
    return 60 * hours + minutes + math.ceil(seconds / 60)


def _minutes_int(where: str, value: Any) -> Any:
    if isinstance(value, str) and (":" in value or "-" in value.strip()[1:]):
        raise ConfigError(f"{where}: whole minutes, got {value!r}; Slurm's [days-]hours:minutes:seconds goes in "
                          "resources.time")
    return value  # the field's own type check follows (schema.build)


def _same(where: str, value: Any) -> Any:
    return value


# Every spelling of a resources key -> (its one internal form, the reader of that spelling's value).
# Internal forms: a `Resources` field, or "sbatch.<option>" (an sbatch option passed through).
# Keys are read with - as _ and without submitit's `slurm_` prefix; under `sbatch:` the option's
# Slurm name counts, with Slurm's units (a bare memory number is MB there).
Reader = Callable[[str, Any], Any]
SPELLINGS: dict[str, tuple[str, Reader]] = {
    **{f.name: (f.name, _same) for f in dataclasses.fields(Resources) if f.name not in ("mem", "time_min", "sbatch")},
    "mem": ("mem", _size_gb), "mem_gb": ("mem", _size_gb),
    "time_min": ("time_min", _minutes_int), "timeout_min": ("time_min", _minutes_int), "time": ("time_min", _minutes),
    "ntasks_per_node": ("tasks_per_node", _same), "max_num_timeout": ("max_timeouts", _same),
    "gres": ("sbatch.gres", _same), "exclusive": ("sbatch.exclusive", _same), "reservation": ("sbatch.reservation", _same),
}
SBATCH_SPELLINGS: dict[str, tuple[str, Reader]] = {
    "mem": ("mem", lambda where, v: _size_gb(where, v, bare_unit="M")), "time": ("time_min", _minutes),
    "nodes": ("nodes", _same), "ntasks_per_node": ("tasks_per_node", _same), "cpus_per_task": ("cpus_per_task", _same),
    "gpus_per_node": ("gpus_per_node", _same), **{k: (k, _same) for k in ("partition", "account", "qos", "constraint")},
}
WHAT = {"mem": "the memory per node", "time_min": "the time limit", "tasks_per_node": "the tasks per node",
        "max_timeouts": "the time-outs allowed"}


def read_resources(data: Any) -> Any:
    """The `resources:` mapping as written -> the same in internal keys (see SPELLINGS), each
    value in its internal unit; two spellings of one thing are a ConfigError naming both. What
    is not a mapping, or not a key name, is passed on for schema.build to refuse."""
    if not isinstance(data, dict):
        return data
    out: dict[Any, Any] = {}
    spelled: dict[str, str] = {}

    def put(internal: str, written: str, value: Any, option: str = "") -> None:
        """`option`: the sbatch option's name as written, for check_resources's messages."""
        if internal in spelled:
            what = WHAT.get(internal, internal.replace("sbatch.", "sbatch's --"))
            raise ConfigError(f"{spelled[internal]}, {written}: two spellings of {what}; give one")
        spelled[internal] = written
        if internal.startswith("sbatch."):
            out.setdefault("sbatch", {})[option or internal.removeprefix("sbatch.")] = value
        else:
            out[internal] = value

    for key, value in data.items():
        if not isinstance(key, str):
            out[key] = value
        elif key != "sbatch":
            where = f"resources.{key}"
            internal, read = SPELLINGS.get(key.replace("-", "_").removeprefix("slurm_"), (key, _same))
            if not (internal == "sbatch.exclusive" and value is False):  # false: nothing to pass
                put(internal, where, value if value is None else read(where, value))
    sbatch = data.get("sbatch")
    if not isinstance(sbatch, dict):
        if "sbatch" in data:
            out.setdefault("sbatch", sbatch)
        return out
    for key, value in sbatch.items():
        where = f"resources.sbatch.{key}"
        internal, read = SBATCH_SPELLINGS.get(str(key).replace("-", "_"), (f"sbatch.{str(key).replace('_', '-')}", _same))
        put(internal, where, read(where, value), option=key)
    return out


def resources_line(r: Resources) -> str:
    """The resources in their internal form, one line (the dry run's): what every spelling was read as."""
    def time(minutes: int) -> str:
        d, m = divmod(minutes, 24 * 60)
        return f"{d}-{m // 60:02d}:{m % 60:02d}:00" if d else f"{m // 60}:{m % 60:02d}:00"

    items = []
    for f in dataclasses.fields(r):
        value = getattr(r, f.name)
        if value is None or f.name == "sbatch":
            continue
        items.append(f"{f.name}={value:g} GB" if f.name == "mem" else
                     f"{f.name}={value} ({time(value)})" if f.name == "time_min" else f"{f.name}={value}")
    options = [k if v is True else f"{k}={v}" for k, v in sorted(r.sbatch.items())]
    return f"resources: {' '.join(items)}" + (f"; sbatch: {' '.join(options)}" if options else "")


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

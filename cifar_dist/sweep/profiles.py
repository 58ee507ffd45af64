"""Cluster profiles: every fact about one Slurm cluster in one file, `slurm/clusters/<name>.yaml`
(partitions, account, node sizes, module loads, the environment tasks need). Sweep specs name a
profile and never repeat these facts; nothing cluster-specific lives in cifar_dist/."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cifar_dist.sweep.strict import SpecError, check_keys, load_yaml_mapping, take

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
PROFILE_DIR = Path(__file__).parent / "clusters"
DEV_CLUSTER = SLURM_DIR / "dev-cluster.sh"
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ClusterError(RuntimeError):
    """The scheduler cannot be reached or refused; one line, exit code 1."""


@dataclass
class Profile:
    name: str
    description: str = ""
    dev_cluster: bool = False  # the project's dev cluster: Slurm commands get `slurm/dev-cluster.sh env` (SLURM_CONF)
    partitions: list[str] = field(default_factory=list)  # allowed partitions, the first is the default; [] = any
    account: str = ""  # default --account; "" = none
    qos: str = ""  # default --qos; "" = none
    max_nodes: int = 1  # nodes one job may use
    cpus_per_node: int = 1  # cores per node (tasks_per_node x cpus_per_task must fit)
    gpus_per_node: int = 0
    mem_per_node_gb: float = 0.0  # GB a job may ask per node; 0 = not checked
    max_time_min: int = 0  # the partitions' time limit in minutes; 0 = not checked
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module loads); profile only, never a spec
    env: dict[str, str] = field(default_factory=dict)  # set by each task before its process group starts


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> Profile:
    if not PROFILE_NAME.fullmatch(name):
        raise SpecError(f"cluster: {name!r} is not a profile name (letters, digits, - and _)")
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"cluster: unknown cluster profile {name!r} (known: {', '.join(profile_names())}; "
                        f"add {path})")
    data = load_yaml_mapping(path, f"cluster profile {name}")
    where = f"cluster profile {name}: "
    check_keys(data, tuple(f for f in Profile.__dataclass_fields__ if f != "name"), where)
    p = Profile(
        name=name,
        description=take(data, "description", str, where, ""),
        dev_cluster=take(data, "dev_cluster", bool, where, False),
        partitions=_strings(take(data, "partitions", list, where, []), "partitions", where),
        account=take(data, "account", str, where, ""),
        qos=take(data, "qos", str, where, ""),
        max_nodes=take(data, "max_nodes", int, where, 1),
        cpus_per_node=take(data, "cpus_per_node", int, where, 1),
        gpus_per_node=take(data, "gpus_per_node", int, where, 0),
        mem_per_node_gb=take(data, "mem_per_node_gb", float, where, 0.0),
        max_time_min=take(data, "max_time_min", int, where, 0),
        setup=_strings(take(data, "setup", list, where, []), "setup", where),
        env=_env(take(data, "env", dict, where, {}), where),
    )
    for key in ("max_nodes", "cpus_per_node"):
        if getattr(p, key) < 1:
            raise SpecError(f"{where}{key}: must be >= 1, got {getattr(p, key)}")
    for key in ("gpus_per_node", "mem_per_node_gb", "max_time_min"):
        if getattr(p, key) < 0:
            raise SpecError(f"{where}{key}: must be >= 0, got {getattr(p, key)}")
    return p


def _strings(values: list, key: str, where: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str) or "\n" in v:
            raise SpecError(f"{where}{key}[{i}]: expected a one-line string, got {v!r}")
    return values


def _env(values: dict, where: str) -> dict[str, str]:
    out = {}
    for k, v in values.items():
        if not isinstance(k, str) or not ENV_NAME.fullmatch(k):
            raise SpecError(f"{where}env: {k!r} is not an environment variable name")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise SpecError(f"{where}env.{k}: expected a string or number, got {v!r}")
        out[k] = str(v)
    return out


def submit_environment(profile: Profile) -> dict[str, str]:
    """Variables the Slurm commands (sbatch, squeue, scancel) need for this profile: for the dev
    cluster, what `slurm/dev-cluster.sh env` prints, so that nothing has to be exported by hand."""
    if not profile.dev_cluster:
        return {}
    proc = subprocess.run(["bash", str(DEV_CLUSTER), "env"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise ClusterError(f"cluster profile {profile.name}: {DEV_CLUSTER} env failed: {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if line.startswith("export ") and sep and ENV_NAME.fullmatch(key):
            out[key] = value
    conf = out.get("SLURM_CONF", "")
    if conf and not Path(conf).is_file():  # Slurm's commands would retry for a minute, then fail
        raise ClusterError(f"cluster profile {profile.name}: the dev cluster is not up (no {conf}); "
                           f"start it with: {DEV_CLUSTER.relative_to(SLURM_DIR.parent)} up")
    return out


def apply_submit_environment(profile: Profile) -> None:
    os.environ.update(submit_environment(profile))

"""Cluster profiles: every fact about one Slurm cluster in one YAML file, `<name>.yaml`
(partitions, account, node sizes, module loads, the environment tasks need). Sweep specs name a
profile and never repeat these facts; nothing cluster-specific lives in the rest of cifar_dist/.

A profile name is looked up in this order; the first folder holding `<name>.yaml` wins:

1. `$CIFAR_DIST_CLUSTERS`, a folder (your own profiles, wherever they live);
2. `./slurm/clusters/`, relative to the current directory (a project's own profiles);
3. the profiles shipped with the package, `cifar_dist/sweep/clusters/`: `local` and `local2`
   (the dev clusters of slurm/dev-cluster.sh) and `example-gpu` (a template to copy).

Profiles with `dev_cluster: true` point Slurm's commands at the dev cluster's config, found as
slurm/dev-cluster.sh writes it: `${CIFAR_DIST_SLURM_DIR:-/tmp/cifar-dist-slurm}/slurm.conf`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cifar_dist import schema
from cifar_dist.errors import ConfigError

PROFILES_VARIABLE = "CIFAR_DIST_CLUSTERS"
PROJECT_PROFILES = Path("slurm") / "clusters"  # relative to the current directory
SHIPPED_PROFILES = Path(__file__).resolve().parent / "clusters"
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ClusterError(RuntimeError):
    """The scheduler cannot be reached or refused; one line, exit code 1."""


@dataclass
class ClusterFacts:
    """The keys of a profile file, each with its default."""

    description: str = ""
    dev_cluster: bool = False  # the project's dev cluster (slurm/dev-cluster.sh): Slurm commands get its SLURM_CONF
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


@dataclass
class Profile(ClusterFacts):
    name: str = ""  # the file's name without .yaml
    path: str = ""  # the file it was read from


def profile_dirs() -> list[Path]:
    """The folders searched for profiles, in order."""
    dirs = [PROJECT_PROFILES.absolute(), SHIPPED_PROFILES]
    own = os.environ.get(PROFILES_VARIABLE)
    if own:
        if not Path(own).is_dir():
            raise ConfigError(f"{PROFILES_VARIABLE}: {own} is not a folder (of cluster profiles, <name>.yaml)")
        dirs.insert(0, Path(own).absolute())
    return dirs


def profile_names() -> list[str]:
    return sorted({p.stem for d in profile_dirs() for p in d.glob("*.yaml")})


def find_profile(name: str) -> Path:
    if not PROFILE_NAME.fullmatch(name):
        raise ConfigError(f"cluster: {name!r} is not a profile name (letters, digits, - and _)")
    dirs = profile_dirs()
    for d in dirs:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    raise ConfigError(f"cluster: unknown cluster profile {name!r} (known: {', '.join(profile_names())}; "
                      f"searched {', '.join(map(str, dirs))}; add {name}.yaml to one of them)")


def load_profile(name: str, path: str | Path | None = None) -> Profile:
    """The profile `name`, from `path` when given and still there (a sweep's record keeps the
    file its profile came from), else looked up in the profile folders."""
    path = Path(path) if path and Path(path).is_file() else find_profile(name)
    where = f"cluster profile {name}: "
    data = schema.read_yaml_mapping(path, f"cluster profile {name}")
    env = data.get("env")
    if isinstance(env, dict):  # YAML reads `VAR: 1` as a number; a variable's value is text
        data["env"] = {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for k, v in env.items()}
    try:
        facts = schema.build(ClusterFacts, data)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    p = Profile(**dataclasses.asdict(facts), name=name, path=str(path))
    for key in ("max_nodes", "cpus_per_node"):
        if getattr(p, key) < 1:
            raise ConfigError(f"{where}{key}: must be >= 1, got {getattr(p, key)}")
    for key in ("gpus_per_node", "mem_per_node_gb", "max_time_min"):
        if getattr(p, key) < 0:
            raise ConfigError(f"{where}{key}: must be >= 0, got {getattr(p, key)}")
    for key in ("partitions", "setup"):
        for i, line in enumerate(getattr(p, key)):
            if "\n" in line:
                raise ConfigError(f"{where}{key}[{i}]: expected a one-line string, got {line!r}")
    for k in p.env:
        if not ENV_NAME.fullmatch(k):
            raise ConfigError(f"{where}env: {k!r} is not an environment variable name")
    return p


def dev_cluster_conf() -> Path:
    """The dev cluster's slurm.conf, where slurm/dev-cluster.sh writes it (`dev-cluster.sh env` prints it)."""
    return Path(os.environ.get("CIFAR_DIST_SLURM_DIR") or "/tmp/cifar-dist-slurm") / "slurm.conf"


def submit_environment(profile: Profile) -> dict[str, str]:
    """Variables the Slurm commands (sbatch, squeue, scancel) need for this profile: for the dev
    cluster, its SLURM_CONF, so that nothing has to be exported by hand."""
    if not profile.dev_cluster:
        return {}
    conf = dev_cluster_conf()
    if not conf.is_file():  # Slurm's commands would retry for a minute, then fail
        raise ClusterError(f"cluster profile {profile.name}: the dev cluster is not up (no {conf}); "
                           "start it with: slurm/dev-cluster.sh up")
    return {"SLURM_CONF": str(conf)}


def apply_submit_environment(profile: Profile) -> None:
    os.environ.update(submit_environment(profile))

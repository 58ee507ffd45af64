"""Every point's config, and every trial's: one builder for both, `point_config`.

A grid/random sweep's points are built at submit time (`make_points`, each config validated
before anything is submitted); a study's trials when a worker asks one (worker.py), from the
base config the sweep record keeps. Relative data paths are relative to the directory the sweep
was submitted from, wherever a job starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cifar_dist import schema
from cifar_dist.config import Config, load_config, validate
from cifar_dist.errors import ConfigError
from cifar_dist.sweep.record import PointEntry
from cifar_dist.sweep.resources import Resources
from cifar_dist.sweep.spec import Spec, count_points, expand
from cifar_dist.sweep.sweepdir import run_dir

MAX_POINTS = 1000  # a typo such as a 100-value grid crossed with 100 seeds should not reach the queue
# Config keys that hold paths. A relative one is relative to the directory the sweep was submitted
# from, and made absolute against it: jobs may start elsewhere (a resubmission, a node's scratch).
PATH_KEYS = ("data.path", "data.cache_dir")


def make_points(spec: Spec, sweep_dir: Path, uid: str, *, max_points: int = MAX_POINTS) -> list[PointEntry]:
    """Every point with its run id, run dir and validated config; the first mistake raises."""
    n = count_points(spec)
    if n > max_points:
        raise ConfigError(f"sweep: {n:,} points exceeds the cap of {max_points:,} (use --max-points to allow more)")
    base = base_config(spec)
    width = max(3, len(str(n - 1)))
    points = []
    for i, values in enumerate(expand(spec)):
        name = f"{i:0{width}d}"
        cfg = point_config(base, values, sweep=spec.name, uid=uid, name=name, run_dir=run_dir(sweep_dir, name),
                           resources=spec.resources, submitted_from=Path.cwd(), where=f"point {name} ({values_text(values)})")
        points.append(PointEntry(name=name, values=values, describe=values_text(values), run_id=cfg.run.id,
                                 run_dir=cfg.run.dir, config=cfg.to_dict()))
    return points


def base_config(spec: Spec) -> Config:
    """The spec's base config with its overrides, validated: what every point and trial starts from."""
    try:
        cfg = load_config(spec.base)
    except ConfigError as e:
        raise ConfigError(f"base: {str(e).removeprefix('--config: ')}") from None
    try:
        schema.update(cfg, spec.overrides)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"overrides: {e}") from None
    return cfg


def point_config(base: Config, values: dict[str, Any], *, sweep: str, uid: str, name: str, run_dir: Path,
                 resources: Resources, submitted_from: Path, where: str) -> Config:
    """The validated config of a grid point or a study's trial: `base` with the swept `values`, its
    run dir, id, name and group (fixed at submit time, or when the trial is asked), and its
    PATH_KEYS made absolute against `submitted_from`; a mistake is a ConfigError that starts with `where`."""
    cfg = copy.deepcopy(base)
    try:
        schema.update(cfg, values)
        cfg.run.dir, cfg.run.id, cfg.tracking.group = str(run_dir), f"{sweep}-{uid}-{name}", sweep
        cfg.run.name = f"{sweep}/{name} {values_text(values)}".strip()
        for key in PATH_KEYS:
            section, field_name, value = schema.lookup(cfg, key)
            if value:
                setattr(section, field_name, str(submitted_from / value))  # an absolute value stays as it is
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cfg.train.batch_size % resources.world_size:
        raise ConfigError(f"{where}: train.batch_size: {cfg.train.batch_size} does not split evenly over "
                          f"{resources.world_size} ranks (resources: {resources.nodes} nodes x {resources.tasks_per_node} tasks)")
    return cfg


def values_text(values: dict[str, Any]) -> str:
    """Swept values as text: `train.lr=0.05 seed=1`."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

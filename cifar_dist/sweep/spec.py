"""The sweep spec: a strict YAML file, expanded into points whose configs all validate before
anything is submitted.

    name: lr-sweep
    cluster: local            # a cluster profile (profiles.py)
    base: medium              # a shipped config name, or a YAML path (relative to this file)
    overrides: {train.epochs: 2}
    sweep:
      grid: {train.lr: [0.05, 0.1], seed: [0, 1]}
      random: {n: 4, seed: 0, params: {train.lr: {loguniform: [0.01, 0.3]}}}
    resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, time_min: 30,
                sbatch: {gres: "gpu:a100:8", exclude: "node[1-3]"}}

`grid` is a cartesian product; `random` draws `n` points (seeded); with both, every random point
is crossed with every grid point; without a `sweep:` block the spec is one point (base +
overrides). A swept key's values replace its value in `overrides`. Values reach the run as data
(pickled with the job), never through a shell; `resources.sbatch` options reach sbatch as
`#SBATCH` lines, each checked against SBATCH_OPTIONS and SBATCH_VALUE first.

A `search:` block instead of `sweep:` makes the spec a study (search.py: Optuna picks each
trial's values and prunes hopeless trials; `workers` array tasks take trials one after another):

    search: {trials: 32, workers: 4, metric: test_accuracy, sampler: tpe, pruner: asha,
             params: {train.lr: {loguniform: [1e-3, 1.0]}}}
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cifar_dist import schema
from cifar_dist.config import Config, load_config, validate
from cifar_dist.errors import ConfigError
from cifar_dist.metrics import DIRECTIONS, direction
from cifar_dist.sweep.profiles import Profile

T = TypeVar("T")

TOP_KEYS = ("name", "cluster", "base", "overrides", "sweep", "search", "resources")
# The name becomes the Slurm job name, the sweep dir's name and part of every run id.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
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
# Keys the sweep fixes for every point (the run dir and id are fixed at submit time, so a
# requeued or resubmitted point resumes from its own checkpoints).
RESERVED = ("run.dir", "run.id", "run.name", "tracking.group")
# Config keys that hold paths. A relative one is relative to the directory the sweep was submitted
# from, and made absolute against it: jobs may start elsewhere (a resubmission, a node's scratch).
PATH_KEYS = ("data.path", "data.cache_dir")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
MAX_POINTS = 1000  # a typo such as a 100-value grid crossed with 100 seeds should not reach the queue
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "hyperband", "median", "none")


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


@dataclass
class Distribution:
    kind: str  # one of DISTRIBUTIONS
    args: list[Any]

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return rng.choice(self.args)
        low, high = self.args
        if self.kind == "int":
            return rng.randint(low, high)  # both ends included
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.uniform(low, high)


@dataclass
class RandomSweep:
    n: int
    params: dict[str, Distribution]
    seed: int = 0


@dataclass
class Search:
    """A study (search.py); every field but `params` has its default here."""

    trials: int = 0  # trials that end complete or pruned (failed ones are retried, not counted)
    workers: int = 1  # array tasks that take trials concurrently
    metric: str = "test_accuracy"  # a key of metrics.DIRECTIONS; every evaluation of it is reported to the pruner
    sampler: str = "tpe"  # tpe | random | grid (grid: every param a `choice`)
    pruner: str = "asha"  # asha | hyperband | median | none
    seed: int = 0  # the sampler's
    min_epochs: int = 1  # epochs every trial trains before it may be pruned
    reduction_factor: int = 3  # asha, hyperband: 1 in this many trials goes on at each rung
    heartbeat_s: int = 60  # a running trial's worker says it is alive this often
    grace_s: int = 600  # a trial not heard of for this long (its worker killed) is failed and retried
    max_retries: int = 3  # retries of one trial after such failures
    # dotted key -> {choice|uniform|loguniform|int: args}, as written (numbers converted); `distributions` reads them
    params: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return direction(self.metric)

    @property
    def distributions(self) -> dict[str, Distribution]:
        return {key: Distribution(*next(iter(d.items()))) for key, d in self.params.items()}


@dataclass
class Spec:
    path: Path
    name: str
    base: str
    cluster: str = "local"  # a cluster profile's name
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for every point
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: RandomSweep | None = None
    search: Search | None = None
    resources: Resources = field(default_factory=Resources)


@dataclass
class Point:
    index: int
    name: str  # "000", "001", ...: its run dir's name
    values: dict[str, Any]  # the swept keys' values
    run_id: str
    run_dir: str
    config: dict[str, Any]  # the resolved, validated config (Config.to_dict)

    def describe(self) -> str:
        return describe(self.values)


# ---------------------------------------------------------------------------- reading


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    data = schema.read_yaml_mapping(path, "spec")
    _check_keys(data, TOP_KEYS, "")
    name = _given(data, "name", str, required=True)
    if not NAME.fullmatch(name):
        raise ConfigError(f"name: {name!r} may hold only letters, digits, - _ . (at most 64; it names the Slurm job, "
                          "the sweep dir and the run ids)")
    search = _search(_given(data, "search", dict))
    sweep = _given(data, "sweep", dict)
    if search and sweep is not None:
        raise ConfigError("sweep, search: give one (sweep: every point trained to the end; search: a study that prunes)")
    if sweep == {}:
        raise ConfigError("sweep: empty (give grid and/or random, or leave sweep: out for a single point)")
    # No sweep block: one point, the base with its overrides; or a study, whose trials the search picks.
    sweep = sweep or ({} if search else {"grid": {}})
    _check_keys(sweep, ("grid", "random"), "sweep.")
    spec = _with_given(Spec(path=path, name=name, base=_given(data, "base", str, required=True),
                            resources=_resources(_given(data, "resources", dict) or {})),
                       cluster=_given(data, "cluster", str),
                       overrides=_flat(_given(data, "overrides", dict), "overrides"),
                       grid=_grid(_given(sweep, "grid", dict, "sweep.")),
                       random=_random(_given(sweep, "random", dict, "sweep.")), search=search)
    _check_key_sets(spec)
    return spec


def _check_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}{key}: unknown key (valid: {', '.join(allowed)})")


def _given(data: dict[str, Any], key: str, hint: Any, where: str = "", required: bool = False) -> Any:
    """data[key] as `hint` (dict: any mapping; else the strict loader's conversion); None when
    absent or null, which leaves the field's default (on its dataclass) in place."""
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{where}{key}: missing")
        return None
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
        return value
    return schema.convert(f"{where}{key}", hint, value)


def _with_given(obj: T, **values: Any) -> T:
    """`obj` with every value that was given; an absent one (None) keeps the field's default."""
    for key, value in values.items():
        if value is not None:
            setattr(obj, key, value)
    return obj


def _flat(mapping: dict[Any, Any] | None, where: str) -> dict[str, Any] | None:
    if mapping is None:
        return None
    for key in mapping:
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a dotted config key")
    return schema.flatten(mapping)


def _grid(grid: dict[Any, Any] | None) -> dict[str, list[Any]] | None:
    if grid is None:
        return None
    out = _flat(grid, "sweep.grid")
    for key, values in out.items():
        if not isinstance(values, list):
            raise ConfigError(f"sweep.grid.{key}: expected a list of values, got {values!r}")
        if not values:
            raise ConfigError(f"sweep.grid.{key}: empty list, so the sweep has no points")
    return out


def _random(data: dict[str, Any] | None) -> RandomSweep | None:
    if data is None:
        return None
    where = "sweep.random."
    _check_keys(data, ("n", "seed", "params"), where)
    n = _given(data, "n", int, where, required=True)
    if n < 1:
        raise ConfigError(f"sweep.random.n: must be >= 1, got {n}")
    params = _given(data, "params", dict, where, required=True)
    return _with_given(RandomSweep(n=n, params=_params(params, "sweep.random.params")),
                       seed=_given(data, "seed", int, where))


def _search(data: dict[str, Any] | None) -> Search | None:
    if data is None:
        return None
    params = _given(data, "params", dict, "search.", required=True)
    search = schema.build(Search, {k: v for k, v in data.items() if k != "params"}, "search.")
    search.params = {key: {d.kind: d.args} for key, d in _params(params, "search.params").items()}
    if "trials" not in data:
        raise ConfigError("search.trials: missing")
    for key in ("trials", "workers", "min_epochs", "heartbeat_s", "grace_s"):
        if getattr(search, key) < 1:
            raise ConfigError(f"search.{key}: must be >= 1, got {getattr(search, key)}")
    for key, allowed in (("metric", tuple(DIRECTIONS)), ("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if getattr(search, key) not in allowed:
            raise ConfigError(f"search.{key}: must be one of {', '.join(allowed)}, got {getattr(search, key)!r}")
    if search.reduction_factor < 2:
        raise ConfigError(f"search.reduction_factor: must be >= 2, got {search.reduction_factor}")
    if search.workers > search.trials:
        raise ConfigError(f"search.workers: {search.workers} workers for {search.trials} trials; a worker trains one "
                          "trial at a time, so give at most as many workers as trials")
    if search.max_retries < 0:
        raise ConfigError(f"search.max_retries: must be >= 0, got {search.max_retries}")
    if search.grace_s <= 2 * search.heartbeat_s:
        raise ConfigError(f"search.grace_s: {search.grace_s} s must exceed two heartbeats "
                          f"(heartbeat_s {search.heartbeat_s}), or live trials would be failed")
    if search.sampler == "grid":
        for key, d in search.distributions.items():
            if d.kind != "choice":
                raise ConfigError(f"search.params.{key}: the grid sampler takes {{choice: [...]}} only, got {d.kind}")
        size = math.prod(len(d.args) for d in search.distributions.values())
        if search.trials > size:
            raise ConfigError(f"search.trials: {search.trials}, but the grid has {size} points")
    return search


def _params(params: dict[Any, Any], where: str) -> dict[str, Distribution]:
    if not params:
        raise ConfigError(f"{where}: empty (give at least one key and its distribution)")
    return {k: _distribution(k, v, where) for k, v in _flat_params(params, where).items()}


def _flat_params(params: dict[Any, Any], where: str) -> dict[str, Any]:
    """Dotted keys, also when written nested ({train: {lr: {uniform: [...]}}})."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a dotted config key")
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out.update({f"{key}.{k}": v for k, v in _flat_params(value, where).items()})  # a section, not a distribution
        else:
            out[key] = value
    return out


def _distribution(key: str, value: Any, params: str) -> Distribution:
    where = f"{params}.{key}"
    forms = "{choice: [a, b, ...]}, {uniform: [low, high]}, {loguniform: [low, high]} or {int: [low, high]}"
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"{where}: expected one of {forms}, got {value!r}")
    kind, args = next(iter(value.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: unknown distribution {kind!r} (choice, uniform, loguniform, int)")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.choice: expected a non-empty list of values, got {args!r}")
        return Distribution(kind, args)
    what = "integers" if kind == "int" else "numbers"
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}.{kind}: expected [low, high], two {what}, got {args!r}")
    try:  # numbers as people write them: YAML 1.1 reads 1e-3 as text
        low, high = (schema.convert(f"{where}.{kind}", int if kind == "int" else float, a) for a in args)
    except ConfigError:
        raise ConfigError(f"{where}.{kind}: expected [low, high], two {what}, got {args!r}") from None
    if not (low <= high if kind == "int" else low < high):
        raise ConfigError(f"{where}.{kind}: low must be {'<=' if kind == 'int' else '<'} high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0, got {args!r}")
    return Distribution(kind, [low, high])


def _resources(data: dict[str, Any]) -> Resources:
    r = schema.build(Resources, data, "resources.")
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
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(r, key)
        if value is not None and not SLURM_VALUE.fullmatch(value):
            raise ConfigError(f"resources.{key}: {value!r} is not a Slurm name (letters, digits and _ . , : | & * [ ] + -)")
    r.sbatch = {_sbatch_option(k): _sbatch_value(k, v) for k, v in r.sbatch.items()}
    return r


def _sbatch_option(key: str) -> str:
    name = key.replace("_", "-")
    if name in ("partition", "account", "qos", "constraint"):
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


def _check_key_sets(spec: Spec) -> None:
    swept_random = set(spec.random.params) if spec.random else set(spec.search.params) if spec.search else set()
    for key in sorted(set(spec.overrides) | set(spec.grid) | swept_random):
        if key in RESERVED or any(key.startswith(r + ".") for r in RESERVED):
            raise ConfigError(f"{key}: set by the sweep for every point (run dir and id fixed at submit time, "
                              "tracking.group = the sweep name); remove it")
    for key in sorted(set(spec.grid) & swept_random):
        raise ConfigError(f"{key}: in both sweep.grid and sweep.random; sweep it once")


# ---------------------------------------------------------------------------- fitting the cluster


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


# ---------------------------------------------------------------------------- expanding


def count_points(spec: Spec) -> int:
    """The number of points, computed without expanding them (a huge grid is refused cheaply)."""
    return math.prod(len(v) for v in spec.grid.values()) * (spec.random.n if spec.random else 1)


def expand(spec: Spec) -> list[dict[str, Any]]:
    """Every point's swept values: the grid in the order written (last key fastest), each grid
    point crossed with the random draws (the same draws for every grid point)."""
    grid = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    draws = [{}]
    if spec.random:
        rng = random.Random(spec.random.seed)
        draws = [{k: d.sample(rng) for k, d in spec.random.params.items()} for _ in range(spec.random.n)]
    return [{**g, **d} for g in grid for d in draws]


def make_points(spec: Spec, sweep_dir: Path, uid: str, max_points: int = MAX_POINTS) -> list[Point]:
    """Every point with its run id, run dir and validated config; the first mistake raises."""
    n = count_points(spec)
    if n > max_points:
        raise ConfigError(f"sweep: {n:,} points exceeds the cap of {max_points:,} (use --max-points to allow more)")
    base = base_config(spec)
    width = max(3, len(str(n - 1)))
    points = []
    for i, values in enumerate(expand(spec)):
        name = f"{i:0{width}d}"
        cfg = point_config(base, values, sweep=spec.name, uid=uid, name=name, run_dir=sweep_dir / "runs" / name,
                           resources=spec.resources, submitted_from=Path.cwd(), where=f"point {name} ({describe(values)})")
        points.append(Point(i, name, values, cfg.run.id, cfg.run.dir, cfg.to_dict()))
    return points


def base_config(spec: Spec) -> Config:
    """The spec's base config with its overrides, validated: what every point and trial starts from."""
    try:
        cfg = load_config(_resolve_base(spec))
    except ConfigError as e:
        raise ConfigError(f"base: {str(e).removeprefix('--config: ')}") from None
    try:
        schema.update(cfg, spec.overrides)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"overrides: {e}") from None
    return cfg


def _resolve_base(spec: Spec) -> str:
    """A relative path is relative to the spec file; a bare name is a shipped config."""
    base = Path(spec.base)
    if not base.is_absolute() and (base.suffix in (".yaml", ".yml") or "/" in spec.base):
        beside = spec.path.parent / base
        if beside.is_file():
            return str(beside)
    return spec.base


def point_config(base: Config, values: dict[str, Any], *, sweep: str, uid: str, name: str, run_dir: Path,
                 resources: Resources, submitted_from: Path, where: str) -> Config:
    """The validated config of a grid point or a study's trial: `base` with the swept `values`, its
    run dir, id, name and group (fixed at submit time, or when the trial is asked), and its
    PATH_KEYS made absolute against `submitted_from`; a mistake is a ConfigError that starts with `where`."""
    cfg = copy.deepcopy(base)
    try:
        schema.update(cfg, values)
        cfg.run.dir, cfg.run.id, cfg.tracking.group = str(run_dir), f"{sweep}-{uid}-{name}", sweep
        cfg.run.name = f"{sweep}/{name} {describe(values)}".strip()
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


def describe(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())

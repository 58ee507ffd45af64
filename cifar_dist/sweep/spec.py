"""The sweep spec: a strict YAML file, and its expansion into every point's swept values (whose
configs points.py builds and validates before anything is submitted).

    name: lr-sweep
    cluster: local            # a cluster profile (profiles.py)
    base: medium              # a shipped config name, or a YAML path (relative to this file)
    overrides: {train.epochs: 2}
    sweep:
      grid: {train.lr: [0.05, 0.1], seed: [0, 1]}
      random: {n: 4, seed: 0, params: {train.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}}}
    resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 1, cpus_per_task: 1, time: "0:30:00", mem: 16G,
                gres: "gpu:a100:8", sbatch: {exclude: "node[1-3]"}}

`grid` is a cartesian product; `random` draws `n` points (seeded); with both, every random point
is crossed with every grid point; without a `sweep:` block the spec is one point (base +
overrides). A swept key's values replace its value in `overrides`. Values reach the run as data
(pickled with the job), never through a shell; `resources:` is read and checked by resources.py.
The file is read by the one strict loader (schema.build) into `Spec`; the distributions
(`{loguniform: [low, high]}`, ...) are the one syntax of its own, read by `read_params`.

A `search:` block instead of `sweep:` makes the spec a study (study.py: Optuna picks each
trial's values and prunes hopeless trials; `workers` array tasks take trials one after another):

    search: {trials: 32, workers: 4, metric: test_accuracy, sampler: tpe, pruner: asha,
             params: {train.lr: {loguniform: [1e-3, 1.0]}}}
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifar_dist import schema
from cifar_dist.config import CONFIG_DIR, resolve_config_path
from cifar_dist.errors import ConfigError
from cifar_dist.metrics import DIRECTIONS, direction
from cifar_dist.sweep.resources import Resources, check_resources, read_resources

# The name becomes the Slurm job name, the sweep dir's name and part of every run id.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Keys the sweep fixes for every point (the run dir and id are fixed at submit time, so a
# requeued or resubmitted point resumes from its own checkpoints).
RESERVED = ("run.dir", "run.id", "run.name", "tracking.group")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "hyperband", "median", "none")


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


def distributions(params: dict[str, Any]) -> dict[str, Distribution]:
    """Params as `read_params` leaves them ({key: {kind: args}}), as Distributions."""
    return {key: Distribution(*next(iter(d.items()))) for key, d in params.items()}


@dataclass
class RandomSweep:
    n: int | None = None  # points drawn (required)
    seed: int = 0
    params: dict[str, Any] | None = None  # dotted key -> {choice|uniform|loguniform|int: args} (required)

    @property
    def distributions(self) -> dict[str, Distribution]:
        return distributions(self.params or {})


@dataclass
class Sweep:
    """The `sweep:` block: every point trained to the end."""

    grid: dict[str, Any] | None = None  # dotted key -> its list of values
    random: RandomSweep | None = None


@dataclass
class Search:
    """A study (study.py). sweep.json keeps these settings as read (params in their written form)."""

    trials: int | None = None  # trials that end complete or pruned (failed ones are retried, not counted); required
    workers: int = 1  # array tasks that take trials concurrently
    metric: str = "test_accuracy"  # a key of metrics.DIRECTIONS; every evaluation of it is reported to the pruner
    sampler: str = "tpe"  # tpe | random | grid (grid: every param a `choice`)
    pruner: str = "asha"  # asha | hyperband | median | none
    seed: int = 0  # the sampler's
    min_epochs: int = 1  # epochs every trial trains before it may be pruned
    reduction_factor: int = 3  # asha, hyperband: 1 in this many trials goes on at each rung
    heartbeat_s: int = 60  # a running trial's worker says it is alive this often
    grace_s: int = 600  # a trial whose heartbeat another worker saw stand still this long is failed and retried
    max_retries: int = 3  # retries of one trial after such failures
    params: dict[str, Any] | None = None  # dotted key -> {choice|uniform|loguniform|int: args} (required)

    @property
    def direction(self) -> str:
        return direction(self.metric)

    @property
    def distributions(self) -> dict[str, Distribution]:
        return distributions(self.params or {})


@dataclass
class Spec:
    """A sweep spec: its file's keys as schema.build reads them, normalised by `load_spec`."""

    name: str | None = None  # required
    cluster: str = "local"  # a cluster profile's name
    base: str | None = None  # required; after reading, a shipped config's name or the path of a YAML file
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, for every point
    sweep: Sweep | None = None  # neither sweep nor search: one point, the base with its overrides
    search: Search | None = None
    resources: Resources = field(default_factory=Resources)

    @property
    def grid(self) -> dict[str, list[Any]]:
        return (self.sweep.grid if self.sweep else None) or {}

    @property
    def random(self) -> RandomSweep | None:
        return self.sweep.random if self.sweep else None


# ---------------------------------------------------------------------------- reading


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    return read_spec(schema.read_yaml_mapping(path, "spec"), path.parent)


def read_spec(data: dict[str, Any], folder: Path) -> Spec:
    """A spec from its mapping (a file's, or the command line's: cli_spec.cli_spec); a relative
    `base:` path is looked for in `folder` first."""
    data = {k: v for k, v in data.items() if v is not None}  # a key left empty keeps its default
    if "resources" in data:
        data["resources"] = read_resources(data["resources"])
    spec = schema.build(Spec, data)
    _require(spec, ("name", "base"))
    if not NAME.fullmatch(spec.name):
        raise ConfigError(f"name: {spec.name!r} may hold only letters, digits, - _ . (at most 64; it names the Slurm "
                          "job, the sweep dir and the run ids)")
    if spec.search:
        _read_search(spec.search)
    if spec.search and spec.sweep is not None:
        raise ConfigError("sweep, search: give one (sweep: every point trained to the end; search: a study that prunes)")
    if spec.sweep is not None:
        _read_sweep(spec.sweep)
    spec.base = _resolve_base(spec.base, folder)
    check_resources(spec.resources)
    spec.overrides = schema.flatten(spec.overrides)
    _check_key_sets(spec)
    return spec


def _require(obj: Any, keys: tuple[str, ...], where: str = "") -> None:
    for key in keys:
        if getattr(obj, key) is None:
            raise ConfigError(f"{where}{key}: missing")


def _resolve_base(base: str, folder: Path) -> str:
    """A shipped config's name as it is, or the path of a YAML file: a relative one beside the spec
    file first, then relative to the current directory (the rule of a training config's `base:`)."""
    try:
        path = resolve_config_path(base, folder)
    except ConfigError as e:
        raise ConfigError(f"base: {e}") from None
    return base if path == CONFIG_DIR / f"{base}.yaml" else str(path)


def _read_sweep(sweep: Sweep) -> None:
    if sweep.grid is None and sweep.random is None:
        raise ConfigError("sweep: empty (give grid and/or random, or leave sweep: out for a single point)")
    if sweep.grid is not None:
        sweep.grid = schema.flatten(sweep.grid)
        for key, values in sweep.grid.items():
            if not isinstance(values, list):
                raise ConfigError(f"sweep.grid.{key}: expected a list of values, got {values!r}")
            if not values:
                raise ConfigError(f"sweep.grid.{key}: empty list, so the sweep has no points")
    if sweep.random is not None:
        _require(sweep.random, ("n", "params"), "sweep.random.")
        if sweep.random.n < 1:
            raise ConfigError(f"sweep.random.n: must be >= 1, got {sweep.random.n}")
        sweep.random.params = read_params(sweep.random.params, "sweep.random.params")


def _read_search(search: Search) -> None:
    _require(search, ("trials", "params"), "search.")
    search.params = read_params(search.params, "search.params")
    for key in ("trials", "workers", "min_epochs", "heartbeat_s", "grace_s"):
        if getattr(search, key) < 1:
            raise ConfigError(f"search.{key}: must be >= 1, got {getattr(search, key)}")
    for key, allowed in (("metric", tuple(DIRECTIONS)), ("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if getattr(search, key) not in allowed:
            raise ConfigError(f"search.{key}: must be one of {', '.join(allowed)}, got {getattr(search, key)!r}")
    if search.workers > search.trials:
        raise ConfigError(f"search.workers: {search.workers} workers for {search.trials} trials; a worker trains one "
                          "trial at a time, so give at most as many workers as trials")
    if search.reduction_factor < 2:
        raise ConfigError(f"search.reduction_factor: must be >= 2, got {search.reduction_factor}")
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


def read_params(params: dict[str, Any], where: str) -> dict[str, Any]:
    """Distributions as written, checked and normalised: dotted keys (also when written nested,
    {train: {lr: {uniform: [...]}}}), each {kind: args} with its numbers converted."""
    if not params:
        raise ConfigError(f"{where}: empty (give at least one key and its distribution)")
    read = {k: _distribution(k, v, where) for k, v in _flat_params(params, where).items()}
    return {key: {d.kind: d.args} for key, d in read.items()}


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


def _check_key_sets(spec: Spec) -> None:
    drawn = spec.random.params if spec.random else spec.search.params if spec.search else None
    swept_random = set(drawn or {})
    for key in sorted(set(spec.overrides) | set(spec.grid) | swept_random):
        if key in RESERVED or any(key.startswith(r + ".") for r in RESERVED):
            raise ConfigError(f"{key}: set by the sweep for every point (run dir and id fixed at submit time, "
                              "tracking.group = the sweep name); remove it")
    for key in sorted(set(spec.grid) & swept_random):
        raise ConfigError(f"{key}: in both sweep.grid and sweep.random; sweep it once")


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
        draws = [{k: d.sample(rng) for k, d in spec.random.distributions.items()} for _ in range(spec.random.n)]
    return [{**g, **d} for g in grid for d in draws]

"""One typed, strict config: dataclasses, loaded from YAML, overridden by `dotted.key=value`.

Every field is validated once, here; the rest of the code trusts the config it is given.
A mistake is a `ConfigError` whose message names the key, and the CLI turns it into one
line on stderr and exit code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_dist import schema
from cifar_dist.errors import ConfigError
from cifar_dist.metrics import DIRECTIONS

CONFIG_DIR = Path(__file__).parent / "configs"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelConfig:
    name: str = "fast"  # a net registered in models.py: blitz | medium | fast | resnet18
    compile: bool = False  # torch.compile the training forward/backward (GPU); weights saved plain
    # torch.compile's mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs.
    # The CUDA-graph modes cut a small net's per-step launch cost; autotuning lengthens the compile.
    compile_mode: str = "default"
    # p of every nn.Dropout in the net (medium's own is 0.2); -1 keeps the net's. Training only:
    # evaluation, predict and export never drop. A short run underfits, so 0 can pay twice there.
    dropout: float = -1.0


@dataclass
class DataConfig:
    source: str = "synthetic"  # a source registered in sources.py: cifar10 | cifar100 | imagefolder | synthetic
    # cifar10: folder holding cifar-10-batches-py/; cifar100: holding cifar-100-python/; imagefolder: folder or .tar.gz
    path: str = ""
    download: bool = True  # cifar10, cifar100: fetch with torchvision when missing (needs internet)
    labels: str = "fine"  # cifar100 only: fine (100 classes) | coarse (its 20 superclasses)
    cache_dir: str = ""  # decoded uint8 cache; "" -> $CIFAR_DIST_CACHE or ~/.cache/cifar-dist
    train_subset: int = 0  # images kept per split, the same share of every class; 0 = all
    test_subset: int = 0  # the same for the test split
    synthetic_train: int = 5000  # images, synthetic source only
    synthetic_test: int = 1000  # test images, synthetic source only
    synthetic_classes: int = 10  # synthetic source only: 10 take CIFAR-10's names, any other number class00, class01, ...
    flip: bool = True  # random horizontal flip, p = 0.5
    flip_alternate: bool = False  # each image's coin is tossed once, then mirrored every other epoch (airbench)
    translate: int = 2  # pixels: random crop of the reflect-padded image, +-translate each way
    cutout: int = 0  # pixels: side of a random square set to the mean; 0 = off


@dataclass
class EmaConfig:
    # Per optimiser step: the average's weight on its past; 0 = off. 0.999 averages over ~1,000 steps.
    decay: float = 0.0
    start_step: int = 0  # optimiser steps before averaging starts; until then the average is the weights themselves


@dataclass
class EarlyStopConfig:
    metric: str = ""  # the evaluation metric watched: test_accuracy | test_loss; "" = off
    patience: int = 3  # evaluations in a row without an improvement before the run stops
    min_delta: float = 0.0  # the least change of the metric that counts as an improvement


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training set
    batch_size: int = 512  # images per optimiser step, summed over all ranks (and over train.accumulate micro-batches)
    lr: float = 0.2  # peak learning rate for the global batch
    optimizer: str = "sgd"  # sgd (momentum, nesterov) | adamw (betas, eps; decoupled weight decay)
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw: decay rates of its two moment averages
    eps: float = 1e-8  # adamw: added to the denominator
    # sgd: L2 added to the gradient; adamw: decoupled, each step shrinks the weights by lr x weight_decay
    weight_decay: float = 5e-4
    # false: no weight decay on the parameters of norm layers and on biases (every 0- or 1-dimensional
    # parameter), the usual setting for adamw; true decays every parameter, as this project's sgd recipes do
    decay_norms_and_biases: bool = True
    accumulate: int = 1  # micro-batches per optimiser step: each rank's share of the batch in this many forward/backward passes
    clip_grad_norm: float = 0.0  # clip the global gradient norm (all ranks, after fp16 unscaling) to this; 0 = off
    ema: EmaConfig = field(default_factory=EmaConfig)  # an exponential moving average of the weights (eval.ema evaluates it)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)  # stop when the evaluations stop improving
    # Fine-tuning: start from these weights (a model.pt, a run dir or a checkpoint) instead of a fresh init; the
    # classifier head stays fresh when the classes differ. Weights only: the optimiser, schedule and step start anew.
    init_from: str = ""
    init_sha256: str = ""  # init_from's file's sha256: recorded by the run when empty; when given, the file must match
    label_smoothing: float = 0.1  # this share of each target spread evenly over all classes (cross-entropy)
    warmup_epochs: float = 1.0  # linear ramp from lr x warmup_start to lr, then the decay below
    warmup_start: float = 0.0  # the warm-up's first step's lr, as a fraction of lr
    schedule: str = "linear"  # decay after warm-up to lr x final_lr at the last step: linear | cosine | constant
    final_lr: float = 0.0  # the last step's lr, as a fraction of lr
    bias_lr_scale: float = 1.0  # BatchNorm biases: lr x this, weight_decay / this (the same decay per step)
    lookahead_every: int = 0  # steps between Lookahead pulls of the weights to their slow average; 0 = off
    whiten_bias_epochs: float = 0.0  # fast net: its whitening bias trains (as a BatchNorm bias) this long, then stays
    # auto (fp32 on CPU; bf16 on GPUs that have it, else fp16) | fp32 | bf16 | fp16 (loss-scaled); see precision.py
    precision: str = "auto"
    sync_bn: bool = False  # BatchNorm statistics over the global batch (SyncBatchNorm) or per rank
    log_every: int = 50  # optimiser steps between training records
    device: str = "auto"  # auto (GPU when present) | cpu | cuda
    # Debugging. Train on the first N batches of epoch 0 only, with the same augmentation draws each
    # time: step s of every epoch is batch s mod N (epochs keep their length); 0 = off.
    overfit_batches: int = 0
    # Debugging: stop at the first non-finite loss or gradient, naming the step and the first module
    # whose output (or gradient) was not finite; costs one device sync per step. Resumable either way.
    detect_anomaly: bool = False


@dataclass
class EvalConfig:
    every: int = 1  # epochs between evaluations; 0 = only at the end
    batch_size: int = 1000  # images per forward pass, per rank
    tta_flip: bool = False  # average logits of the image and its mirror
    tta_translate: int = 0  # pixels: also the image shifted diagonally each way (weights 1/2, 1/4, 1/4)
    ema: bool = False  # evaluate (and save in model.pt) the moving average of the weights (train.ema) instead


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_minutes: float = 0.0  # wall-clock minutes; 0 = off
    keep: int = 2  # newest checkpoints kept (plus the best by test accuracy)
    allow_config_change: bool = False  # resume even when result-changing keys differ


@dataclass
class RunConfig:
    dir: str = ""  # "" -> runs/<model>-<time>-<id>
    id: str = ""  # fixed at submit time by the sweep (cifar_dist/sweep/); "" -> generated
    name: str = ""  # display name (wandb); "" -> the run dir's name
    progress: str = "auto"  # auto (bar on a terminal, lines otherwise) | bar | lines | none


@dataclass
class TrackingConfig:
    # Trackers registered in trackers.py, any number at once: wandb, tensorboard; none (metrics.jsonl is always
    # written). One name, a list, or names split by commas (tracking.backend=wandb,tensorboard).
    backend: list[str] = field(default_factory=lambda: ["none"])
    # wandb: "" lets wandb read WANDB_PROJECT, WANDB_ENTITY and WANDB_RUN_GROUP (project: else cifar-dist); a value set here wins
    project: str = ""
    entity: str = ""  # wandb's team or user
    group: str = ""  # runs of a sweep share the sweep's name
    job_type: str = "train"  # wandb's job type
    tags: list[str] = field(default_factory=list)  # wandb's tags
    log_images: int = 8  # test images with predicted/true labels per evaluation


@dataclass
class ProfileConfig:
    steps: int = 0  # training steps traced by torch.profiler (rank 0) into run.dir/profile/; 0 = off
    wait: int = 3  # steps before the trace (one-time costs: allocator, oneDNN/cuDNN set-up); >= 1


@dataclass
class Config:
    seed: int = 0  # every random choice (initial weights, shuffling, augmentation, dropout) derives from it
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str, beside: Path | None = None) -> Path:
    """A shipped config's name (`debug`, `fast`, ...) or a path to a YAML file. A relative path is
    looked for `beside` the file that names it first (a config's or a sweep spec's `base:`), then
    relative to the current directory."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if beside is not None and not path.is_absolute() and (beside / path).is_file():
            return beside / path
        if not path.is_file():
            raise ConfigError(f"no such file {name_or_path}")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}; shipped: {', '.join(shipped_configs())}")
    return shipped


def read_config_file(cfg: Config, name_or_path: str, beside: Path | None = None, chain: tuple[Path, ...] = ()) -> None:
    """Apply a config file to `cfg`: its `base:` first (a shipped name or a YAML path, itself read
    this way), then its own keys. One base per file; a cycle or an unknown base is a ConfigError."""
    where = f"--config {' -> '.join(str(p) for p in chain)}: base" if chain else "--config"
    try:
        path = resolve_config_path(name_or_path, beside)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if path.resolve() in (p.resolve() for p in chain):
        raise ConfigError(f"{where}: {path} is already in the chain of bases (a cycle)")
    data = schema.read_yaml_mapping(path, "--config")
    if "defaults" in data:
        raise ConfigError(f"--config {path}: defaults: not read here; name one base config instead (base: medium)")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"--config {path}: base: expected a config name or a YAML path, got {base!r}")
        read_config_file(cfg, base, path.parent, (*chain, path))
    schema.update(cfg, data)


def load_config(config: str | Sequence[str] | None = None, overrides: Sequence[str] = (),
                saved: dict[str, Any] | None = None) -> Config:
    """Defaults <- `saved` (a saved config, e.g. a checkpoint's) <- each YAML file in `config` (names
    or paths, each after its `base:`; later files win, as in Hydra's defaults list) <- `key=value`
    overrides, then validate."""
    cfg = Config()
    if saved:
        schema.update(cfg, saved)
    for name in [config] if isinstance(config, str) else config or []:
        read_config_file(cfg, name)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            schema.set_key(cfg, key.strip(), raw, from_text=True)
        except ConfigError as e:
            if "," not in raw or "unknown key" in str(e):
                raise
            raise ConfigError(f"{e}; to sweep over comma-separated values use cifar-dist sweep -m "
                              f"--config ... {item}") from None
    validate(cfg)
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "") -> None:
    """--config (repeatable) and key=value overrides, in any order, for every command that takes a config."""
    parser.add_argument("--config", action="append", metavar="NAME|PATH",
                        help=f"a shipped config ({', '.join(shipped_configs())}) or a YAML path; repeat it to "
                             f"compose (later files win){what}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 data.source=imagefolder")


def validate(cfg: Config) -> None:
    """Every value in its range and every pair of settings compatible; the first problem is a
    ConfigError naming its key. Section by section, in the config's order."""
    # The registries import torch (seconds): imported here, not with the module, so the sweep
    # commands that only read configs (status, wait, cancel) start without it.
    from cifar_dist.models import MODELS
    from cifar_dist.sources import SOURCES
    from cifar_dist.trackers import TRACKERS

    c = _Checks(cfg)
    _validate_model_and_data(c, MODELS, SOURCES)
    _validate_train(c)
    _validate_the_rest(c, tuple(TRACKERS))


class _Checks:
    """`need` and `one_of` over one config: a failed check raises ConfigError naming the key and its value."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def get(self, key: str) -> Any:
        return _get(self.cfg, key)

    def need(self, ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {problem}, got {schema.shown(self.get(key))}")

    def one_of(self, key: str, allowed: tuple[str, ...]) -> None:
        self.need(self.get(key) in allowed, key, f"must be one of {', '.join(allowed)}")


def _validate_model_and_data(c: _Checks, models: dict[str, Any], sources: dict[str, Any]) -> None:
    from cifar_dist.models import set_dropout

    cfg = c.cfg
    c.one_of("model.name", tuple(models))
    c.one_of("model.compile_mode", COMPILE_MODES)
    c.need(cfg.model.dropout == -1 or 0 <= cfg.model.dropout < 1, "model.dropout", "must be -1 (the net's own) or in [0, 1)")
    if cfg.model.dropout != -1:  # a net without dropout layers would silently ignore it
        c.need(set_dropout(models[cfg.model.name](10), cfg.model.dropout) > 0, "model.dropout",
               f"model.name={cfg.model.name} has no dropout layers")
    c.one_of("data.source", tuple(sources))
    source = sources[cfg.data.source]
    if source.needs_path:
        c.need(bool(cfg.data.path), "data.path", f"is required for data.source={cfg.data.source}")
        c.need(Path(cfg.data.path).exists() or (source.downloads and cfg.data.download), "data.path", "does not exist")
    for key in ("data.train_subset", "data.test_subset", "data.translate", "data.cutout"):
        c.need(c.get(key) >= 0, key, "must be >= 0")
    c.one_of("data.labels", ("fine", "coarse"))
    c.need(cfg.data.labels == "fine" or cfg.data.source == "cifar100", "data.labels", "coarse needs data.source=cifar100")
    c.need(2 <= cfg.data.synthetic_classes <= 1000, "data.synthetic_classes", "must be in [2, 1000]")
    for key in ("data.synthetic_train", "data.synthetic_test"):
        c.need(c.get(key) >= cfg.data.synthetic_classes, key, "must be >= data.synthetic_classes (one image per class)")
    c.need(cfg.data.translate <= 16, "data.translate", "must be <= 16 pixels")
    c.need(cfg.data.cutout <= 32, "data.cutout", "must be <= 32 pixels")
    c.need(cfg.data.flip or not cfg.data.flip_alternate, "data.flip_alternate", "needs data.flip=true")


def _validate_train(c: _Checks) -> None:
    cfg = c.cfg
    c.need(cfg.train.epochs >= 1, "train.epochs", "must be >= 1")
    c.need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    c.need(cfg.train.lr > 0, "train.lr", "must be > 0")
    c.need(0 <= cfg.train.momentum < 1, "train.momentum", "must be in [0, 1)")
    c.need(not cfg.train.nesterov or cfg.train.momentum > 0, "train.nesterov", "needs train.momentum > 0")
    c.need(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    c.one_of("train.optimizer", ("sgd", "adamw"))
    c.need(len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas), "train.betas",
           "must be two numbers in [0, 1), e.g. 0.9,0.999")
    c.need(cfg.train.eps > 0, "train.eps", "must be > 0")
    c.need(cfg.train.accumulate >= 1, "train.accumulate", "must be >= 1")
    c.need(cfg.train.batch_size % cfg.train.accumulate == 0, "train.accumulate",
           f"must divide train.batch_size={cfg.train.batch_size} (the global batch is split into that many micro-batches)")
    c.need(cfg.train.clip_grad_norm >= 0, "train.clip_grad_norm", "must be >= 0 (0 = off)")
    c.need(0 <= cfg.train.ema.decay < 1, "train.ema.decay", "must be in [0, 1) (0 = off)")
    c.need(cfg.train.ema.start_step >= 0, "train.ema.start_step", "must be >= 0")
    c.need(not cfg.eval.ema or cfg.train.ema.decay > 0, "eval.ema", "needs train.ema.decay > 0 (no average is kept)")
    early = cfg.train.early_stop
    c.need(early.metric in ("", *DIRECTIONS), "train.early_stop.metric", f"must be one of {', '.join(DIRECTIONS)} or '' (off)")
    c.need(early.patience >= 1, "train.early_stop.patience", "must be >= 1 (evaluations)")
    c.need(early.min_delta >= 0, "train.early_stop.min_delta", "must be >= 0")
    c.need(not early.metric or cfg.eval.every >= 1, "train.early_stop.metric",
           "needs eval.every >= 1 (it watches the evaluations during the run)")
    c.need(all(ch in "0123456789abcdef" for ch in cfg.train.init_sha256) and len(cfg.train.init_sha256) in (0, 64),
           "train.init_sha256", "must be 64 lowercase hex digits, or empty")
    c.need(0 <= cfg.train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    c.need(0 <= cfg.train.warmup_epochs <= cfg.train.epochs, "train.warmup_epochs", "must be in [0, train.epochs]")
    c.one_of("train.schedule", ("linear", "cosine", "constant"))
    for key in ("train.warmup_start", "train.final_lr"):
        c.need(0 <= c.get(key) <= 1, key, "must be in [0, 1] (a fraction of train.lr)")
    c.need(cfg.train.bias_lr_scale > 0, "train.bias_lr_scale", "must be > 0")
    c.need(cfg.train.lookahead_every >= 0, "train.lookahead_every", "must be >= 0")
    c.need(0 <= cfg.train.whiten_bias_epochs <= cfg.train.epochs, "train.whiten_bias_epochs", "must be in [0, train.epochs]")
    c.need(not cfg.train.whiten_bias_epochs or cfg.model.name == "fast", "train.whiten_bias_epochs",
           "needs model.name=fast (the only net with a whitening layer)")
    c.one_of("train.precision", ("auto", "fp32", "bf16", "fp16"))
    c.one_of("train.device", ("auto", "cpu", "cuda"))
    c.need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    c.need(cfg.train.overfit_batches >= 0, "train.overfit_batches", "must be >= 0")
    c.need(not (cfg.train.detect_anomaly and cfg.model.compile), "train.detect_anomaly",
           "needs model.compile=false (its hooks on every module would split the compiled graph)")


def _validate_the_rest(c: _Checks, trackers: tuple[str, ...]) -> None:
    """eval, checkpoint, run, tracking, profile."""
    cfg = c.cfg
    c.need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    c.need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    c.need(0 <= cfg.eval.tta_translate <= 4, "eval.tta_translate", "must be in [0, 4] pixels")
    c.need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    c.need(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
    c.need(cfg.checkpoint.keep >= 2, "checkpoint.keep", "must be >= 2 (a corrupt newest one falls back to the previous)")
    c.one_of("run.progress", ("auto", "bar", "lines", "none"))
    c.need(all(ch.isalnum() or ch in "-_." for ch in cfg.run.id), "run.id", "may hold only letters, digits, - _ .")
    backends = cfg.tracking.backend
    c.need(bool(backends) and all(b in trackers for b in backends), "tracking.backend",
           f"must be one or more of {', '.join(trackers)}")
    c.need(len(set(backends)) == len(backends), "tracking.backend", "names a tracker twice")
    c.need("none" not in backends or len(backends) == 1, "tracking.backend", "none cannot be combined with a tracker")
    c.need(cfg.tracking.log_images >= 0, "tracking.log_images", "must be >= 0")
    c.need(cfg.profile.steps >= 0, "profile.steps", "must be >= 0")
    c.need(cfg.profile.wait >= 1, "profile.wait", "must be >= 1 (the profiler's own warm-up step)")


def _get(cfg: Config, key: str) -> Any:
    return schema.lookup(cfg, key)[2]


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with `to_dict` (run dirs, checkpoints), strictly."""
    cfg = Config()
    schema.update(cfg, data)
    validate(cfg)
    return cfg

"""One typed, strict config: dataclasses, loaded from YAML, overridden by `dotted.key=value`.

Every field is validated once, here; the rest of the code trusts the config it is given.
A mistake is a `ConfigError` whose message names the key, and the CLI turns it into one
line on stderr and exit code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifar_dist import schema
from cifar_dist.errors import ConfigError
from cifar_dist.schema import flatten

CONFIG_DIR = Path(__file__).parent / "configs"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ModelConfig:
    name: str = "fast"  # a net registered in models.py: blitz | medium | fast | resnet18
    compile: bool = False  # torch.compile the training forward/backward (GPU); weights saved plain
    # torch.compile's mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs.
    # The CUDA-graph modes cut a small net's per-step launch cost; autotuning lengthens the compile.
    compile_mode: str = "default"


@dataclass
class DataConfig:
    source: str = "synthetic"  # a source registered in sources.py: cifar10 | cifar100 | imagefolder | synthetic
    # cifar10: folder holding cifar-10-batches-py/; cifar100: holding cifar-100-python/; imagefolder: folder or .tar.gz
    path: str = ""
    download: bool = True  # cifar10, cifar100: fetch with torchvision when missing (needs internet)
    labels: str = "fine"  # cifar100 only: fine (100 classes) | coarse (its 20 superclasses)
    cache_dir: str = ""  # decoded uint8 cache; "" -> $CIFAR_DIST_CACHE or ~/.cache/cifar-dist
    train_subset: int = 0  # images kept per split, the same share of every class; 0 = all
    test_subset: int = 0
    synthetic_train: int = 5000  # images, synthetic source only
    synthetic_test: int = 1000
    synthetic_classes: int = 10  # synthetic source only: 10 take CIFAR-10's names, any other number class00, class01, ...
    flip: bool = True  # random horizontal flip, p = 0.5
    flip_alternate: bool = False  # each image's coin is tossed once, then mirrored every other epoch (airbench)
    translate: int = 2  # pixels: random crop of the reflect-padded image, +-translate each way
    cutout: int = 0  # pixels: side of a random square set to the mean; 0 = off


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 512  # images per optimiser step, summed over all ranks
    lr: float = 0.2  # peak learning rate for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2, applied by SGD to every parameter
    label_smoothing: float = 0.1
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
    backend: str = "none"  # a tracker registered in trackers.py: wandb | tensorboard | none (metrics.jsonl always)
    project: str = "cifar-dist"
    entity: str = ""
    group: str = ""  # runs of a sweep share the sweep's name
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    log_images: int = 8  # test images with predicted/true labels per evaluation


@dataclass
class ProfileConfig:
    steps: int = 0  # training steps traced by torch.profiler (rank 0) into run.dir/profile/; 0 = off
    wait: int = 3  # steps before the trace (one-time costs: allocator, oneDNN/cuDNN set-up); >= 1


@dataclass
class Config:
    seed: int = 0
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


# Keys whose value changes what a run computes; resuming across a change to one of them is refused.
RESULT_KEYS = ("seed", "model.name", "data", "train")
# ... except these, which may change on resume: more epochs, different logging or device, and the
# NaN watch (it only reads values: a run can resume with it on to find where a NaN comes from).
RESUMABLE_CHANGES = ("train.epochs", "train.log_every", "train.device", "data.cache_dir", "data.download",
                     "train.detect_anomaly")


def result_keys(cfg: Config) -> dict[str, Any]:
    """The flat `key -> value` map that decides the result of a run."""
    flat = flatten(cfg.to_dict())
    keep = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in RESULT_KEYS)}
    return {k: v for k, v in keep.items() if k not in RESUMABLE_CHANGES}


def config_hash(cfg: Config) -> str:
    blob = json.dumps(result_keys(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A shipped config's name (`debug`, `fast`, ...) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise ConfigError(f"--config: no such file {name_or_path}")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"--config: unknown config {name_or_path!r}; shipped: {', '.join(shipped_configs())}")
    return shipped


def load_config(config: str | Sequence[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- each YAML file in `config` (names or paths; later files win, as in Hydra's
    defaults list) <- `key=value` overrides, then validate."""
    cfg = Config()
    for name in [config] if isinstance(config, str) else config or []:
        schema.update(cfg, schema.read_yaml_mapping(resolve_config_path(name), "--config"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        schema.set_key(cfg, key.strip(), raw, from_text=True)
    validate(cfg)
    return cfg


def add_config_arguments(parser: argparse.ArgumentParser, what: str = "") -> None:
    """--config (repeatable) and key=value overrides, in any order, for every command that takes a config."""
    parser.add_argument("--config", action="append", metavar="NAME|PATH",
                        help=f"a shipped config ({', '.join(shipped_configs())}) or a YAML path; repeat it to "
                             f"compose (later files win){what}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 data.source=imagefolder")


def validate(cfg: Config) -> None:
    # The registries import torch (seconds): imported here, not with the module, so the sweep
    # commands that only read configs (status, wait, cancel) start without it.
    from cifar_dist.models import MODELS
    from cifar_dist.sources import SOURCES
    from cifar_dist.trackers import TRACKERS

    def need(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {problem}, got {schema.shown(_get(cfg, key))}")

    def one_of(key: str, allowed: tuple[str, ...]) -> None:
        need(_get(cfg, key) in allowed, key, f"must be one of {', '.join(allowed)}")

    one_of("model.name", tuple(MODELS))
    one_of("model.compile_mode", COMPILE_MODES)
    one_of("data.source", tuple(SOURCES))
    source = SOURCES[cfg.data.source]
    if source.needs_path:
        need(bool(cfg.data.path), "data.path", f"is required for data.source={cfg.data.source}")
        need(Path(cfg.data.path).exists() or (source.downloads and cfg.data.download), "data.path", "does not exist")
    for key in ("data.train_subset", "data.test_subset", "data.translate", "data.cutout"):
        need(_get(cfg, key) >= 0, key, "must be >= 0")
    one_of("data.labels", ("fine", "coarse"))
    need(cfg.data.labels == "fine" or cfg.data.source == "cifar100", "data.labels", "coarse needs data.source=cifar100")
    need(2 <= cfg.data.synthetic_classes <= 1000, "data.synthetic_classes", "must be in [2, 1000]")
    for key in ("data.synthetic_train", "data.synthetic_test"):
        need(_get(cfg, key) >= cfg.data.synthetic_classes, key, "must be >= data.synthetic_classes (one image per class)")
    need(cfg.data.translate <= 16, "data.translate", "must be <= 16 pixels")
    need(cfg.data.cutout <= 32, "data.cutout", "must be <= 32 pixels")
    need(cfg.data.flip or not cfg.data.flip_alternate, "data.flip_alternate", "needs data.flip=true")
    need(cfg.train.epochs >= 1, "train.epochs", "must be >= 1")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(0 <= cfg.train.momentum < 1, "train.momentum", "must be in [0, 1)")
    need(not cfg.train.nesterov or cfg.train.momentum > 0, "train.nesterov", "needs train.momentum > 0")
    need(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(0 <= cfg.train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    need(0 <= cfg.train.warmup_epochs <= cfg.train.epochs, "train.warmup_epochs", "must be in [0, train.epochs]")
    one_of("train.schedule", ("linear", "cosine", "constant"))
    for key in ("train.warmup_start", "train.final_lr"):
        need(0 <= _get(cfg, key) <= 1, key, "must be in [0, 1] (a fraction of train.lr)")
    need(cfg.train.bias_lr_scale > 0, "train.bias_lr_scale", "must be > 0")
    need(cfg.train.lookahead_every >= 0, "train.lookahead_every", "must be >= 0")
    need(0 <= cfg.train.whiten_bias_epochs <= cfg.train.epochs, "train.whiten_bias_epochs", "must be in [0, train.epochs]")
    need(not cfg.train.whiten_bias_epochs or cfg.model.name == "fast", "train.whiten_bias_epochs",
         "needs model.name=fast (the only net with a whitening layer)")
    one_of("train.precision", ("auto", "fp32", "bf16", "fp16"))
    one_of("train.device", ("auto", "cpu", "cuda"))
    need(cfg.train.log_every >= 1, "train.log_every", "must be >= 1")
    need(cfg.train.overfit_batches >= 0, "train.overfit_batches", "must be >= 0")
    need(not (cfg.train.detect_anomaly and cfg.model.compile), "train.detect_anomaly",
         "needs model.compile=false (its hooks on every module would split the compiled graph)")
    need(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(0 <= cfg.eval.tta_translate <= 4, "eval.tta_translate", "must be in [0, 4] pixels")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    need(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes", "must be >= 0")
    need(cfg.checkpoint.keep >= 2, "checkpoint.keep", "must be >= 2 (a corrupt newest one falls back to the previous)")
    one_of("run.progress", ("auto", "bar", "lines", "none"))
    need(all(c.isalnum() or c in "-_." for c in cfg.run.id), "run.id", "may hold only letters, digits, - _ .")
    one_of("tracking.backend", tuple(TRACKERS))
    need(cfg.tracking.log_images >= 0, "tracking.log_images", "must be >= 0")
    need(cfg.profile.steps >= 0, "profile.steps", "must be >= 0")
    need(cfg.profile.wait >= 1, "profile.wait", "must be >= 1 (the profiler's own warm-up step)")


def _get(cfg: Config, key: str) -> Any:
    return schema.lookup(cfg, key)[2]


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with `to_dict` (run dirs, checkpoints), strictly."""
    cfg = Config()
    schema.update(cfg, data)
    validate(cfg)
    return cfg

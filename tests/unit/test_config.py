"""Config strictness in-process: the shipped configs load, overrides and YAML numbers read as people
write them, and every bad value is a ConfigError naming the key. Through the commands (one line, exit
code 2, nothing written): tests/e2e/test_config.py."""

from __future__ import annotations

import json

import pytest
import yaml

from cifar_dist.config import ConfigError, config_from_dict, config_hash, load_config, shipped_configs
from tests.helpers import ROOT


def test_shipped_configs_exist_and_load():
    assert {"debug", "blitz", "medium", "fast", "resnet18"} <= set(shipped_configs())
    for name in shipped_configs():
        cfg = load_config(name)
        assert cfg.model.name in ("blitz", "medium", "fast", "resnet18"), name


def test_overrides_are_parsed_to_the_field_type():
    cfg = load_config("debug", ["train.epochs=7", "train.lr=1", "train.nesterov=false", "run.dir=123",
                                "tracking.tags=[a, b]", "seed=3", "data.cutout=8"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.nesterov is False and cfg.train.momentum > 0
    assert cfg.run.dir == "123"
    assert cfg.tracking.tags == ["a", "b"]
    assert (cfg.seed, cfg.data.cutout) == (3, 8)


def test_yaml_round_trip():
    cfg = load_config("fast", ["train.epochs=3"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("override", "key", "problem"),
    [
        ("train.epochz=3", "train.epochz", "unknown key"),
        ("bogus=1", "bogus", "unknown key"),
        ("train.epochs=abc", "train.epochs", "expected an integer"),
        ("train.epochs=2.5", "train.epochs", "expected an integer"),
        ("train.lr=fast", "train.lr", "expected a number"),
        ("train.epochs=-1", "train.epochs", "must be >= 1"),
        ("model.name=vgg", "model.name", "must be one of"),
        ("model.compile_mode=fastest", "model.compile_mode", "must be one of"),
        ("data.source=imagenet", "data.source", "must be one of"),
        ("data.source=imagefolder", "data.path", "is required"),
        ("data.path=/no/such/place", "data.path", "does not exist"),
        ("train.batch_size=0", "train.batch_size", "must be >= 1"),
        ("checkpoint.keep=1", "checkpoint.keep", "must be >= 2"),
        ("train.warmup_start=1.5", "train.warmup_start", "must be in [0, 1]"),
        ("train.final_lr=-0.1", "train.final_lr", "must be in [0, 1]"),
        ("train.bias_lr_scale=0", "train.bias_lr_scale", "must be > 0"),
        ("train.whiten_bias_epochs=-1", "train.whiten_bias_epochs", "must be in [0, train.epochs]"),
        ("model.name=medium train.whiten_bias_epochs=1", "train.whiten_bias_epochs", "needs model.name=fast"),
        ("eval.tta_translate=9", "eval.tta_translate", "must be in [0, 4]"),
        ("data.flip=false data.flip_alternate=true", "data.flip_alternate", "needs data.flip=true"),
        ("train", "override", "expected dotted.key=value"),
    ],
)
def test_bad_values_fail_in_process(override, key, problem):
    overrides = override.split() if override != "data.path=/no/such/place" else ["data.source=imagefolder", override]
    with pytest.raises(ConfigError) as e:
        load_config("debug", overrides)
    assert str(e.value).startswith(key) and problem in str(e.value)


@pytest.mark.parametrize("number", ["1e-3", "1E-3", "0.001", ".001", "1_0e-4"])
def test_numbers_as_people_write_them_in_overrides_and_yaml(number, tmp_path):
    assert load_config("debug", [f"train.lr={number}"]).train.lr == pytest.approx(0.001)
    f = tmp_path / "lr.yaml"
    f.write_text(f"train: {{lr: {number}}}\n")
    assert load_config(str(f)).train.lr == pytest.approx(0.001)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e999"])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises(ConfigError) as e:
        load_config("debug", [f"train.lr={value}"])
    assert str(e.value).startswith("train.lr:")


def test_shipped_configs_keep_the_hash_their_runs_were_made_with():
    """The config hash is stored in every run dir and checkpoint: a resume is refused when it differs.
    Keys added later are hashed only when set (config.HASHED_WHEN_SET), so runs of the shipped
    configs made before them resume; the golden file holds the hashes those runs carry."""
    golden = json.loads((ROOT / "tests" / "golden" / "config_hashes.json").read_text())
    assert {name: config_hash(load_config(name)) for name in shipped_configs()} == golden
    assert config_hash(load_config("debug", ["train.optimizer=adamw"])) != golden["debug"]  # set: it counts

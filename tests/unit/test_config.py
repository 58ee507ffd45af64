"""Config strictness in-process: the shipped configs load, overrides and YAML numbers read as people
write them, and every bad value is a ConfigError naming the key. Through the commands (one line, exit
code 2, nothing written): tests/e2e/test_config.py."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from cifar_dist.config import ConfigError, config_from_dict, load_config, shipped_configs
from cifar_dist.result_keys import config_hash
from cifar_dist.schema import load_yaml, shown
from tests.helpers import PY, ROOT, run


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
        ("model.name=medium model.dropout=1", "model.dropout", "must be -1 (the net's own) or in [0, 1)"),
        ("model.name=medium model.dropout=-0.5", "model.dropout", "must be -1 (the net's own) or in [0, 1)"),
        ("model.name=blitz model.dropout=0.1", "model.dropout", "model.name=blitz has no dropout layers"),
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
    Keys added later are hashed only when set (result_keys.HASHED_WHEN_SET), so runs of the shipped
    configs made before them resume; the golden file holds the hashes those runs carry."""
    golden = json.loads((ROOT / "tests" / "golden" / "config_hashes.json").read_text())
    assert {name: config_hash(load_config(name)) for name in shipped_configs()} == golden
    assert config_hash(load_config("debug", ["train.optimizer=adamw"])) != golden["debug"]  # set: it counts


def test_a_config_file_composes_on_one_base(tmp_path, monkeypatch):
    """`base:` is read first (a shipped name, or a path beside the file, then from the current
    directory), then the file's own keys, then later files and overrides; bases chain."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("base: medium\ntrain: {epochs: 3, lr: 0.05}\n")
    (tmp_path / "sub" / "seed4.yaml").write_text("base: mine.yaml  # beside this file\nseed: 4\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("sub/seed4.yaml", ["train.lr=0.2"])
    medium = load_config("medium")
    assert (cfg.model.name, cfg.train.batch_size, cfg.data.source) == (medium.model.name, medium.train.batch_size,
                                                                       medium.data.source)
    assert (cfg.train.epochs, cfg.train.lr, cfg.seed) == (3, 0.2, 4)  # the file's keys, then the override
    assert load_config(["sub/seed4.yaml", "debug"]).model.name == load_config("debug").model.name  # later files win


@pytest.mark.parametrize(("files", "message"), [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
     "--config a.yaml -> b.yaml: base: a.yaml is already in the chain of bases (a cycle)"),
    ({"a.yaml": "base: a.yaml\n"}, "--config a.yaml: base: a.yaml is already in the chain of bases (a cycle)"),
    ({"a.yaml": "base: mediun\n"}, "--config a.yaml: base: unknown config 'mediun'; shipped: blitz,"),
    ({"a.yaml": "base: gone.yaml\n"}, "--config a.yaml: base: no such file gone.yaml"),
    ({"a.yaml": "base: [medium]\n"}, "--config a.yaml: base: expected a config name or a YAML path, got ['medium']"),
    ({"a.yaml": "defaults: [medium]\n"}, "--config a.yaml: defaults: not read here; name one base config instead"),
])
def test_base_mistakes_are_one_line(files, message, env, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    proc = run([PY, "-m", "cifar_dist.cli", "train", "--config", "a.yaml", f"run.dir={tmp_path / 'run'}"], env,
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_comma_list_where_one_value_goes_points_to_the_sweep():
    with pytest.raises(ConfigError) as e:
        load_config("debug", ["train.lr=0.01,0.1"])
    assert str(e.value).startswith("train.lr: expected a number, got '0.01,0.1'")
    assert "cifar-dist sweep -m --config ... train.lr=0.01,0.1" in str(e.value)
    assert load_config("debug", ["tracking.tags=a,b"]).tracking.tags == ["a", "b"], "a list key takes the list"


def test_a_slurm_time_in_yaml_stays_text(tmp_path):
    """YAML 1.1 reads an unquoted 2:00:00 as the base-60 number 7200; the project's loader keeps it text."""
    (tmp_path / "t.yaml").write_text("run: {name: 2:00:00}\ntrain: {epochs: 1:30}\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got '1:30'"):
        load_config(str(tmp_path / "t.yaml"))
    (tmp_path / "t.yaml").write_text("run: {name: 2:00:00}\n")
    assert load_config(str(tmp_path / "t.yaml")).run.name == "2:00:00"


LAUGHS = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("train: {lr: 0.1}\nseed: 1\ntrain: {momentum: 0.5}\n", "train is given twice (lines 1 and 3)"),
        ("train.lr: 0.1\ntrain:\n  lr: 0.2\n", "train.lr is given twice (lines 1 and 3)"),
        ("train:\n  lr: 0.1\ntrain.lr: 0.2\n", "train.lr is given twice (lines 2 and 3)"),
        ("tracking:\n  tags: [a]\n  tags: [b]\n", "tracking.tags is given twice (lines 2 and 3)"),
    ],
)
def test_a_key_given_twice_in_either_spelling_is_refused(tmp_path, text, said):
    f = tmp_path / "twice.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(str(f))


def test_keys_given_once_in_both_spellings_and_merge_keys_still_load(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("train.lr: 0.3\ntrain:\n  momentum: 0.8\n")
    assert (load_config(str(f)).train.lr, load_config(str(f)).train.momentum) == (0.3, 0.8)
    assert load_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, y: 3}\n")["b"] == {"x": 1, "y": 3}  # overriding a merge is its use


def test_a_key_twice_in_an_override_value_is_refused():
    with pytest.raises(ConfigError, match="tracking.tags: cannot parse .* is given twice"):
        load_config("debug", ["tracking.tags={a: 1, a: 2}"])


@pytest.mark.parametrize("where", ["top", "override"])
def test_a_billion_laughs_is_refused_in_bounded_time_and_one_short_line(tmp_path, where):
    """9 levels of 10 aliases: 10^9 strings once expanded. Refused before anything is built or
    printed; the message stays short whatever the value would have been."""
    f = tmp_path / "laughs.yaml"
    f.write_text(LAUGHS + "run: {name: *l8}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(f)) if where == "top" else load_config("debug", [f"tracking.tags={LAUGHS.splitlines()[-1]}"])
    assert len(str(caught.value)) < 400
    if where == "top":
        assert "aliases expand it to more than 10,000 nodes" in str(caught.value)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    f = tmp_path / "loop.yaml"
    f.write_text("tracking: {tags: &t [a, *t]}\n")
    with pytest.raises(ConfigError, match="aliases expand it to more than"):
        load_config(str(f))


def test_a_long_value_is_cut_short_in_a_message(tmp_path):
    f = tmp_path / "long.yaml"
    f.write_text(f"train: {{epochs: {['x' * 10_000] * 1000}}}\n")
    with pytest.raises(ConfigError, match="train.epochs: expected an integer") as caught:
        load_config(str(f))
    assert len(str(caught.value)) < 300
    assert shown("y" * 10_000).endswith("yyy'") and len(shown("y" * 10_000)) < 80


def test_a_config_file_that_is_not_utf8_or_nested_too_deeply_is_one_error(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("run: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 15\)"):
        load_config(str(tmp_path / "latin1.yaml"))
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(str(tmp_path / "deep.yaml"))
    (tmp_path / "utf8.yaml").write_text("run: {name: caf\u00e9}\n", encoding="utf-8")
    assert load_config(str(tmp_path / "utf8.yaml")).run.name == "caf\u00e9"

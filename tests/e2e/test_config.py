"""Config strictness through the commands: a bad config or override is one line naming the key, exit
code 2, nothing written; every entry point reaches the same parser. In-process: tests/unit/test_config.py."""

from __future__ import annotations

import pytest
import yaml

from cifar_dist.config import CONFIG_DIR, shipped_configs
from tests.helpers import PY, run, train_cmd


@pytest.mark.parametrize(
    "overrides",
    [["train.epochz=3"], ["train.epochs=abc"], ["train.epochs=-2"], ["model.name=vgg"], ["data.source=imagenet"],
     ["data.source=imagefolder", "data.path=/no/such/dir"]],
)
def test_cli_bad_config_is_one_line_exit_2_and_writes_nothing(overrides, env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(*overrides, f"run.dir={run_dir}", config="debug"), env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert overrides[-1].split("=")[0] in lines[0]
    assert not run_dir.exists()


def test_cli_unknown_config_name_and_bad_yaml(env, tmp_path):
    proc = run(train_cmd(config="nope"), env, check=False)
    assert proc.returncode == 2 and "unknown config 'nope'" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    proc = run(train_cmd(config=str(bad)), env, check=False)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    nested = tmp_path / "nested.yaml"
    nested.write_text("train: {epochs: 2, colour: red}\n")
    proc = run(train_cmd(config=str(nested)), env, check=False)
    assert proc.returncode == 2 and "train.colour: unknown key" in proc.stderr


def test_print_config_prints_the_resolved_config(env):
    proc = run(train_cmd("train.epochs=4", "--print-config", config="medium"), env)
    printed = yaml.safe_load(proc.stdout)
    expected = yaml.safe_load((CONFIG_DIR / "medium.yaml").read_text())
    assert printed["train"]["epochs"] == 4
    assert printed["model"]["name"] == expected["model"]["name"] == "medium"
    assert printed["train"]["batch_size"] == expected["train"]["batch_size"]


def test_every_entry_point_reaches_the_same_parser(env):
    for cmd in ([PY, "-m", "cifar_dist.train"], [PY, "-m", "cifar_dist.cli", "train"], [PY, "cifar_dist/train.py"]):
        proc = run(cmd + ["--config", "debug", "train.epochs=9", "--print-config"], env)
        assert yaml.safe_load(proc.stdout)["train"]["epochs"] == 9, cmd


def test_overrides_go_before_or_after_config_and_configs_compose(env, tmp_path):
    extra = tmp_path / "more.yaml"
    extra.write_text("train: {epochs: 9, lr: 0.3}\n")
    proc = run([PY, "-m", "cifar_dist.cli", "train", "train.lr=0.01", "--config", "medium", "--config", str(extra),
                "seed=4", "--print-config"], env)
    printed = yaml.safe_load(proc.stdout)
    assert printed["model"]["name"] == "medium"  # from the first file
    assert printed["train"]["epochs"] == 9  # the later file wins
    assert printed["train"]["lr"] == 0.01 and printed["seed"] == 4  # overrides, wherever they stand, win over files


def test_help_names_every_shipped_config(env):
    out = run([PY, "-m", "cifar_dist.cli", "train", "--help"], env).stdout
    assert all(name in " ".join(out.split()) for name in shipped_configs())


def test_version_names_the_package_and_torch(env):
    from importlib.metadata import version

    import torch

    proc = run([PY, "-m", "cifar_dist.cli", "--version"], env)
    assert proc.stdout.startswith(f"cifar-dist {version('cifar-dist')} (torch {torch.__version__.split('+')[0]}")
    assert proc.stderr == ""

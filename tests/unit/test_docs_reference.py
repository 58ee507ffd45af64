"""The docs' generated references cover everything (docs/hooks/reference.py): every config key with
its type, default and comment, every command and every flag; and the architecture page names every
module of the package."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys

import pytest

from cifar_dist import cli
from cifar_dist.config import Config
from cifar_dist.schema import flatten
from cifar_dist.sweep.commands import COMMANDS
from tests.helpers import ROOT


def load_reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


reference = load_reference()


def section(page: str, title: str) -> str:
    """The text under `## title` up to the next `## `."""
    start = page.index(f"## {title}\n")
    end = page.find("\n## ", start + 1)
    return page[start:] if end < 0 else page[start:end]


def test_every_config_key_is_in_the_reference_with_its_default_and_meaning():
    page = reference.config_page()
    rows = {m[0]: m[1:] for m in re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| (.*?) \| (.*) \|$", page, re.M)}
    keys = flatten(Config().to_dict())
    assert len(keys) > 60
    missing = [k for k in keys if k not in rows]
    assert missing == [], f"config keys missing from the reference: {missing}"
    for key, value in keys.items():
        type_, default, meaning = rows[key]
        assert meaning.strip(), f"{key}: no comment beside its field in cifar_dist/config.py"
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        if isinstance(value, list):
            shown = "[" + ", ".join(map(str, value)) + "]"
        assert shown in default, f"{key}: default {value!r}, the reference says {default}"
    assert rows["train.lr"][0] == "float" and rows["tracking.backend"][0] == "list[str]"
    assert "summed over all ranks" in rows["train.batch_size"][2]  # the comment beside the field


def test_every_command_is_in_the_cli_reference():
    page = reference.cli_page()
    listed = {line.split()[0] for line in cli.USAGE.split("commands:\n")[1].split("\n\n")[0].splitlines()}
    assert {"train", "evaluate", "predict", "serve", "export", "compare", "data", "sweep", "launch", "lr-find"} <= listed
    for command in [*listed, *(f"sweep {c}" for c in COMMANDS)]:
        assert f"## `cifar-dist {command}`" in page, command


def help_flags(argv: list[str]) -> set[str]:
    """The option strings a command's own --help lists (its option lines), asked as a user would."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return {flag for line in out.getvalue().splitlines()
            if (m := re.match(r"^  (-[^\s,]+(?:[^,\n]*?, -[^\s,]+)*)", line))
            for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", m[1])}


@pytest.mark.parametrize("command", ["train", "lr-find", "evaluate", "predict", "serve", "export", "compare", "data",
                                     "sweep", *(f"sweep {c}" for c in COMMANDS)])
def test_every_flag_is_in_the_cli_reference(command):
    page = section(reference.cli_page(), f"`cifar-dist {command}`")
    flags = help_flags(command.split()) - {"-h", "--help"}
    assert flags, f"{command} --help lists no options"
    missing = [f for f in sorted(flags) if f"`{f}`" not in page]
    assert missing == [], f"cifar-dist {command}: flags missing from the reference: {missing}"
    parser = dict(reference.command_parsers())[command]
    positionals = [a for a in parser._actions if not a.option_strings]
    for action in positionals:
        assert f"`{reference.option_names(action)[0]}`" in page


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "cifar_dist"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        relative = path.relative_to(ROOT).as_posix()
        named = relative in page if path.parent == package else f"`{path.name}`" in page or relative in page
        if not named:
            missing.append(relative)
    assert missing == [], f"modules the architecture page does not name: {missing}"


def test_every_shipped_config_is_listed_in_the_readme_and_the_training_page():
    from cifar_dist.config import shipped_configs

    for page in (ROOT / "README.md", ROOT / "docs" / "training.md"):
        listed = set(re.findall(r"^\| `([a-z0-9_]+)`(?:, `([a-z0-9_]+)`)? \|", page.read_text(), re.M))
        names = {n for pair in listed for n in pair if n}
        missing = sorted(set(shipped_configs()) - names)
        assert missing == [], f"{page.name}: shipped configs missing from its table: {missing}"

"""MkDocs hook: the config reference and the command-line reference, generated at build time.

The config reference reads `cifar_dist/config.py`: every key of `Config` (its dataclasses, nested),
its type as annotated, its default from a fresh `Config()`, and the comment beside the field (the
comment lines just above it, then the one at the end of its line). The command-line reference
asks each command for the argparse parser it builds: each command is called with no arguments
while `ArgumentParser.parse_known_args` is replaced by a stop that hands back the parser, so the
reference shows exactly the flags, defaults and help the command itself has, and nothing runs.
tests/unit/test_docs_reference.py checks that every config key and every flag is in the pages.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_PAGE, CLI_PAGE = "reference/config.md", "reference/cli.md"


# ---------------------------------------------------------------------------- config


@dataclasses.dataclass
class Key:
    key: str  # dotted, as in a key=value override
    type: str
    default: Any
    meaning: str
    section: bool  # a nested dataclass (train.ema): its keys follow


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> its comment: the comment lines right above the field, then the one ending its line."""
    lines = source.splitlines()
    trailing = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    comments = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, lines[line - 1].strip().lstrip("#").strip())
                line -= 1
            own = trailing.get(item.lineno) if not lines[item.lineno - 1].strip().startswith("#") else None
            comments[(node.name, item.target.id)] = " ".join([*above, *([own] if own else [])])
    return comments


def field_types(source: str) -> dict[tuple[str, str], str]:
    return {(node.name, item.target.id): ast.unparse(item.annotation)
            for node in ast.parse(source).body if isinstance(node, ast.ClassDef)
            for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}


def config_keys() -> list[Key]:
    """Every key of the training config, in the order config.py declares them."""
    from cifar_dist import config

    source = Path(config.__file__).read_text()
    comments, types = field_comments(source), field_types(source)
    keys: list[Key] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, name = getattr(obj, f.name), prefix + f.name
            where = (type(obj).__name__, f.name)
            nested = dataclasses.is_dataclass(value)
            keys.append(Key(name, types[where], None if nested else value, comments.get(where, ""), nested))
            if nested:
                walk(value, name + ".")

    walk(config.Config(), "")
    return keys


def shown_default(value: Any) -> str:
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value}`"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_page() -> str:
    from cifar_dist.config import shipped_configs

    keys = config_keys()
    out = ["# Config reference", "",
           "Every key of the training config, generated from `cifar_dist/config.py` when these pages are built: "
           "its type, its default and the comment beside the field. Set a key in a YAML file (`train: {lr: 0.1}`) "
           "or on the command line (`train.lr=0.1`); see [Training and configs](../training.md). The shipped "
           f"configs ({', '.join(f'`{c}`' for c in shipped_configs())}) start from these defaults.", ""]
    groups = [("Top level", [k for k in keys if "." not in k.key and not k.section])]
    groups += [(f"`{k.key}`", [c for c in keys if c.key.startswith(k.key + ".")]) for k in keys if k.section and "." not in k.key]
    for title, rows in groups:
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in rows:
            default = "(the keys below)" if k.section else shown_default(k.default)
            out.append(f"| `{k.key}` | `{k.type}` | {default} | {cell(k.meaning)} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------- command line


class _Parsed(BaseException):
    """Raised by the stand-in for parse_known_args: it carries the parser a command built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def parser_of(call: Callable[[], Any]) -> argparse.ArgumentParser:
    """The parser `call` builds, taken at the moment it starts parsing; nothing of the command runs."""

    def stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = stop  # type: ignore[method-assign]
    try:
        call()
    except _Parsed as parsed:
        return parsed.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{call} returned without parsing a command line")


def command_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command, its parser) for every command `cifar-dist` dispatches that takes flags."""
    from cifar_dist import cli
    from cifar_dist.sweep.commands import COMMANDS

    commands = ["train", "lr-find", "evaluate", "predict", "serve", "export", "compare", "data"]
    found = [(name, parser_of(lambda name=name: cli.main([name]))) for name in commands]
    found.append(("sweep", parser_of(lambda: cli.main(["sweep"]))))
    found += [(f"sweep {sub}", parser_of(lambda sub=sub: cli.main(["sweep", sub]))) for sub in COMMANDS]
    return found


def option_names(action: argparse.Action) -> list[str]:
    return list(action.option_strings) or [action.metavar if isinstance(action.metavar, str) else action.dest]


def help_text(action: argparse.Action, parser: argparse.ArgumentParser) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {**vars(action), "prog": parser.prog}
    if action.choices and "|" not in text:
        text = f"{text} (one of: {', '.join(map(str, action.choices))})".lstrip()
    return text


def parser_section(command: str, parser: argparse.ArgumentParser) -> list[str]:
    out = [f"## `cifar-dist {command}`", ""]
    if parser.description:
        out += [parser.description, ""]
    usage = parser.format_usage().removeprefix("usage: ").strip()
    out += ["```text", usage, "```", "", "| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{n}`" for n in option_names(action))
        if action.option_strings and action.nargs != 0 and action.metavar:
            names += f" `{action.metavar}`"
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS  # 0 is a default worth showing; False (a flag's off) is not
        default = "" if unset or not action.option_strings else f"`{action.default}`"
        out.append(f"| {names} | {default} | {cell(help_text(action, parser))} |")
    if parser.epilog:
        out += ["", parser.epilog]
    return [*out, ""]


def cli_page() -> str:
    from cifar_dist import cli, launcher

    out = ["# Command-line reference", "",
           "Generated from the commands' own argparse parsers when these pages are built. `cifar-dist COMMAND "
           "--help` prints the same. `python jobs/submit.py ...` is `cifar-dist sweep ...`.", "",
           "```text", cli.USAGE, "```", ""]
    for command, parser in command_parsers():
        out += parser_section(command, parser)
    first = launcher.__doc__.split("\n\n")[0].split(": ", 1)[1]
    out += ["## `cifar-dist launch`", "", first.replace("\n", " "), "", "```text", launcher.USAGE.removeprefix("usage: "),
            "```", "", "| exit code | meaning |", "|---|---|", *(f"| {c} | {cell(m)} |" for c, m in launcher.MEANING.items()), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- the MkDocs hook


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, text in ((CONFIG_PAGE, config_page()), (CLI_PAGE, cli_page())):
        files.append(File.generated(config, uri, content=text))
    return files

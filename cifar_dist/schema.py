"""The one strict loader: typed dataclasses filled from YAML mappings or `dotted.key=value` text.

It serves the training config, sweep specs and cluster profiles alike. Each default lives once,
on its dataclass field; an unknown key, a wrong type or a non-finite number is a `ConfigError`
whose one-line message names the key. Numbers are read as people write them: `1e-3`, `5E-4`,
`.5` and `1_000` are numbers here, although YAML 1.1 (PyYAML) reads some of them as text.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cifar_dist.errors import ConfigError

T = TypeVar("T")
# What Python's float() accepts as a finite decimal number (no inf/nan), underscores between digits.
_DIGITS = r"\d(?:_?\d)*"
_NUMBER = re.compile(rf"[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?")
_INTEGER = re.compile(rf"[+-]?{_DIGITS}")
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
# YAML nodes a document may hold once its aliases are expanded: a config or a spec holds hundreds; a
# "billion laughs" (aliases of aliases) a billion, which would exhaust memory when built or printed.
MAX_NODES = 10_000
MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base`: its keys may be given again (that is what it is for)
# A value shown in a message: its start, never all of it (a value may be any size).
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


class YamlRefused(yaml.YAMLError):
    """A document that parses but is refused: a key given twice, or too many nodes once aliases are expanded."""


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, made strict as every loader of configs should be: a key given twice in a
    mapping (`train:` twice; `train.lr` beside `train: {lr: ...}`, which spell the same key) is an
    error naming it and both lines, where PyYAML keeps the last silently; so is a document that
    expands to more than MAX_NODES nodes through its aliases. And `2:00:00` and `90:30` are text, as
    in YAML 1.2, not YAML 1.1's base-60 numbers (7200, 5430): a Slurm time limit written unquoted
    stays what it says."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        if node is not None:
            if _expanded_size(node, {}) > MAX_NODES:
                raise YamlRefused(f"its aliases expand it to more than {MAX_NODES:,} nodes, more than a config holds "
                                  "(aliases of aliases?); refused")
            _check_keys(node, "")
        return node


# The int and float resolvers, made to skip anything with a colon (their base-60 branch only).
Loader.yaml_implicit_resolvers = {
    first: [(tag, re.compile("^(?!.*:)" + regexp.pattern.removeprefix("^"), regexp.flags)
             if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in `node` with every alias expanded (an alias is the same node object again), counted
    without expanding them: each node once, its size remembered; past MAX_NODES, MAX_NODES + 1. A
    node that holds itself (an alias inside its own anchor) expands without end."""
    if id(node) not in memo:
        memo[id(node)] = MAX_NODES + 1  # until counted: a cycle back to it counts as too many
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        memo[id(node)] = min(1 + sum(_expanded_size(c, memo) for c in children), MAX_NODES + 1)
    return memo[id(node)]


def _check_keys(node: yaml.Node, where: str) -> None:
    """Refuse a key given twice in any mapping of `node`, in either spelling (dotted or nested)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(item, f"{where.rstrip('.')}[{i}].")
    elif isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, line, value in _leaves(node, where):
            if key in lines:
                raise _given_twice(key, lines[key], line)
            lines[key] = line
            if isinstance(value, yaml.SequenceNode):
                _check_keys(value, f"{key}.")


def _leaves(node: yaml.MappingNode, where: str) -> list[tuple[str, int, yaml.Node]]:
    """(dotted key, line, value) of each leaf under `node`, nested mappings flattened; a key
    repeated in one mapping is refused here (both copies may hold different keys below)."""
    out, seen = [], {}
    for key_node, value in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == MERGE_TAG:
            continue
        key, line = f"{where}{key_node.value}", key_node.start_mark.line + 1
        if key in seen:
            raise _given_twice(key, seen[key], line)
        seen[key] = line
        if isinstance(value, yaml.MappingNode) and value.value:
            out += _leaves(value, f"{key}.")
        else:
            out.append((key, line, value))
    return out


def _given_twice(key: str, first: int, second: int) -> YamlRefused:
    return YamlRefused(f"{key} is given twice (lines {first} and {second}); give each key once")


def load_yaml(text: str) -> Any:
    """`text` read by `Loader`: every config, spec, profile and command-line value is read so."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)


def shown(value: Any) -> str:
    """`value` as a message shows it: its repr, cut short (60 characters of text, 4 items of a list)."""
    return _SHORT.repr(value)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping), read as UTF-8."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{what}: {path} is nested too deeply to be a config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def build(cls: type[T], data: Any, where: str = "") -> T:
    """A `cls` dataclass from a mapping: defaults for absent keys, every given key checked.
    `where` prefixes the keys in messages ("resources." -> "resources.nodes: ...")."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the file'}: expected a mapping, got {shown(data)}")
    obj = cls()
    update(obj, data, where)
    return obj


def update(obj: Any, data: dict[Any, Any], where: str = "") -> None:
    """Set every leaf of a nested (or dotted-key) mapping on the dataclass `obj`."""
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}{shown(key)}: not a key name")
        _, _, current = lookup(obj, key, where)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            update(current, value, f"{where}{key}.")
        else:
            set_key(obj, key, value, where=where)


def set_key(obj: Any, key: str, value: Any, from_text: bool = False, where: str = "") -> None:
    """Set `key` (dotted) to `value`, converted to the field's type; text comes from a command line."""
    parent, name, current = lookup(obj, key, where)
    full = f"{where}{key}"
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{full}: is a section, set one of its keys ({full}.<name>=...)")
    hint = typing.get_type_hints(type(parent))[name]
    if from_text and hint is not str:
        try:
            value = load_yaml(value)
        except (yaml.YAMLError, RecursionError) as e:
            why = f" ({str(e).splitlines()[0]})" if isinstance(e, YamlRefused) else ""
            raise ConfigError(f"{full}: cannot parse {shown(value)}{why}") from None
    setattr(parent, name, convert(full, hint, value, from_text))


def lookup(obj: Any, key: str, where: str = "") -> tuple[Any, str, Any]:
    """(the dataclass holding `key`, the field's name, its value)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        if part not in names:
            section = where + ".".join(parts[:i])
            valid = f"valid under {section.rstrip('.')}: " if section.rstrip(".") else "valid: "
            raise ConfigError(f"{where}{key}: unknown key ({valid}{', '.join(names)})" if names else
                              f"{where}{key}: unknown key ({'.'.join(parts[:i])} has no keys)")
        if i == len(parts) - 1:
            return obj, part, getattr(obj, part)
        obj = getattr(obj, part)
    raise AssertionError("unreachable")


def convert(key: str, hint: Any, value: Any, from_text: bool = False) -> Any:
    """`value` as the type `hint` (str, bool, int, float, X | None, list[X], dict[str, X], a dataclass
    built from a mapping, or Any: plain data kept as given), or a ConfigError."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                return build(arm, value, f"{key}.")  # its own message names the key inside it
            try:
                return convert(key, arm, value, from_text)
            except ConfigError:
                continue
        names = " or ".join(_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {names}, got {shown(value)} ({type(value).__name__})")
    if hint is str:
        if isinstance(value, str):
            return value
        if from_text and value is not None:
            return str(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
            return int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value.strip())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {shown(value)}")
            return float(value)
    elif origin is list:
        (item,) = args
        # Text from a command line is split at commas; so is one string given for a list of strings in
        # YAML (`backend: wandb` is [wandb]).
        if isinstance(value, str) and (from_text or item is str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return [convert(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return build(hint, value, f"{key}.")
    elif origin is dict and isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key}: key {shown(k)} is not a name")
            out[k] = convert(f"{key}.{k}", args[1], v)
        return out
    raise ConfigError(f"{key}: expected {_name(hint)}, got {shown(value)} ({type(value).__name__})")


def _name(hint: Any) -> str:
    if hint in TYPE_NAMES:
        return TYPE_NAMES[hint]
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out

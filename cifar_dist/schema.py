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


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `2:00:00` and `90:30` are text, as in YAML 1.2, not YAML
    1.1's base-60 numbers (7200, 5430): a Slurm time limit written unquoted stays what it says."""


# The int and float resolvers, made to skip anything with a colon (their base-60 branch only).
Loader.yaml_implicit_resolvers = {
    first: [(tag, re.compile("^(?!.*:)" + regexp.pattern.removeprefix("^"), regexp.flags)
             if tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") else regexp) for tag, regexp in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with `Loader`: every config, spec, profile and command-line value is read so."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 (Loader is a SafeLoader)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    try:
        data = load_yaml(path.read_text())
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path} ({e.strerror})") from None
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
        raise ConfigError(f"{where.rstrip('.') or 'the file'}: expected a mapping, got {data!r}")
    obj = cls()
    update(obj, data, where)
    return obj


def update(obj: Any, data: dict[Any, Any], where: str = "") -> None:
    """Set every leaf of a nested (or dotted-key) mapping on the dataclass `obj`."""
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}{key!r}: not a key name")
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
        except yaml.YAMLError:
            raise ConfigError(f"{full}: cannot parse {value!r}") from None
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
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
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
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
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
                raise ConfigError(f"{key}: key {k!r} is not a name")
            out[k] = convert(f"{key}.{k}", args[1], v)
        return out
    raise ConfigError(f"{key}: expected {_name(hint)}, got {value!r} ({type(value).__name__})")


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

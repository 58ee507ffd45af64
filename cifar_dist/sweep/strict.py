"""Strict reading of the YAML files jobs/ owns (sweep specs, cluster profiles), like the training
config: an unknown key, a wrong type or an impossible value is a `SpecError` whose one-line
message names the key, raised before anything is submitted or written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cifar_dist.errors import ConfigError


class SpecError(ConfigError):
    """A mistake in a sweep spec, a cluster profile or the command line; the message names the key."""


def load_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise SpecError(f"{what}: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{what}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what}: {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def check_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(f"{where}{key}: unknown key (valid: {', '.join(allowed)})")


def take(data: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    """data[key] checked against `kind` (a bool is never a number here; an int is a float);
    `default` when the key is absent or null, an error when there is no default."""
    if data.get(key) is None:
        if default is ...:
            raise SpecError(f"{where}{key}: missing")
        return default
    value = data[key]
    numeric = kind in (int, float)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
        raise SpecError(f"{where}{key}: expected {TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return value


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
              dict: "a mapping"}

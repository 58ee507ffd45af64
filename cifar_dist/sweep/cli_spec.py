"""A sweep spelled on the command line (`cifar-dist sweep --config NAME --grid KEY=V1,V2 ...`, or
`-m` as Hydra users type it): the spec mapping it spells (`cli_spec`), which `spec.read_spec` reads
as it reads a file's, and its YAML twin (`spec_yaml`), which `--print-spec` prints and the sweep
dir keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cifar_dist import schema
from cifar_dist.errors import ConfigError, UserError


def cli_spec(configs: list[str], grid_items: list[str], pairs: list[str], multirun: bool, cluster: str | None,
             name: str | None) -> dict[str, Any]:
    """The spec mapping a command-line sweep spells: what `read_spec` reads and `--print-spec` prints.
    Config values are converted to their fields' types here, as a YAML file holds them typed."""
    if len(configs) > 1:
        raise UserError(f"--config: a sweep has one base config, got {len(configs)} ({', '.join(configs)}); a config "
                        "file composes with its own base:")
    grid: dict[str, list[Any]] = {}
    overrides: dict[str, Any] = {}
    resources: dict[str, Any] = {}
    items = [(item, True) for item in grid_items] + [(item, False) for item in pairs]
    for item, swept in items:
        key, _, raw = item.partition("=")
        if not key:
            raise UserError(f"{item!r}: expected KEY=VALUE")
        if key.startswith("resources."):
            *path, last = key.removeprefix("resources.").split(".")
            section = resources
            for part in path:
                section = section.setdefault(part, {})
            section[last] = schema.load_yaml(raw) if raw else raw
            continue
        if key in grid or key in overrides:
            raise UserError(f"{key}: given twice on the command line")
        if swept or (multirun and "," in raw and not raw.startswith("[")):
            grid[key] = [config_value(key, v) for v in raw.split(",")]
            continue
        try:
            overrides[key] = config_value(key, raw)
        except ConfigError as e:
            if "," not in raw or "unknown key" in str(e):
                raise
            raise ConfigError(f"{e}; to sweep over these values: --grid {item}, or -m") from None
    data = {"name": name or Path(configs[0]).stem, "cluster": cluster or "local", "base": configs[0],
            "overrides": overrides, "sweep": {"grid": grid} if grid else None, "resources": resources}
    return {k: v for k, v in data.items() if v}


def config_value(key: str, text: str) -> Any:
    """`text` as the value of config key `key`, typed as a YAML file would hold it."""
    from cifar_dist.config import Config

    cfg = Config()
    schema.set_key(cfg, key, text, from_text=True)
    return schema.lookup(cfg, key)[2]


def spec_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

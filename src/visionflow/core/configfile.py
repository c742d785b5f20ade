"""Reading `params.yaml` into a validated `Params`: YAML, command-line overrides
(`-s key=value`), and one-line errors naming the file, key and value before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from visionflow.core import presets
from visionflow.core.config import Params, source_scheme
from visionflow.core.errors import ConfigError
from visionflow.core.files import load_yaml


def _format_error(err: ValidationError, source: str, raw: dict[str, Any]) -> str:
    e = err.errors()[0]
    if not e["loc"]:  # a check across sections: its message names the key and value
        return f"{source}: {e['msg'].removeprefix('Value error, ')}"
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    value: Any = raw
    for part in e["loc"]:
        value = value.get(part) if isinstance(value, dict) else None
    msg = e["msg"].removeprefix("Value error, ")
    return f"{source}: {key}={value!r}: {msg}"


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, raw)) from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply `a.b=value` (list, YAML-parsed values) or {"a.b": value} overrides."""
    items = (
        [(k, v) for k, v in overrides.items()]
        if isinstance(overrides, dict)
        else [_split_override(o) for o in overrides]
    )
    out = _deep_copy(raw)
    for key, value in items:
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override: '{key}' is not a nested key")
        node[parts[-1]] = load_yaml(value) if isinstance(value, str) else value
    return out


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override: expected KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_params(
    path: str | Path = "params.yaml",
    overrides: dict[str, Any] | list[str] | None = None,
    root: Path | None = None,
) -> Params:
    """Load, merge the preset, override, validate. The preset is the `preset:` key after the
    overrides (so `-s preset=NAME` selects one); the overrides apply on top of it. Also
    checks the data source exists (relative to root), or is tracked by DVC (`<source>.dvc`:
    a fresh clone before `dvc pull`, which a scheduled run does first)."""
    raw = read_params_file(path)
    name = apply_overrides(raw, overrides).get("preset") if overrides else raw.get("preset")
    raw = presets.apply_preset(raw, path, name)
    if overrides:
        raw = apply_overrides(raw, overrides)
    params = parse_params(raw, str(path))
    root = root or Path(path).resolve().parent
    src = Path(params.data.source)
    src = src if src.is_absolute() else root / src
    tracked = src.with_name(src.name + ".dvc").is_file()
    if not src.exists() and not tracked and source_scheme(params.data.source) is None:
        raise ConfigError(f"{path}: data.source={params.data.source!r}: path does not exist")
    return params

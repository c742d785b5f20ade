"""Presets: small params files (`presets/<name>.yaml`, next to params.yaml) deep-merged over
params.yaml when its top-level `preset:` key names one.

Order: params.yaml, then the preset, then command-line overrides (`-s key=value`); a
`-s preset=NAME` override selects the preset. Plain PyYAML and dicts (no pydantic), so the
benchmarks on the GPU machine read the same files the pipeline does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from visionflow.core.errors import ConfigError
from visionflow.core.files import load_yaml

PRESETS_DIR = "presets"


def presets_dir(params_path: str | Path) -> Path:
    return Path(params_path).resolve().parent / PRESETS_DIR


def available(params_path: str | Path) -> list[str]:
    folder = presets_dir(params_path)
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: nested mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(
            out.get(k), dict) else v
    return out


def read_preset(params_path: str | Path, name: str) -> dict[str, Any]:
    """The preset file's mapping; a one-line ConfigError naming the key and the choices."""
    choices = available(params_path)
    if not isinstance(name, str) or name not in choices:
        raise ConfigError(f"{Path(params_path).name}: preset={name!r}: unknown preset, choose "
                          f"one of {', '.join(choices) or '(none: no presets/ folder)'}")
    path = presets_dir(params_path) / f"{name}.yaml"
    try:
        raw = load_yaml(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{path}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    if "preset" in raw:
        raise ConfigError(f"{path}: a preset cannot name another preset")
    return raw


def apply_preset(raw: dict[str, Any], params_path: str | Path,
                 name: str | None) -> dict[str, Any]:
    """params.yaml's mapping with the preset `name` merged in (None: unchanged)."""
    if name is None:
        return raw
    return deep_merge(raw, read_preset(params_path, name)) | {"preset": name}


def load_raw(params_path: str | Path, preset: str | None = None) -> dict[str, Any]:
    """params.yaml (+ preset) as a plain dict, for the torch-only benchmark scripts."""
    raw = load_yaml(Path(params_path).read_text()) or {}
    return apply_preset(raw, params_path, raw.get("preset") if preset is None else preset)

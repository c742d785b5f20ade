"""The search space: Optuna suggestions for the `tune.space` keys, a trial's `Params`, and the
study's fingerprint (what a score depends on besides the tuned keys)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna

from visionflow.core.config import AugmentConfig, Params, TrainConfig
from visionflow.core.configfile import apply_overrides, parse_params
from visionflow.core.tuneconfig import Dimension, value_kind

SECTIONS = {"train": TrainConfig, "augment": AugmentConfig}
# keys that change how fast a trial runs or what it prints, never its score
NEUTRAL = {"train": {"progress", "threads", "calibrate", "device", "compile"},
           "data": {"source", "max_archive_bytes", "max_archive_members"}}


def kind(key: str) -> type | None:
    section, name = key.split(".", 1)
    return value_kind(SECTIONS[section], name)


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict[str, Any]:
    """Sample every dimension of `space` for `trial` (its params in the study's storage)."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.choices is not None:
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif kind(key) is int:
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high),
                                            step=int(dim.step or 1), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def trial_params(base: Params, values: dict[str, Any]) -> Params:
    """`base` with the trial's values (validated like params.yaml)."""
    return parse_params(apply_overrides(base.dump(), values), "trial")


def fixed_settings(base: Params, data_hash: str) -> dict[str, Any]:
    """Everything a trial's score depends on except the tuned keys: the seed, the data (by
    content), the untuned train/augment keys and the space itself."""
    dump = base.dump()
    tuned = set(base.tune.space)
    out: dict[str, Any] = {"seed": dump["seed"], "data_hash": data_hash}
    for section in ("data", "augment", "train"):
        for name, value in dump[section].items():
            key = f"{section}.{name}"
            if key not in tuned and name not in NEUTRAL.get(section, ()):
                out[key] = value
    out["tune.space"] = {k: v.model_dump(exclude_defaults=True) for k, v in
                         base.tune.space.items()}
    return out


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def baseline(params: Params) -> dict[str, Any]:
    """params.yaml's own values of the tuned keys that lie in the space (trial 0 of a new
    study, so that it shows what tuning gains over them)."""
    dump = params.dump()
    out: dict[str, Any] = {}
    for key, dim in params.tune.space.items():
        section, name = key.split(".", 1)
        value = dump[section][name]
        if dim.choices is not None:
            inside = value in dim.choices
        else:
            inside = isinstance(value, int | float) and dim.low <= value <= dim.high
        if inside:
            out[key] = value
    return out

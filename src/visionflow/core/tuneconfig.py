"""The `tune:` section of params.yaml: what `vflow tune` searches and how (pydantic only).

A search dimension names an existing key of `train:` or `augment:` and either a range
(`low`, `high`, optional `log` or `step`; int or float after the key's own type) or a list
of `choices`. `check_space` holds each dimension against the key it tunes (the key exists,
its bounds and choices are values the key accepts) before any work starts.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TUNABLE_SECTIONS = ("train", "augment")  # a trial retrains on the augment cache: no data keys
Scalar = bool | int | float | str | None


class Dimension(BaseModel):
    """One search dimension: a range (`low`..`high`) or `choices`."""

    model_config = ConfigDict(extra="forbid")

    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample on a log scale (low > 0)")
    step: float | None = Field(None, gt=0, description="grid step of the range")
    choices: list[Scalar] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range_or_choices(self) -> Dimension:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either choices or low/high, not both")
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"choices {self.choices} repeat a value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs both low and high (or give choices)")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (low {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


class TuneConfig(BaseModel):
    """`vflow tune` (tune): an Optuna study over `space`, trials as Prefect tasks."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    study: str = Field("visionflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                       description="study name: a rerun continues the study of this name")
    trials: int = Field(20, ge=1, description="finished trials (complete + pruned) to reach")
    parallel: int = Field(2, ge=1, description="trials at a time in one `vflow tune`")
    timeout_s: float | None = Field(None, gt=0, description="no trial starts after this")
    sampler: Literal["tpe", "random"] = "tpe"
    startup_trials: int = Field(5, ge=0, description="random trials before TPE models; "
                                "finished trials before the pruner prunes")
    pruner: Literal["median", "hyperband", "none"] = "median"
    min_epochs: int = Field(1, ge=1, description="epochs a trial runs before it can be pruned")
    baseline: bool = Field(True, description="trial 0 of a new study: params.yaml's own "
                           "values of the tuned keys")
    storage: str | None = Field(None, description="SQLAlchemy URL; null = the project's "
                                "sqlite (VFLOW_TUNE_STORAGE overrides)")
    space: dict[str, Dimension] = Field(default_factory=lambda: {
        "train.lr": Dimension(low=0.05, high=2.0, log=True),
        "train.weight_decay": Dimension(low=1e-5, high=2e-3, log=True),
        "train.label_smoothing": Dimension(low=0.0, high=0.3),
        "augment.cutout": Dimension(low=0, high=8),
    })


def _field_kind(annotation: Any) -> type | None:
    """int or float for a numeric field (`int | None` too), None for anything else."""
    types = get_args(annotation) if get_origin(annotation) is not None else (annotation,)
    numeric = [t for t in types if t in (int, float)]
    return numeric[0] if len(numeric) == 1 and bool not in types else None


def value_kind(section: type[BaseModel], name: str) -> type | None:
    return _field_kind(section.model_fields[name].annotation)


def check_space(space: dict[str, Dimension], sections: dict[str, type[BaseModel]]) -> None:
    """Each dimension against the key it tunes: a ValueError naming `tune.space.<key>` and the
    offending value (one line) when the key is unknown or a bound or choice does not fit."""
    for key, dim in space.items():
        where = f"tune.space.{key}"
        section_name, _, name = key.partition(".")
        if section_name not in TUNABLE_SECTIONS or not name:
            raise ValueError(f"{where}: only train.* and augment.* keys can be tuned (a trial "
                             "retrains on the augment cache)")
        section = sections[section_name]
        if name not in section.model_fields:
            raise ValueError(f"{where}: unknown key '{key}'")
        kind = value_kind(section, name)
        if dim.choices is None:
            if kind is None:
                raise ValueError(f"{where}: '{key}' is not numeric: give choices, not a range")
            for attr in ("low", "high", "step"):
                value = getattr(dim, attr)
                if kind is int and value is not None and value != int(value):
                    raise ValueError(f"{where}.{attr}={value:g}: '{key}' is an integer")
        probes = dim.choices if dim.choices is not None else [dim.low, dim.high]
        attrs = ["choices"] * len(probes) if dim.choices is not None else ["low", "high"]
        for attr, value in zip(attrs, probes, strict=True):
            if kind is int and value is not None and not isinstance(value, bool):
                value = int(value) if float(value) == int(value) else value
            try:
                section.model_validate({name: value})
            except ValidationError as err:
                msg = err.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"{where}.{attr}={value!r}: {msg}") from None

"""Typed configuration: `params.yaml` is the single source, loaded into `Params`.

Every error is reported as one line naming the key and the offending value,
before any work starts (see `load_params`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from visionflow.errors import ConfigError

MODEL_NAMES = (
    "alexnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "densenet_bc",
    "fast",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field("data", description="ImageFolder dir or .tar/.tar.gz/.zip archive")
    image_size: int = Field(32, gt=0, le=1024)
    channels: Literal[1, 3] = 3
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1, description="used only when no test/ split")
    limit_per_class: int | None = Field(None, gt=0, description="stratified subset per split")
    split_seed: int = 0


class ValidateConfig(_Section):
    labels: list[str] | None = None
    min_images_per_class: int = Field(5, ge=1)
    max_imbalance_ratio: float = Field(20.0, ge=1)
    min_width: int = Field(8, ge=1)
    min_height: int = Field(8, ge=1)
    max_width: int = Field(8192, ge=1)
    max_height: int = Field(8192, ge=1)
    allowed_modes: list[str] = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16"]
    max_bytes: int = Field(50_000_000, gt=0)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_quarantine_fraction: float = Field(0.01, ge=0, le=1)
    workers: int = Field(0, ge=0, description="0 = all cores")


class AugmentConfig(_Section):
    """Batch augmentation policy applied on the training device."""

    hflip: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    translate: int = Field(4, ge=0, description="max shift in pixels (pad + random crop)")
    cutout: int = Field(0, ge=0, description="square cutout side in pixels, 0 = off")
    cutout_p: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    saturation: float = Field(0.0, ge=0, le=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_p: float = Field(0.0, ge=0, le=1, description="probability a batch is mixed")


class TrainConfig(_Section):
    model: str = "resnet18"
    epochs: int = Field(5, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    schedule: Literal["cosine", "onecycle", "linear", "constant"] = "cosine"
    grad_clip: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    threads: int = Field(0, ge=0, description="CPU threads, 0 = torch default")
    pretrained: str | None = None
    freeze_epochs: int = Field(0, ge=0)
    time_budget_s: float | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model, choose one of {', '.join(MODEL_NAMES)}")
        return v


class EvaluateConfig(_Section):
    topk: list[int] = [1, 3, 5]
    batch_size: int = Field(512, gt=0)

    @field_validator("topk")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("must be a non-empty list of integers >= 1")
        return sorted(set(v))


class CompressConfig(_Section):
    methods: list[Literal["int8", "prune"]] = ["int8", "prune"]
    prune_amount: float = Field(0.5, gt=0, lt=1)
    calibration_images: int = Field(256, gt=0)


class RegisterConfig(_Section):
    model_name: str = Field("visionflow-classifier", min_length=1)
    min_delta: float = Field(0.0, ge=0, description="top-1 gain needed over the champion")
    alias: str = "champion"


class Params(_Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compress: CompressConfig = CompressConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def validate_cfg(self) -> ValidateConfig:
        return self.validate_

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _format_error(err: ValidationError, source: str, raw: dict[str, Any]) -> str:
    e = err.errors()[0]
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
    import yaml

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
        node[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
    return out


def _split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override: expected KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_params_file(path: str | Path = "params.yaml") -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
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
    """Load, override, validate. Also checks the data source exists (relative to root)."""
    raw = read_params_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    params = parse_params(raw, str(path))
    root = root or Path(path).resolve().parent
    src = Path(params.data.source)
    src = src if src.is_absolute() else root / src
    if not src.exists():
        raise ConfigError(f"{path}: data.source={params.data.source!r}: path does not exist")
    return params

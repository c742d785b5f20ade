"""The `data:` section of params.yaml (split from `config` to keep both short): the source,
image size and splits, and since issue #18 how the pack stage stores the set (`storage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST")


def is_torchvision_source(source: str | Path) -> bool:
    return str(source).startswith(TORCHVISION_PREFIX)


def unknown_torchvision_dataset(source: str) -> str | None:
    """Why `torchvision:<NAME>` names no dataset read here (None when it does, or when the
    source is not a torchvision one)."""
    if not is_torchvision_source(source):
        return None
    name = source[len(TORCHVISION_PREFIX):]
    return None if name in TORCHVISION_DATASETS else (
        f"unknown torchvision dataset {name!r} (choose from {', '.join(TORCHVISION_DATASETS)})")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = Field("data", description="ImageFolder dir, .tar/.tar.gz/.zip archive, "
                        "or torchvision:CIFAR10 (downloaded once, online)")
    image_size: int = Field(16, gt=0, le=1024)
    channels: Literal[1, 3] = 3
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1, description="used only when no test/ split")
    limit_per_class: int | None = Field(None, gt=0, description="stratified subset per split")
    split_seed: int = 0
    max_archive_bytes: int = Field(100 * 2**30, gt=0, description="what an archive source "
                                   "may extract to in total (bytes actually written)")
    max_archive_members: int = Field(5_000_000, gt=0, description="members an archive may "
                                     "hold")
    # issue #18: how the pack stage stores the decoded set
    storage: Literal["auto", "tensor", "shards"] = Field(
        "auto", description="tensor: one uint8 N×C×S×S cache; shards: encoded images streamed "
        "(LitData); auto: tensor while it fits storage_budget_bytes")
    storage_budget_bytes: int = Field(2 * 2**30, gt=0, description="auto: the largest decoded "
                                      "tensor cache (N×C×S×S bytes) kept as a tensor")
    max_side: int = Field(1024, ge=16, le=16384, description="shards: JPEG bytes kept as they "
                          "are up to this longer side, larger images re-encoded to it")
    resize_size: int | None = Field(None, gt=0, description="shards, evaluation: shorter side "
                                    "resized to this, then centre-cropped to image_size "
                                    "(null = image_size / 0.875, torchvision's 256 -> 224)")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="shards, training: "
                                            "RandomResizedCrop area fraction range")
    crop_ratio: tuple[float, float] = Field((0.75, 4 / 3), description="shards, training: "
                                            "RandomResizedCrop aspect-ratio range")
    shard_bytes: int = Field(64 * 2**20, ge=2**16, description="shards: bytes per shard file")
    workers: int = Field(2, ge=0, description="shards: DataLoader workers decoding (0 = in "
                         "the training process); not part of the run's identity")

    @field_validator("source")
    @classmethod
    def _known_torchvision_dataset(cls, v: str) -> str:
        if why := unknown_torchvision_dataset(v):
            raise ValueError(why)
        return v

    @field_validator("max_side", "resize_size")
    @classmethod
    def _not_below_crop(cls, v: int | None, info: ValidationInfo) -> int | None:
        size = info.data.get("image_size")
        if v is not None and size is not None and v < size:
            raise ValueError(f"must be >= data.image_size ({size}): the crop is taken from it")
        return v

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        low, high = v
        top = 1.0 if info.field_name == "crop_scale" else 100.0
        if not 0 < low <= high <= top:
            raise ValueError(f"expected [low, high] with 0 < low <= high <= {top:g}")
        return v

    @property
    def eval_resize(self) -> int:
        """The shorter side evaluation resizes to before its centre crop."""
        return self.resize_size or round(self.image_size / 0.875)

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_train(cls, v: float, info: ValidationInfo) -> float:
        val = info.data.get("val_fraction")
        if val is not None and val + v >= 1:
            raise ValueError(f"data.val_fraction + data.test_fraction must be < 1 (val {val})")
        return v

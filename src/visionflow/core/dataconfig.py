"""The `data:` section of params.yaml (split from `config` to keep both short): the source,
image size and splits, and since issue #18 how the pack stage stores the set (`storage`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# `data.source: <scheme>:<name>` sources (`data/schemes.py` reads them): scheme -> the names
# it serves. A folder or archive path has no scheme (a drive letter or `x://` is not one).
SOURCE_SCHEMES: dict[str, tuple[str, ...]] = {
    "torchvision": ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST", "KMNIST"),
}
_SCHEME = re.compile(r"([A-Za-z][\w+.-]+):(?![/\\])(.*)")
_URL = re.compile(r"[A-Za-z][\w+.-]*://\S+")


def is_url(source: str | Path) -> bool:
    """An object-store or web URL (`s3://bucket/prefix`): `vflow data add` imports it."""
    return _URL.fullmatch(str(source)) is not None


def source_scheme(source: str | Path) -> tuple[str, str] | None:
    """(scheme, name) of a `<scheme>:<name>` source, None for a path."""
    m = _SCHEME.fullmatch(str(source))
    return (m[1], m[2]) if m else None


def unknown_source(source: str) -> str | None:
    """Why a `<scheme>:<name>` source names nothing known (None when it does, or for a
    path)."""
    if is_url(source):
        return (f"a URL is imported as a DVC data version: `vflow data add {source}` "
                "(a scheduled retrain then syncs what changed there), and keep source: data")
    parsed = source_scheme(source)
    if parsed is None:
        return None
    scheme, name = parsed
    if scheme not in SOURCE_SCHEMES:
        return (f"unknown source scheme {scheme!r} (choose from {', '.join(SOURCE_SCHEMES)}, "
                "or give a folder or archive path)")
    names = SOURCE_SCHEMES[scheme]
    return None if name in names else (
        f"unknown {scheme} dataset {name!r} (choose from {', '.join(names)})")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# LitData's eviction lets a cache folder overshoot its budget by about 5% (a download in flight
# while a read shard is deleted): it is given this fraction of `data.shard_cache_bytes`
CACHE_HEADROOM = 0.85


def shard_cache_floor(shard_bytes: int, workers: int, procs: int) -> int:
    """The least `data.shard_cache_bytes` that bounds a host's S3 cache: each of `procs`
    training processes has its own folder and share, and LitData keeps two shards per
    loader worker (in-process: one reader) in it whatever the budget (BENCHMARKS, "S3
    streaming under DDP")."""
    return math.ceil(2 * max(workers, 1) * shard_bytes * procs / CACHE_HEADROOM)


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
    shards_url: str | None = Field(None, description="shards: an s3://bucket/prefix the pack "
                                   "stage uploads each split to (<url>/<split>/); every stage "
                                   "then streams from it (endpoint and keys: AWS_* env)")
    shard_cache_bytes: int = Field(4 * 2**30, ge=16 * 2**20, description="shards_url: the most "
                                   "bytes one split's local shard cache holds (LitData evicts "
                                   "read shards); not part of the run's identity")

    @field_validator("source")
    @classmethod
    def _known_scheme_and_name(cls, v: str) -> str:
        if why := unknown_source(v):
            raise ValueError(why)
        return v

    @field_validator("shards_url")
    @classmethod
    def _s3_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("s3://") or len(v.rstrip("/")) <= len("s3://"):
            raise ValueError(f"expected s3://bucket[/prefix], got {v!r}")
        return v.rstrip("/")

    @field_validator("shard_cache_bytes")
    @classmethod
    def _holds_two_shards(cls, v: int, info: ValidationInfo) -> int:
        shard = info.data.get("shard_bytes")
        if shard is not None and v < 3 * shard:  # the one read, the next, headroom
            raise ValueError(f"must hold three shards: >= 3 × data.shard_bytes ({3 * shard})")
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

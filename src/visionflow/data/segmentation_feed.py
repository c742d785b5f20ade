"""The segmentation pairs a stage reads after `pack` (#19): ONE adapter, `segmentation_pairs`.

The compress stage (and anything else that scores a segmenter on a split) reads its data only
through `segmentation_pairs(params, layout, split)`: (C x H x W uint8 image, H x W int64
mask) tensors, one at a time, from the pack stage's `packed.pt` (train resized to
`segmentation.image_size`, val and test at each pair's own size; bounded by
`data.storage_budget_bytes`, see `tasks.segmentation.pack`).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from torch import Tensor

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data.packed import load_packed

SPLITS = ("train", "val", "test")


def _packed(layout: Layout) -> dict[str, Any]:
    if not layout.packed.is_file():
        raise DataError(f"{layout.packed}: no packed data: run validate and pack first")
    blob = load_packed(layout.packed)
    if blob.get("task") != "segmentation":
        raise DataError(f"{layout.packed}: packed for {blob.get('task', 'classification')}, "
                        f"not segmentation: run pack again")
    return blob


def segmentation_classes(params: Params, layout: Layout) -> list[str]:
    return list(_packed(layout)["classes"])


def segmentation_pairs(params: Params, layout: Layout, split: str,
                       limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(C x H x W uint8 image, H x W int64 mask) of `split`, in the packed order; at most
    `limit` pairs (None: all)."""
    if split not in SPLITS:
        raise DataError(f"segmentation split {split!r}: choose one of {', '.join(SPLITS)}")
    blob = _packed(layout)
    images, masks = blob[f"{split}_x"], blob[f"{split}_masks"]
    if len(images) == 0:
        raise DataError(f"{layout.packed}: no segmentation pairs in the {split} split")
    for image, mask in islice(zip(images, masks, strict=True), limit):
        yield image, mask.long()

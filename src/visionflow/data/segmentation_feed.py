"""The segmentation pairs a stage reads after `pack` (#19): ONE adapter, `segmentation_pairs`.

The compress stage (and anything else that scores a segmenter on a split) reads its data only
through `segmentation_pairs(params, layout, split)`: (C x H x W uint8 image, H x W int64
mask) tensors at each pair's own size, one at a time, so memory does not grow with the
split. Today it scans `data.source` with `scan_segmentation` (content-addressed splits,
seeded by `data.split_seed`, the same split validate assigns); when the pack stage writes
its segmentation cache, point these two functions at it and nothing else changes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from visionflow.config import Params
from visionflow.data.segmentation_layout import SegmentationScan, load_pair, scan_segmentation
from visionflow.data.source import resolve_source, source_path
from visionflow.errors import DataError
from visionflow.layout import Layout

SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=2)
def _scan(root: Path, val_fraction: float, test_fraction: float,
          seed: int) -> SegmentationScan:
    return scan_segmentation(root, val_fraction, test_fraction, seed)


def segmentation_scan(params: Params, layout: Layout) -> SegmentationScan:
    """The checked pairs of `data.source` with their splits (scanned once per process)."""
    d = params.data
    root = resolve_source(source_path(params, layout), layout.extract_cache)
    return _scan(root, d.val_fraction, d.test_fraction, d.split_seed)


def segmentation_classes(params: Params, layout: Layout) -> list[str]:
    return list(segmentation_scan(params, layout).classes)


def segmentation_pairs(params: Params, layout: Layout, split: str,
                       limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(C x H x W uint8 image, H x W int64 mask) of `split`, in a fixed order; at most
    `limit` pairs (None: all)."""
    if split not in SPLITS:
        raise DataError(f"segmentation split {split!r}: choose one of {', '.join(SPLITS)}")
    scan = segmentation_scan(params, layout)
    pairs = [p for p in scan.pairs if p.split == split]
    if not pairs:
        raise DataError(f"{scan.root}: no segmentation pairs in the {split} split")
    for pair in pairs[:limit]:
        image, mask = load_pair(scan.root, pair)
        yield torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask).long()

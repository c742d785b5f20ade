"""Segmentation pairs as LitData shards (`data.storage: shards` for `task: segmentation`).

One sample holds a pair: the image file's own bytes (a JPEG or PNG whose longer side is at
most `data.max_side` and that no EXIF orientation turns; any other image is decoded as served,
upright, scaled down to that side and re-encoded) and its class-index mask as a PNG (scaled
down with the image, nearest), with the pair's sha256 and paths.
`outputs/pack/shards/<split>/` holds LitData's index and chunks and
`contents.json` (the pairs in shard order), as for classification: packing is incremental
(`data.shards.pack_rows`, the same code as photos: new pairs go into new shard files) and
runs in a process pool.

`data.segmentation_feed.PairShards` reads them back.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from visionflow.data.images import load_image, turned_by_exif
from visionflow.data.shards import KEPT_FORMATS, REENCODE_QUALITY, SampleCodec

FORMAT = 2  # bump when the sample layout changes (2: EXIF-turned images stored upright)
BYTES_PER_PIXEL = 4  # decoded: 3 image channels + 1 mask


def decoded_pair_bytes(root: Path, pairs: list[tuple[str, str]], train_size: int) -> int:
    """Bytes the tensor path would hold for (image path, split) pairs: train at
    `train_size`, the others at their own size (read from the image headers, nothing
    decoded)."""
    total = 0
    for image, split in pairs:
        if split == "train":
            total += BYTES_PER_PIXEL * train_size * train_size
        else:
            with Image.open(root / image) as img:
                total += BYTES_PER_PIXEL * img.width * img.height
    return total


def resize_train_pair(image: torch.Tensor, mask: torch.Tensor,
                      size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C x H x W uint8 image (bilinear, antialiased) and H x W uint8 mask (nearest) at S x S."""
    x = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    y = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest-exact")
    return x[0].round().clamp(0, 255).to(torch.uint8), y[0, 0].to(torch.uint8)


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_pair(path: Path, mask: np.ndarray, max_side: int) -> tuple[bytes, bytes, bool]:
    """(image bytes, mask PNG bytes, re-encoded) for a checked pair: the image file and its
    H x W uint8 class indices."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        if img.format in KEPT_FORMATS and img.mode in ("RGB", "L") \
                and max(img.size) <= max_side and not turned_by_exif(data):
            return data, _png(mask), False
    rgb = load_image(data, 3)  # upright, as validate measured it and serving decodes it
    scale = min(1.0, max_side / max(rgb.size))
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    shrink = size != rgb.size
    if shrink:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        mask = np.asarray(Image.fromarray(mask, "L").resize(size, Image.Resampling.NEAREST))
    buf = io.BytesIO()  # scaled down: a JPEG; only converted (a palette, CMYK...): lossless
    if shrink:
        rgb.save(buf, format="JPEG", quality=REENCODE_QUALITY)
    else:
        rgb.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), _png(mask), True


def _pair_key(r: dict[str, Any]) -> tuple[str, ...]:
    return (r["sha256"], r["path"], r["mask"])


def _pair_row(r: dict[str, Any]) -> dict[str, str]:
    return {"sha256": r["sha256"], "path": r["path"], "mask": r["mask"]}


def _pair_sample(row: dict[str, Any], *, root: str, max_side: int,
                 read_mask: Callable[[Path], np.ndarray]) -> tuple[dict[str, Any], bool]:
    image, mask, again = encode_pair(Path(root) / row["path"],
                                     read_mask(Path(root) / row["mask"]).astype(np.uint8),
                                     max_side)
    return {"sha256": row["sha256"], "path": row["path"], "mask_path": row["mask"],
            "image": image, "mask": mask}, again


def pair_codec(root: Path, classes: list[str], read_mask: Callable[[Path], np.ndarray], *,
               max_side: int) -> SampleCodec:
    """Rows {"path": image, "mask": mask, "sha256": the pair's} as pair samples;
    `read_mask` (a module-level function: it runs in packing workers) gives a mask file's
    class indices."""
    return SampleCodec(
        {"format": FORMAT, "task": "segmentation", "max_side": max_side, "classes": classes},
        _pair_key, _pair_row,
        partial(_pair_sample, root=str(root), max_side=max_side, read_mask=read_mask))

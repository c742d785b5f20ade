"""Segmentation masks on disk: the VOC palette, index PNGs and the class list file.

A mask holds one class index per pixel: 0 is the background, 255 marks pixels to ignore
(object borders in Pascal VOC, padding). It is stored as a palette PNG (mode "P"): the
pixel values are the indices, the palette only colours them for people.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.core.errors import DataError

IGNORE_INDEX = 255  # the same value as model.segmentation.IGNORE_INDEX (a test checks)
CLASSES_FILE = "classes.txt"
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def voc_colour(index: int) -> tuple[int, int, int]:
    """Pascal VOC's colour for a class index (its bit-interleaved colour map)."""
    r = g = b = 0
    c = index
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def voc_palette() -> list[int]:
    """The 256-entry VOC palette, flat [r0, g0, b0, r1, ...] as PIL's `putpalette` wants
    (index 255, the ignore index, is VOC's cream border colour (224, 224, 192))."""
    return [v for i in range(256) for v in voc_colour(i)]


def index_png_bytes(mask: np.ndarray) -> bytes:
    """An H x W uint8 index mask as a deterministic palette PNG (mode "P", VOC palette)."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be H x W uint8, got {mask.shape} {mask.dtype}")
    img = Image.fromarray(mask, mode="P")
    img.putpalette(voc_palette())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def write_classes(path: Path, classes: Sequence[str]) -> None:
    path.write_text("".join(f"{name}\n" for name in classes))


def read_classes(path: Path) -> list[str]:
    """`classes.txt`: one class name per line, line i = index i (0 = background); blank
    lines and `#` comments skipped. Names must be unique and at most 255 (255 = ignore)."""
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise DataError(f"{path}: no class names")
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{path}: {len(names)} classes, at most {IGNORE_INDEX} "
                        f"(index {IGNORE_INDEX} is the ignore index)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate class names {', '.join(dupes)}")
    return names

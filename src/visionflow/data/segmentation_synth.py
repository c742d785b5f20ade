"""Offline segmentation demo data: coloured shapes on textured, noisy backgrounds.

`materialize_shapes(target)` writes `images/<name>.png`, `masks/<name>.png` (index PNGs, VOC
palette, 0 = background) and `classes.txt`. Every image has its own size (sides drawn from
`min_side..max_side`), one to four shapes that may overlap (the one drawn last is on top),
and a background of smooth colour blotches, stripes and pixel noise. Each class has a shape
and a hue band (neighbouring bands overlap), so a model needs both to tell them apart. Image
`i` depends only on (`seed`, `i`): the same seed writes the same bytes.
"""

from __future__ import annotations

import colorsys
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from visionflow.core.errors import DataError
from visionflow.core.files import atomic_dir
from visionflow.data.segmentation_masks import CLASSES_FILE, index_png_bytes, write_classes

SHAPE_CLASSES = ("background", "circle", "rectangle", "triangle", "ellipse")
_HUES = {1: 0.0, 2: 0.3, 3: 0.6, 4: 0.8}  # centre hue per class (0..1)
_HUE_JITTER = 0.09  # +- around the centre: 0.6 and 0.8 bands overlap
N_SHAPES_DEFAULT = 600


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth low-saturation blotches + stripes + noise, float32 H x W x 3 in 0..255."""
    grid = rng.uniform(60, 200, size=(4, 4, 3)).astype(np.float32)
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + 0.35 * (grid - grey)  # mostly grey: objects carry the colour
    blot = Image.fromarray(grid.astype(np.uint8), "RGB").resize((w, h), Image.BICUBIC)
    out = np.asarray(blot, dtype=np.float32).copy()
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(5, 16)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    out += rng.uniform(5, 25) * stripes[..., None]
    return out


def _polygon(kind: int, rng: np.random.Generator, cx: float, cy: float, r: float
             ) -> list[tuple[float, float]] | None:
    """Vertices of a rotated rectangle, triangle or ellipse; None for a circle."""
    rot = rng.uniform(0, 2 * math.pi)
    if kind == 1:
        return None
    if kind == 2:  # rectangle, aspect 0.5..1
        a, b = r, r * rng.uniform(0.5, 1.0)
        corners = [(a, b), (-a, b), (-a, -b), (a, -b)]
    elif kind == 3:  # triangle: three jittered vertices on the circle
        corners = [(r * math.cos(t), r * math.sin(t))
                   for t in (2 * math.pi * k / 3 + rng.uniform(-0.3, 0.3) for k in range(3))]
    else:  # ellipse, axis ratio 0.4..0.65
        b = r * rng.uniform(0.4, 0.65)
        corners = [(r * math.cos(t), b * math.sin(t))
                   for t in np.linspace(0, 2 * math.pi, 40, endpoint=False)]
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _colour(kind: int, rng: np.random.Generator) -> tuple[int, int, int]:
    hue = (_HUES[kind] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return tuple(int(round(255 * v)) for v in rgb)  # type: ignore[return-value]


def render_shapes(seed: int, index: int, min_side: int = 48, max_side: int = 96
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of the set: (H x W x 3 uint8 image, H x W uint8 mask)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, index])
    h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    mask = Image.new("L", (w, h), 0)
    paint = Image.new("RGB", (w, h), 0)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(1, len(SHAPE_CLASSES)))
        r = rng.uniform(0.12, 0.3) * min(h, w)
        cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
        poly = _polygon(kind, rng, cx, cy, r)
        colour = _colour(kind, rng)
        for img, fill in ((mask, kind), (paint, colour)):
            draw = ImageDraw.Draw(img)
            if poly is None:
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon(poly, fill=fill)
    labels = np.asarray(mask, dtype=np.uint8)
    image = _background(rng, h, w)
    obj = labels > 0
    shade = rng.uniform(0.85, 1.15, size=(h, w, 1)).astype(np.float32)  # object texture
    image[obj] = (np.asarray(paint, dtype=np.float32) * shade)[obj]
    image += rng.normal(0, 10, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels.copy()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def materialize_shapes(target: Path, n_images: int = N_SHAPES_DEFAULT, seed: int = 0,
                       min_side: int = 48, max_side: int = 96) -> Path:
    """Write the shapes set to `target` (images/, masks/, classes.txt), atomically.

    An existing non-empty `target` is left untouched and returned (as for the digits)."""
    target = Path(target)
    if not 8 <= min_side <= max_side:
        raise DataError(f"shapes: need 8 <= min_side <= max_side, got {min_side}, {max_side}")
    if n_images < 1:
        raise DataError(f"shapes: n_images must be >= 1, got {n_images}")
    if target.exists():
        if not target.is_dir():
            raise DataError(f"shapes target exists and is not a directory: {target}")
        if any(target.iterdir()):
            return target
    with atomic_dir(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in range(n_images):
            image, mask = render_shapes(seed, i, min_side, max_side)
            (tmp / "images" / f"shape_{i:04d}.png").write_bytes(_png(image))
            (tmp / "masks" / f"shape_{i:04d}.png").write_bytes(index_png_bytes(mask))
        write_classes(tmp / CLASSES_FILE, SHAPE_CLASSES)
    return target

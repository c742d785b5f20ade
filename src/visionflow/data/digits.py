"""Offline demo data: scikit-learn's bundled 8x8 digits as a PNG ImageFolder."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np

from visionflow.core.errors import DataError
from visionflow.core.files import atomic_dir

N_DIGITS = 1797


def _png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG: fixed compression, no metadata chunks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def _frozen_split(labels: list[str], seed: int, val_fraction: float,
                  test_fraction: float) -> list[str]:
    """The split the digits folder has always been written with (so `data.dvc` keeps its
    md5): per class, a seeded permutation of the indices, val then test carved from it."""
    out = ["train"] * len(labels)
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        n = len(idx)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(label.encode())])
        order = rng.permutation(n)
        takes = [(name, max(int(round(n * f)), 1 if f > 0 and n >= 3 else 0))
                 for name, f in (("val", val_fraction), ("test", test_fraction))]
        pos = 0
        for name, k in takes:
            for j in order[pos:pos + k]:
                out[idx[j]] = name
            pos += k
    return out


def materialize_digits(
    target: Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Path:
    """Write `target/{train,val,test}/<digit>/<index:04d>.png` (grayscale 'L').

    Pixel values 0..16 are scaled to 0..255. The split is stratified and fixed by
    `seed`. An existing non-empty `target` is left untouched and returned.
    """
    from sklearn.datasets import load_digits

    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise DataError(f"digits target exists and is not a directory: {target}")
        if any(target.iterdir()):
            return target
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = [str(int(t)) for t in digits.target]
    split = _frozen_split(labels, seed, val_fraction, test_fraction)
    with atomic_dir(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private
        for i, lab in enumerate(labels):
            folder = tmp / split[i] / lab
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(_png_bytes(images[i]))
    return target

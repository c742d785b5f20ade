"""Offline demo data: scikit-learn's bundled 8x8 digits as a PNG ImageFolder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from visionflow.data.scan import FileEntry
from visionflow.data.splits import assign_splits
from visionflow.errors import DataError
from visionflow.files import atomic_dir

N_DIGITS = 1797


def _png_bytes(pixels: np.ndarray) -> bytes:
    """Deterministic PNG: fixed compression, no metadata chunks."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


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
    entries = [
        FileEntry(target / lab / f"{i:04d}.png", f"{lab}/{i:04d}.png", None, lab)
        for i, lab in enumerate(labels)
    ]
    split = {e.relpath: e.split for e in assign_splits(entries, val_fraction, test_fraction, seed)}
    with atomic_dir(target) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private
        for i, lab in enumerate(labels):
            folder = tmp / str(split[f"{lab}/{i:04d}.png"]) / lab
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(_png_bytes(images[i]))
    return target

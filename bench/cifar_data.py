"""CIFAR-10 as uint8 tensors from the project's JPEG archive, decoded once.

The archive (`train/<class>/NNNN.jpg`, `test/<class>/NNNN.jpg`) is read member by member in
memory: nothing is extracted to disk, so no member path or link can escape. Only regular
files of the form `<split>/<class>/<name>.jpg|png` are decoded (in a process pool); anything
else is skipped. Needs torch, numpy and Pillow only (the GPU machine has them).
"""

from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "test")
MAX_MEMBER_BYTES = 1 << 20  # a 32x32 JPEG is ~1 KB: refuse anything absurd


def _decode(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
    for i, b in enumerate(blobs):
        with Image.open(io.BytesIO(b)) as im:
            im = im.convert("RGB")
            if im.size != (32, 32):
                im = im.resize((32, 32), Image.BILINEAR)
            out[i] = np.asarray(im)
    return out


def read_members(archive: Path) -> dict[str, list[tuple[str, bytes]]]:
    """{split: [(class, bytes)]} sorted by path, for regular image files only."""
    found: dict[str, list[tuple[str, str, bytes]]] = {s: [] for s in SPLITS}
    with tarfile.open(archive, "r:*") as tar:
        for m in tar:
            parts = m.name.split("/")
            if (not m.isreg() or len(parts) != 3 or parts[0] not in SPLITS
                    or not parts[2].lower().endswith((".jpg", ".jpeg", ".png"))
                    or m.size > MAX_MEMBER_BYTES or ".." in parts):
                continue
            f = tar.extractfile(m)
            if f is not None:
                found[parts[0]].append((m.name, parts[1], f.read()))
    return {s: [(c, b) for _, c, b in sorted(rows)] for s, rows in found.items()}


def load_cifar(archive: str | Path, workers: int = 0, limit: int | None = None
               ) -> dict[str, object]:
    """{'classes', 'train_x', 'train_y', 'test_x', 'test_y'}: uint8 N×3×32×32, int64 labels.
    `limit`: at most that many images per split (evenly strided), for dry runs."""
    members = read_members(Path(archive))
    classes = sorted({c for c, _ in members["train"]})
    index = {c: i for i, c in enumerate(classes)}
    workers = workers or os.cpu_count() or 1
    blob: dict[str, object] = {"classes": classes}
    for split in SPLITS:
        rows = members[split]
        if limit is not None and len(rows) > limit:
            rows = rows[:: max(1, len(rows) // limit)][:limit]
        chunks = [[b for _, b in rows[i:i + 1000]] for i in range(0, len(rows), 1000)]
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(workers) as pool:
                arrays = list(pool.map(_decode, chunks))
        else:
            arrays = [_decode(c) for c in chunks]
        x = np.concatenate(arrays) if arrays else np.zeros((0, 32, 32, 3), np.uint8)
        blob[f"{split}_x"] = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        blob[f"{split}_y"] = torch.tensor([index[c] for c, _ in rows], dtype=torch.long)
    return blob

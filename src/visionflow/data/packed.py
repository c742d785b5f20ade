"""The packed data: every usable image decoded once, resized, as N×C×H×W uint8 per
split, with labels, paths, content hashes (sha256, what the champion gate compares training
sets by) and class names (`outputs/pack/packed.pt`)."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionflow.core.errors import DataError
from visionflow.core.files import read_json, torch_save
from visionflow.core.layout import Layout
from visionflow.data.images import decode_resized

SPLITS = ("train", "val", "test")


def _decode(args: tuple[str, int, int]) -> np.ndarray:
    path, size, channels = args
    return decode_resized(Path(path), size, channels)


def decode_all(paths: list[str], size: int, channels: int, workers: int = 0) -> np.ndarray:
    """Decode and resize images to a uint8 array (N, C, size, size), in parallel."""
    jobs = [(p, size, channels) for p in paths]
    if not jobs:
        return np.zeros((0, channels, size, size), dtype=np.uint8)
    workers = workers or os.cpu_count() or 1
    if len(jobs) < 2000 or workers == 1:
        arrays = [_decode(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_decode, jobs, chunksize=512))
    return np.stack(arrays)


def build_packed(rows: list[dict[str, Any]], root: Path, classes: list[str], size: int,
                channels: int, workers: int = 0) -> dict[str, Any]:
    """The cache for manifest rows (path relative to `root`, split, label)."""
    index = {c: i for i, c in enumerate(classes)}
    blob: dict[str, Any] = {"classes": classes, "image_size": size, "channels": channels}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        x = decode_all([str(root / r["path"]) for r in split_rows], size, channels, workers)
        blob[f"{split}_x"] = torch.from_numpy(x)
        blob[f"{split}_y"] = torch.tensor([index[r["label"]] for r in split_rows],
                                          dtype=torch.long)
        blob[f"{split}_paths"] = [r["path"] for r in split_rows]
        blob[f"{split}_sha256"] = [r["sha256"] for r in split_rows]
    return blob


def split_hashes(blob: dict[str, Any], split: str) -> list[str]:
    """The sha256 of each image of `split`, in cache order."""
    hashes = blob.get(f"{split}_sha256")
    if hashes is None or len(hashes) != len(blob[f"{split}_paths"]):
        raise DataError("outputs/pack/packed.pt records no image hashes (written by an "
                        "older version): run the augment stage again")
    return list(hashes)


def save_packed(blob: dict[str, Any], path: Path) -> None:
    torch_save(blob, path)


def load_packed(path: Path, device: str = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=device, weights_only=True)


def source_data_hash(layout: Layout) -> str:
    """The content hash of the validated data the cache is built from ("" before validate)."""
    return (read_json(layout.validation) or {}).get("data_hash", "")


def load_splits(path: Path, splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    """The class names, image size, channels and the named splits' arrays only.

    The file is memory-mapped and only the kept tensors are copied out, so the bytes of the
    other splits (the hyperparameter search leaves out `test`) are never read from disk."""
    blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    keep = ["classes", "image_size", "channels"] + [
        f"{split}_{part}" for split in splits for part in ("x", "y", "paths")]
    out = {}
    for key in keep:
        value = blob[key]
        out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out

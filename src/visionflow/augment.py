"""Stage 2, augment: decode the validated images once into a uint8 training cache.

The cache (`outputs/augment/cache.pt`) holds one N×C×H×W uint8 tensor and one label
tensor per split, plus class names; training loads it straight onto its device.
The augmentation policy itself runs per batch on that device (`augment_ops`) and
is recorded here in `policy.json` so that the run is reproducible and visible.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from visionflow.atomic import torch_save, write_json
from visionflow.config import Params
from visionflow.layout import Layout
from visionflow.manifest import read_manifest, usable_rows

SPLITS = ("train", "val", "test")


@dataclass
class AugmentResult:
    cache: Path
    counts: dict[str, int]
    classes: list[str]


def _decode(args: tuple[str, int, int]):
    from visionflow.ingest import decode_resized

    path, size, channels = args
    return decode_resized(Path(path), size, channels)


def decode_all(paths: list[str], size: int, channels: int, workers: int = 0):
    """Decode and resize images to a uint8 array (N, C, size, size), in parallel."""
    import numpy as np

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


def run_augment(params: Params, layout: Layout) -> AugmentResult:
    import torch

    meta, rows = read_manifest(layout)
    rows = usable_rows(rows)
    classes: list[str] = meta["classes"]
    index = {c: i for i, c in enumerate(classes)}
    root = Path(meta["dataset_root"])
    size, channels = params.data.image_size, params.data.channels

    blob: dict[str, object] = {"classes": classes, "image_size": size, "channels": channels}
    counts = {}
    for split in SPLITS:
        split_rows = [r for r in rows if r["split"] == split]
        x = decode_all([str(root / r["path"]) for r in split_rows], size, channels,
                       params.validate_.workers)
        blob[f"{split}_x"] = torch.from_numpy(x)
        blob[f"{split}_y"] = torch.tensor([index[r["label"]] for r in split_rows],
                                          dtype=torch.long)
        blob[f"{split}_paths"] = [r["path"] for r in split_rows]
        counts[split] = len(split_rows)

    torch_save(blob, layout.cache)
    write_json(layout.policy, {
        "applied_in": "train (per sample, on the training device)",
        "policy": params.augment.model_dump(),
        "image_size": size,
        "channels": channels,
        "counts": counts,
    })
    return AugmentResult(layout.cache, counts, classes)


def load_cache(path: Path, device: str = "cpu") -> dict:
    import torch

    return torch.load(path, map_location=device, weights_only=True)

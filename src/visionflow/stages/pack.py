"""Stage 2, augment: decode the validated images once into a uint8 training cache.

The cache (`outputs/augment/cache.pt`, see `data.cache`) holds one N×C×H×W uint8 tensor and
one label tensor per split, plus class names; training loads it straight onto its device.
The augmentation policy itself runs per batch on that device (`model.augment_ops`) and
is recorded here in `policy.json` so that the run is reproducible and visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visionflow.config import Params
from visionflow.data.cache import SPLITS, build_cache, save_cache
from visionflow.data.manifest import read_manifest, usable_rows
from visionflow.files import write_json
from visionflow.layout import Layout
from visionflow.stages import main


@dataclass
class AugmentResult:
    cache: Path
    counts: dict[str, int]
    classes: list[str]


def run(params: Params, layout: Layout) -> AugmentResult:
    meta, rows = read_manifest(layout)
    rows = usable_rows(rows)
    classes: list[str] = meta["classes"]
    size, channels = params.data.image_size, params.data.channels
    blob = build_cache(rows, Path(meta["dataset_root"]), classes, size, channels,
                       params.validate_.workers)
    counts = {split: len(blob[f"{split}_paths"]) for split in SPLITS}
    save_cache(blob, layout.cache)
    write_json(layout.policy, {
        "applied_in": "train (per sample, on the training device)",
        "policy": params.augment.model_dump(),
        "image_size": size,
        "channels": channels,
        "counts": counts,
    })
    return AugmentResult(layout.cache, counts, classes)


if __name__ == "__main__":
    main("augment", run)

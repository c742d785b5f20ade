"""Stage 2, pack: store the validated images the way training reads them (`data.storage`).

- `tensor`: every image decoded once, resized to a square `data.image_size`, as one uint8
  N×C×S×S tensor per split in `outputs/pack/packed.pt` (see `data.packed`); training loads it
  straight onto its device. The fastest path for small images (digits, CIFAR-10).
- `shards`: each split as LitData shards of encoded images under `outputs/pack/shards/<split>/`
  (`data.shards`: the file's own JPEG/PNG bytes up to `data.max_side`, else re-encoded), packed
  incrementally; training and evaluation stream them (`data.stream`). `packed.pt` then holds the
  classes, labels, paths and hashes only (`"storage": "shards"`), no pixels.
- `data.shards_url` (shards): each split is uploaded to `<url>/<split>/` and its local shard
  files deleted (`data.remote_shards`): the output keeps the index and contents only, and
  the stages stream from S3 through a capped cache. Shards the index names that are gone
  (from S3, or from disk without a URL) make the split packed afresh.
- `auto`: `tensor` while the decoded tensor (N×C×S×S bytes) fits `data.storage_budget_bytes`.

The augmentation policy runs in training (per batch on the device; in shards mode the
RandomResizedCrop and flip run per sample in the loader) and is recorded in `policy.json`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visionflow.core.config import Params
from visionflow.core.files import write_json
from visionflow.core.layout import Layout
from visionflow.data.manifest import read_manifest, usable_rows
from visionflow.data.packed import SPLITS, build_packed, save_packed
from visionflow.data.shards import (
    image_codec,
    note_tensor_mode,
    read_contents,
    storage_for,
    store_split,
)
from visionflow.stages import main
from visionflow.tasks.segmentation import pack as segmentation

# task -> its own run (params.task; classification is this module's `run`)
TASKS = {"segmentation": segmentation.run}


@dataclass
class PackResult:
    cache: Path
    counts: dict[str, int]
    classes: list[str]
    storage: str = "tensor"
    shards: dict[str, dict[str, int]] = field(default_factory=dict)


def run(params: Params, layout: Layout) -> PackResult:
    if params.task in TASKS:
        return TASKS[params.task](params, layout)
    meta, rows = read_manifest(layout)
    rows = usable_rows(rows)
    classes: list[str] = meta["classes"]
    d = params.data
    size, channels = d.image_size, d.channels
    storage = storage_for(d.storage, len(rows), channels, size, d.storage_budget_bytes)
    layout.shards.mkdir(parents=True, exist_ok=True)  # a DVC output in both modes
    stats: dict[str, dict[str, int]] = {}
    if storage == "tensor":
        for split in SPLITS:  # shards of an earlier run would be stale
            shutil.rmtree(layout.split_shards(split), ignore_errors=True)
        blob = build_packed(rows, Path(meta["dataset_root"]), classes, size, channels,
                           params.validate_.workers)
    else:
        blob = {"classes": classes, "image_size": size, "channels": channels,
                "storage": "shards", "resize_size": d.eval_resize, "shards_url": d.shards_url}
        index = {c: i for i, c in enumerate(classes)}
        codec = image_codec(Path(meta["dataset_root"]), classes, max_side=d.max_side,
                            channels=channels)
        for split in SPLITS:
            s = store_split([r for r in rows if r["split"] == split],
                            layout.split_shards(split), codec, split=split,
                            base_url=d.shards_url, shard_bytes=d.shard_bytes,
                            workers=params.validate_.workers)
            stats[split] = vars(s)
            order = (read_contents(layout.split_shards(split)) or {}).get("samples", [])
            blob[f"{split}_y"] = torch.tensor([index[r["label"]] for r in order],
                                              dtype=torch.long)  # in shard order
            blob[f"{split}_paths"] = [r["path"] for r in order]
            blob[f"{split}_sha256"] = [r["sha256"] for r in order]
            print(f"pack {split}: {s.samples} images in {s.shards} shards ({s.encoded} "
                  f"written, {s.reencoded} re-encoded, {s.reused} kept)", flush=True)
    note_tensor_mode(layout.shards)
    counts = {split: len(blob[f"{split}_paths"]) for split in SPLITS}
    save_packed(blob, layout.packed)
    write_json(layout.policy, {
        "applied_in": "train (per sample, on the training device)",
        "policy": params.augment.model_dump(),
        "storage": storage,
        "image_size": size,
        "channels": channels,
        "counts": counts,
        **({"resize_size": d.eval_resize, "crop_scale": list(d.crop_scale),
            "shards_url": d.shards_url,
            "crop_ratio": list(d.crop_ratio), "max_side": d.max_side, "shards": stats}
           if storage == "shards" else {}),
    })
    return PackResult(layout.packed, counts, classes, storage, stats)


if __name__ == "__main__":
    main("pack", run)

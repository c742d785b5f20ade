"""Pack for `task: segmentation`: the validated pairs, stored as `data.storage` says.

- `tensor`: in `outputs/pack/packed.pt`, train images (N x 3 x S x S uint8) and masks
  (N x S x S uint8) resized to `segmentation.image_size` (bilinear for images, nearest for
  masks), what the joint augmentation crops from on the training device; val and test pairs
  at their own size (lists of tensors): scores are measured on the pixels as labelled. The
  decoded bytes must fit `data.storage_budget_bytes`, else a one-line error.
- `shards`: each split as LitData shards of encoded pairs (`data.segmentation_shards`),
  uploaded to `data.shards_url` when set; `packed.pt` keeps no pixels. Pairs whose longer
  side is over `data.max_side` are stored scaled down to it (and scored at that size).
- `auto`: `tensor` while the decoded bytes (train at S x S, the others at their own size,
  read from the image headers) fit `data.storage_budget_bytes`, else `shards`.

Every split keeps its image paths, mask paths and pair sha256 in the stored order (the
gate's exclusion and the lineage record use them). Read back through
`data.segmentation_feed`, the one adapter.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import torch

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.files import read_json, write_json
from visionflow.core.layout import Layout
from visionflow.data.packed import SPLITS, save_packed
from visionflow.data.segmentation_layout import Pair, load_pair, read_mask
from visionflow.data.segmentation_shards import decoded_pair_bytes, pair_codec, resize_train_pair
from visionflow.data.shards import note_tensor_mode, read_contents, store_split


def read_pairs(layout: Layout) -> tuple[dict[str, Any], list[Pair], list[str]]:
    """(validation.json, the usable pairs, their pair sha256) from validate's outputs."""
    validation = read_json(layout.validation) or {}
    if validation.get("task") != "segmentation":
        raise DataError(f"{layout.validation}: not a segmentation validation (task "
                        f"{validation.get('task', 'classification')}): run validate again")
    with layout.manifest.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if not r["quarantine_reason"]]
    return (validation, [Pair(r["stem"], r["path"], r["mask"], r["split"]) for r in rows],
            [r["sha256"] for r in rows])


def run(params: Params, layout: Layout) -> dict[str, Any]:
    validation, pairs, hashes = read_pairs(layout)
    root = Path(validation["dataset_root"])
    d, size = params.data, params.segmentation.image_size
    storage = d.storage
    if storage == "auto":
        need = decoded_pair_bytes(root, [(p.image, p.split) for p in pairs], size)
        storage = "tensor" if need <= d.storage_budget_bytes else "shards"
        print(f"pack (segmentation): {need / 2**20:.1f} MiB decoded against "
              f"data.storage_budget_bytes={d.storage_budget_bytes}: {storage}", flush=True)
    blob: dict[str, Any] = {"task": "segmentation", "classes": validation["classes"],
                            "image_size": size, "channels": 3, "storage": storage}
    layout.shards.mkdir(parents=True, exist_ok=True)  # a DVC output in both modes
    if storage == "tensor":
        for split in SPLITS:  # shards of an earlier run would be stale
            shutil.rmtree(layout.split_shards(split), ignore_errors=True)
        used = _tensors(blob, root, pairs, hashes, size, d.storage_budget_bytes)
        extra: dict[str, Any] = {"bytes": used}
    else:
        blob["shards_url"] = d.shards_url
        extra = {"max_side": d.max_side, "shards_url": d.shards_url,
                 "shards": _shards(blob, layout, root, pairs, hashes, params)}
    note_tensor_mode(layout.shards)
    save_packed(blob, layout.packed)
    counts = {split: len(blob[f"{split}_paths"]) for split in SPLITS}
    s = params.segmentation
    write_json(layout.policy, {
        "task": "segmentation",
        "applied_in": "train (per batch, jointly to image and mask, on the training device)",
        "policy": {"crop_scale": list(s.crop_scale), "hflip": s.hflip, "vflip": s.vflip,
                   "brightness": s.brightness, "contrast": s.contrast,
                   "saturation": s.saturation, "out_size": [size, size]},
        "storage": storage, "image_size": size, "channels": 3, "counts": counts, **extra,
    })
    print("pack (segmentation): " + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" pairs, {storage}"
          + (f", {extra['bytes'] / 2**20:.1f} MiB" if "bytes" in extra else ""), flush=True)
    return {"cache": str(layout.packed), "counts": counts, "classes": blob["classes"],
            "storage": storage}


def _tensors(blob: dict[str, Any], root: Path, pairs: list[Pair], hashes: list[str],
             size: int, budget: int) -> int:
    """Each split's pixels into `blob`: the bytes decoded (one-line error over `budget`)."""
    used = 0
    for split in SPLITS:
        chosen = [(p, h) for p, h in zip(pairs, hashes, strict=True) if p.split == split]
        xs, ys = [], []
        for pair, _ in chosen:
            image, mask = load_pair(root, pair)
            x = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
            y = torch.from_numpy(mask.copy())
            if split == "train":
                x, y = resize_train_pair(x, y, size)
            used += x.numel() + y.numel()
            if used > budget:
                raise DataError(f"data.storage_budget_bytes={budget}: the segmentation pairs "
                                f"need more (over {used} bytes decoded at {split}); raise it, "
                                f"lower segmentation.image_size or set data.storage=shards")
            xs.append(x)
            ys.append(y)
        if split == "train":
            blob["train_x"] = torch.stack(xs) if xs else torch.zeros(0, 3, size, size,
                                                                      dtype=torch.uint8)
            blob["train_masks"] = torch.stack(ys) if ys else torch.zeros(0, size, size,
                                                                         dtype=torch.uint8)
        else:
            blob[f"{split}_x"], blob[f"{split}_masks"] = xs, ys
        _record(blob, split, [(p.image, p.mask, h) for p, h in chosen])
    return used


def _shards(blob: dict[str, Any], layout: Layout, root: Path, pairs: list[Pair],
            hashes: list[str], params: Params) -> dict[str, dict[str, int]]:
    """Each split as shards (uploaded to `data.shards_url` when set); `blob` records the pairs
    in shard order. The stats per split."""
    d, stats = params.data, {}
    codec = pair_codec(root, blob["classes"], read_mask, max_side=d.max_side)
    for split in SPLITS:
        split_dir = layout.split_shards(split)
        st = store_split([{"path": p.image, "mask": p.mask, "sha256": h}
                          for p, h in zip(pairs, hashes, strict=True) if p.split == split],
                         split_dir, codec, split=split, base_url=d.shards_url,
                         shard_bytes=d.shard_bytes, workers=params.validate_.workers)
        stats[split] = vars(st)
        order = (read_contents(split_dir) or {}).get("samples", [])
        _record(blob, split, [(r["path"], r["mask"], r["sha256"]) for r in order])
        print(f"pack {split}: {st.samples} pairs in {st.shards} shards ({st.encoded} "
              f"written, {st.reencoded} re-encoded, {st.reused} kept)", flush=True)
    return stats


def _record(blob: dict[str, Any], split: str, stored: list[tuple[str, str, str]]) -> None:
    """The split's (image path, mask path, pair sha256) in the stored order."""
    blob[f"{split}_paths"] = [image for image, _, _ in stored]
    blob[f"{split}_mask_paths"] = [mask for _, mask, _ in stored]
    blob[f"{split}_sha256"] = [sha for _, _, sha in stored]

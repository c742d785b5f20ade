"""Pack for `task: segmentation`: the validated pairs as tensors in `outputs/pack/packed.pt`
(the tensor path of `data.storage`; shards are classification's only, for now).

- train: images (N x 3 x S x S uint8) and masks (N x S x S uint8) resized to
  `segmentation.image_size` (bilinear for images, nearest for masks), what the joint
  augmentation crops from on the training device;
- val and test: each pair at its own size (lists of tensors): scores are measured on the
  pixels as labelled.

Every split keeps its image paths and pair sha256 in the same order (the gate's exclusion
and the lineage record use them). The decoded bytes must fit `data.storage_budget_bytes`,
else a one-line error (memory stays bounded by that param).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.files import read_json, write_json
from visionflow.core.layout import Layout
from visionflow.data.packed import SPLITS, save_packed
from visionflow.data.segmentation_layout import Pair, load_pair
from visionflow.data.shards import note_tensor_mode


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


def resized(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    y = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(size, size),
                      mode="nearest-exact")
    return x[0].round().clamp(0, 255).to(torch.uint8), y[0, 0].to(torch.uint8)


def run(params: Params, layout: Layout) -> dict[str, Any]:
    validation, pairs, hashes = read_pairs(layout)
    root = Path(validation["dataset_root"])
    size, budget = params.segmentation.image_size, params.data.storage_budget_bytes
    blob: dict[str, Any] = {"task": "segmentation", "classes": validation["classes"],
                            "image_size": size, "channels": 3, "storage": "tensor"}
    used = 0
    for split in SPLITS:
        chosen = [(p, h) for p, h in zip(pairs, hashes, strict=True) if p.split == split]
        xs, ys = [], []
        for pair, _ in chosen:
            image, mask = load_pair(root, pair)
            if split == "train":
                x, y = resized(image, mask, size)
            else:
                x = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
                y = torch.from_numpy(mask.copy())
            used += x.numel() + y.numel()
            if used > budget:
                raise DataError(f"data.storage_budget_bytes={budget}: the segmentation pairs "
                                f"need more (over {used} bytes decoded at {split}); raise it "
                                f"or lower segmentation.image_size")
            xs.append(x)
            ys.append(y)
        if split == "train":
            blob["train_x"] = torch.stack(xs) if xs else torch.zeros(0, 3, size, size,
                                                                      dtype=torch.uint8)
            blob["train_masks"] = torch.stack(ys) if ys else torch.zeros(0, size, size,
                                                                         dtype=torch.uint8)
        else:
            blob[f"{split}_x"], blob[f"{split}_masks"] = xs, ys
        blob[f"{split}_paths"] = [p.image for p, _ in chosen]
        blob[f"{split}_mask_paths"] = [p.mask for p, _ in chosen]
        blob[f"{split}_sha256"] = [h for _, h in chosen]
    for split in SPLITS:  # shards of an earlier classification run would be stale
        shutil.rmtree(layout.split_shards(split), ignore_errors=True)
    layout.shards.mkdir(parents=True, exist_ok=True)  # a DVC output in both modes
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
        "storage": "tensor", "image_size": size, "channels": 3, "counts": counts,
        "bytes": used,
    })
    print(f"pack (segmentation): {counts} pairs, {used / 2**20:.1f} MiB", flush=True)
    return {"cache": str(layout.packed), "counts": counts, "classes": blob["classes"]}

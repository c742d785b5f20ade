"""Segmentation projects for the pipeline tests (#19): the generated shapes set, small and
fast (160 images of 32..40 px, a width-8 U-Net, 30 epochs at 32 px, one thread), and a
small Pascal VOC folder written from the same shapes.

The test split's mIoU moves with the CPU's float arithmetic (an AVX2-only CPU scored 0.79
where others had passed 0.80). `bench/bench_seg_seeds.py`, seeds 0-5 on one machine: 20
epochs 0.75-0.90 (the triangle class is sometimes barely learned), 30 epochs 0.82-0.93
for about 3 s more; a broken pipeline scores near all-background (about 0.19).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.data.segmentation_masks import voc_colour
from visionflow.data.segmentation_synth import materialize_shapes, render_shapes

SEG = {
    "task": "segmentation",
    "data.val_fraction": 0.1,
    "data.test_fraction": 0.2,
    "segmentation.model": "unet",
    "segmentation.model_kwargs": {"width": 8, "depth": 3},
    "segmentation.image_size": 32,
    "segmentation.epochs": 30,
    "segmentation.batch_size": 16,
    "segmentation.lr": 0.01,
    "segmentation.worst_images": 4,
    "train.threads": 1,  # a shared, loaded CPU: one thread is several times faster
    "register.model_name": "visionflow-segmenter",
    "register.min_test_images": 10,
    "compress.methods": ["int8"],
    "compress.max_miou_drop": 2.0,
}
MIN_MIOU = 0.75


def checkpoint_position(path: Path) -> tuple[int, int] | None:
    """(epochs done, steps into the next) of the train checkpoint there, if any."""
    import torch

    try:
        fit = torch.load(path, weights_only=True)["fit"]
    except Exception:  # not there yet, or being replaced
        return None
    return fit["epoch"], fit.get("step", 0)


def shapes(root: Path, n: int = 160) -> Path:
    return materialize_shapes(root, n_images=n, seed=0, min_side=32, max_side=40)


def write_voc(root: Path, n: int = 40, bad: int = 1, first: int = 0) -> Path:
    """A Pascal VOC folder: JPEGImages/*.jpg, SegmentationClass/*.png in VOC colours (RGB),
    ImageSets/Segmentation/{train,val}.txt; `bad` masks with a colour not in the palette;
    pairs `first` to `first + n - 1` (a pair's bytes follow its number)."""
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(first, first + n):
        image, mask = render_shapes(1, i, 32, 40)
        stem = f"2007_{i:06d}"
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
        for k in np.unique(mask):
            rgb[mask == k] = voc_colour(int(k))
        if i < first + bad:
            rgb[0, 0] = (1, 2, 3)
        Image.fromarray(rgb, "RGB").save(root / "SegmentationClass" / f"{stem}.png")
        stems.append(stem)
    (root / "classes.txt").write_text("background\ncircle\nrectangle\ntriangle\nellipse\n")
    lists = root / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text("\n".join(stems[: n * 3 // 4]) + "\n")
    (lists / "val.txt").write_text("\n".join(stems[n * 3 // 4:]) + "\n")
    return root

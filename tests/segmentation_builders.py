"""A small trained U-Net on the generated shapes set, in a project folder, for the
segmentation deployment tests (compress, pyfunc, predict). Trained once per test process
(about 10 s on one thread) and copied into each caller's project."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from visionflow.core.layout import Layout
from visionflow.data.segmentation_layout import load_pair, scan_segmentation
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.model.segmentation import SegArch, build_segmenter, save_segmenter
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import fit_segmenter, resize_pair

SIDE = 32  # training side (data.image_size in the project)
SHAPES = {"n_images": 160, "seed": 0, "min_side": 32, "max_side": 40}
SPLITS = {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 0}
_CACHE: dict[str, Path] = {}


def tensors(root: Path, pair) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = load_pair(root, pair)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask).long()


def shapes_and_model(base: Path) -> tuple[Path, Path]:
    """(the generated set, a trained width-8 U-Net's model.pt): built once under `base`."""
    if "model" not in _CACHE:
        root = materialize_shapes(base / "shapes", **SHAPES)
        scan = scan_segmentation(root, **SPLITS)
        train = [p for p in scan.pairs if p.split == "train"]
        images, masks = zip(*(resize_pair(*tensors(root, p), (SIDE, SIDE)) for p in train),
                            strict=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch.manual_seed(0)
            arch = SegArch("unet", len(scan.classes), classes=list(scan.classes),
                           kwargs={"width": 8, "depth": 3})
            model = build_segmenter(arch)
            policy = JointPolicy(out_size=(SIDE, SIDE), scale=(0.4, 1.4), hflip=0.5, vflip=0.5,
                                 brightness=0.2, contrast=0.2, saturation=0.2)
            fit_segmenter(model, torch.stack(images), torch.stack(masks), policy, epochs=20,
                          batch_size=16, lr=0.01, seed=0)
        finally:
            torch.set_num_threads(threads)
        save_segmenter(base / "model.pt", model.eval(), arch)
        _CACHE["data"], _CACHE["model"] = root, base / "model.pt"
    return _CACHE["data"], _CACHE["model"]


def with_packed_pairs(layout: Layout) -> None:
    """Validate and pack the project's pairs (what compress reads, `segmentation_feed`)."""
    from visionflow.core.configfile import load_params
    from visionflow.orchestration.stage_runner import run_stage

    params = load_params(layout.params)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)


def segmentation_project(base: Path, dest: Path, overrides: dict | None = None) -> Layout:
    """A project (params, data/ = the shapes set, outputs/train/model.pt = the U-Net)."""
    from helpers import make_project

    data, model = shapes_and_model(base)
    root = make_project(dest, data, {
        "data.image_size": SIDE, "data.val_fraction": SPLITS["val_fraction"],
        "data.test_fraction": SPLITS["test_fraction"], "data.split_seed": SPLITS["seed"],
        "task": "segmentation", "segmentation.image_size": SIDE, **(overrides or {})})
    layout = Layout.at(root)
    with_packed_pairs(layout)
    layout.model.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, layout.model)
    return layout

"""Segmentation building blocks together on the CPU (issue #19): the generated shapes set
-> `scan_segmentation` (content-addressed splits) -> train pairs resized to one size ->
`joint_augment` on the device -> U-Net (cross-entropy, ignore 255) -> val and test mIoU at
each image's own size. Reports train img/s (whole run, and the median epoch) and the scores.

    nice -n 10 .venv/bin/python bench/bench_segmentation.py --images 600 --size 64 \
        --width 16 --depth 3 --epochs 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from visionflow.data.segmentation_layout import load_pair, scan_segmentation
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.model.segmentation import SegArch, build_segmenter
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import evaluate_segmenter, fit_segmenter, resize_pair
from visionflow.model.zoo import count_params


def _tensors(root: Path, pair) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = load_pair(root, pair)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=64, help="training crop side (px)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=Path("/tmp/vflow-bench-seg"))
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    t0 = time.perf_counter()
    root = materialize_shapes(a.data / f"shapes-{a.images}", n_images=a.images, seed=0)
    scan = scan_segmentation(root, val_fraction=0.1, test_fraction=0.1, seed=0)
    split = {s: [p for p in scan.pairs if p.split == s] for s in ("train", "val", "test")}
    images, masks = zip(*(resize_pair(*_tensors(root, p), (a.size, a.size))
                          for p in split["train"]), strict=True)
    prep = time.perf_counter() - t0

    torch.manual_seed(0)
    k = len(scan.classes)
    model = build_segmenter(SegArch("unet", k, kwargs={"width": a.width, "depth": a.depth}))
    model = model.to(device)
    policy = JointPolicy(out_size=(a.size, a.size), scale=(0.4, 1.4), hflip=0.5, vflip=0.5,
                         brightness=0.2, contrast=0.2, saturation=0.2)
    run = fit_segmenter(model, torch.stack(images), torch.stack(masks), policy,
                        epochs=a.epochs, batch_size=a.batch, lr=a.lr, seed=0)
    n_train = len(split["train"])
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "classes": scan.classes,
           "pairs": {s: len(v) for s, v in split.items()}, "params": count_params(model),
           "prep_seconds": round(prep, 1), "train_seconds": round(run["seconds"], 1),
           "train_img_per_s": round(run["img_per_s"], 1),
           "median_epoch_img_per_s": round(n_train / statistics.median(run["epoch_seconds"]),
                                           1),
           "last_epoch_loss": round(run["loss"], 4)}
    for name in ("val", "test"):
        scores, _ = evaluate_segmenter(model, (_tensors(root, p) for p in split[name]), k)
        out[name] = {key: (round(v, 4) if isinstance(v, float) else
                           {c: None if x is None else round(x, 4) for c, x in v.items()})
                     for key, v in scores.as_dict(scan.classes).items()}
    print(json.dumps(out, indent=2))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

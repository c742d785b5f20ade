"""Precise BatchNorm on a short segmentation run (session 22): the generated shapes set ->
train pairs at one size -> a torchvision segmenter from scratch for a few epochs, then val
mIoU at each image's own size three ways, from the same trained weights:

- `as trained`: the running statistics training left (torchvision MobileNetV3: momentum 0.01);
- `momentum 0.1`: the same run with every BatchNorm at PyTorch's default momentum instead
  (a second training run, same seed);
- `precise`: the first run's weights with `recalibrate_bn` over the first `--bn-images` train
  images (what the train stage does before each evaluation), and its time.

    nice -n 10 .venv/bin/python bench/bench_precise_bn.py --images 600 --size 96 --epochs 3
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from visionflow.data.segmentation_layout import load_pair, scan_segmentation
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.model.segmentation import SegArch, build_segmenter
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import (
    evaluate_segmenter,
    fit_segmenter,
    recalibrate_bn,
    resize_pair,
)


def _tensors(root: Path, pair) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = load_pair(root, pair)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--bn-images", type=int, default=256)
    ap.add_argument("--model", default="lraspp_mobilenet_v3_large")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with TemporaryDirectory() as tmp:
        root = materialize_shapes(Path(tmp) / "shapes", n_images=args.images, seed=0,
                                  min_side=48, max_side=96)
        scan = scan_segmentation(root, val_fraction=0.15, test_fraction=0.0, seed=0)
        side = (args.size, args.size)
        train = [resize_pair(*_tensors(root, p), side) for p in scan.pairs if p.split == "train"]
        val = [_tensors(root, p) for p in scan.pairs if p.split == "val"]
    images, masks = torch.stack([x for x, _ in train]), torch.stack([y for _, y in train])
    k, policy = len(scan.classes), JointPolicy(out_size=side, scale=(0.4, 1.4), hflip=0.5,
                                               vflip=0.5, brightness=0.2, contrast=0.2,
                                               saturation=0.2)

    def trained(momentum: float | None) -> tuple[torch.nn.Module, float]:
        torch.manual_seed(0)
        model = build_segmenter(SegArch(args.model, k))
        for m in model.modules():
            if momentum is not None and isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum
        run = fit_segmenter(model, images, masks, policy, epochs=args.epochs,
                            batch_size=args.batch, lr=3e-3, seed=0)
        return model, run["seconds"]

    def miou(model: torch.nn.Module) -> float:
        return round(evaluate_segmenter(model, iter(val), k)[0].miou, 4)

    model, seconds = trained(None)
    momenta = sorted({m.momentum for m in model.modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
    rows = {"as trained": {"val_miou": miou(model), "train_s": round(seconds, 1)}}
    precise = copy.deepcopy(model)
    start = time.perf_counter()
    recalibrate_bn(precise, images[:args.bn_images].split(args.batch))
    rows["precise"] = {"val_miou": miou(precise),
                       "recalibrate_s": round(time.perf_counter() - start, 2)}
    fast, seconds = trained(0.1)
    rows["momentum 0.1"] = {"val_miou": miou(fast), "train_s": round(seconds, 1)}
    print(json.dumps({"model": args.model, "bn_momenta": momenta, "train_pairs": len(train),
                      "val_pairs": len(val), "epochs": args.epochs, "size": args.size,
                      "bn_images": min(args.bn_images, len(train)), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Segmentation building blocks together on the CPU (issue #19): the generated shapes set
-> `scan_segmentation` (content-addressed splits) -> train pairs resized to one size ->
`joint_augment` on the device -> U-Net (cross-entropy, ignore 255) -> val and test mIoU at
each image's own size. Reports train img/s (whole run, and the median epoch) and the scores.
With `--int8`, the trained model also goes through the compress stage's segmentation code
(`compression.segmentation`): its ONNX export and ORT QDQ int8 copy, each scored by test
mIoU at the images' own sizes, file size, and CPU batch-1 / batch-8 latency at the training
size, timed round-robin side by side with the torch model (medians). `--model` trains a
torchvision segmenter instead of the U-Net; `--bn-momentum` sets every BatchNorm's momentum
before training; `--precise-bn N` scores val and test as trained, then sets BatchNorm's
statistics from the first N train pairs, augmented (`recalibrate_bn`, timed), before the val
and test scores.

    nice -n 10 .venv/bin/python bench/bench_segmentation.py --images 600 --size 64 \
        --width 16 --depth 3 --epochs 8 --threads 1 --int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from visionflow.data.segmentation_layout import load_pair, scan_segmentation
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.model.segmentation import SegArch, build_segmenter, save_segmenter
from visionflow.model.segmentation_augment import JointPolicy
from visionflow.model.segmentation_fit import (
    evaluate_segmenter,
    fit_segmenter,
    recalibrate_bn,
    resize_pair,
)
from visionflow.model.zoo import count_params


def _tensors(root: Path, pair) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = load_pair(root, pair)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(mask).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=64, help="training crop side (px)")
    ap.add_argument("--model", default="unet", help="a segmentation zoo name")
    ap.add_argument("--bn-momentum", type=float, help="every BatchNorm's, before training")
    ap.add_argument("--precise-bn", type=int, default=0, help="train images that set "
                    "BatchNorm's statistics after training (0: none)")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=Path("/tmp/vflow-bench-seg"))
    ap.add_argument("--int8", action="store_true", help="also int8 vs fp32 (mIoU, size, "
                    "CPU latency) through compress's segmentation code")
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
    arch = SegArch(a.model, k, classes=list(scan.classes),
                   kwargs={"width": a.width, "depth": a.depth} if a.model == "unet" else {})
    model = build_segmenter(arch)
    model = model.to(device)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms if a.bn_momentum is not None else []:
        m.momentum = a.bn_momentum
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
           "last_epoch_loss": round(run["loss"], 4),
           "bn_momenta": sorted({m.momentum for m in norms})}
    if a.precise_bn:
        for name in ("val", "test"):
            pairs = (_tensors(root, p) for p in split[name])
            out[f"{name}_as_trained_miou"] = round(evaluate_segmenter(model, pairs, k)[0].miou, 4)
        start = time.perf_counter()
        recalibrate_bn(model, zip(torch.stack(images[:a.precise_bn]).split(a.batch),
                                  torch.stack(masks[:a.precise_bn]).split(a.batch),
                                  strict=True), policy, seed=0)
        out["precise_bn"] = {"images": len(images[:a.precise_bn]),
                             "seconds": round(time.perf_counter() - start, 2)}
    for name in ("val", "test"):
        scores, _ = evaluate_segmenter(model, (_tensors(root, p) for p in split[name]), k)
        out[name] = {key: (round(v, 4) if isinstance(v, float) else
                           {c: None if x is None else round(x, 4) for c, x in v.items()})
                     for key, v in scores.as_dict(scan.classes).items()}
    if a.int8:
        test = [_tensors(root, p) for p in split["test"]]
        out["int8"] = _int8(model.cpu().eval(), arch, torch.stack(images),
                            torch.stack(masks), test)
    print(json.dumps(out, indent=2))
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")


def _int8(model, arch: SegArch, images: torch.Tensor, masks: torch.Tensor,
          test: list) -> dict:
    """fp32 torch, fp32 ONNX and int8 ONNX of `model`: test mIoU, bytes, CPU latency."""
    # here, not at the top: the GPU machine (gpu_bench step 8) has no ONNX, ORT or pydantic
    from visionflow.compression.latency import measure_latency
    from visionflow.compression.segmentation import SegContext, build_segmentation_variants
    from visionflow.core.config import CompressConfig

    cfg = CompressConfig(methods=["int8"], calibration_images=64, latency_batches=[1, 8],
                         latency_reps=30, latency_reps_large=10, latency_warmup=3)
    with tempfile.TemporaryDirectory(prefix="vf-bench-seg-") as tmp:
        ctx = SegContext(model, arch, lambda: test, images, masks, cfg=cfg, seed=0,
                         device=torch.device("cpu"), out=Path(tmp))
        save_segmenter(Path(tmp) / "model.pt", model, arch)
        sweep = build_segmentation_variants(ctx, Path(tmp) / "model.pt")
        measure_latency(sweep.variants, ctx.example, cfg)
    keys = ("runtime", "miou", "miou_drop_points", "pixel_agreement_with_fp32",
            "size_bytes", "size_ratio", "cpu_b1_ms", "cpu_b8_ms")
    return {v.name: {k: v.entry.get(k) for k in keys} for v in sweep.variants}


if __name__ == "__main__":
    main()

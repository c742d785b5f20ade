"""`train.lr` against the model and batch size: the default (0.5, the digits `fast` net at
batch 64) and smaller rates for a ResNet trained from scratch on photos.

A project with generated "photos" (mixed sizes 320x240 to 1200x900, one colour a class, with
noise; 3 classes, 40 train, 10 val, 10 test each), packed once as shards; then
`vflow stage train` once per rate, every other setting the same. Prints each epoch's mean
train loss and val top-1, and ln(classes), a uniform guess's loss.

    .venv/bin/python bench/bench_lr.py --lr 0.5 0.1 0.02 0.005
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VFLOW = Path(sys.executable).parent / "vflow"
CLASSES = ("ants", "bees", "wasps")
SIZES = [(500, 375), (375, 500), (320, 240), (640, 480), (260, 260), (1200, 900)]


def write_photos(root: Path, counts: dict[str, int]) -> None:
    for split, n in counts.items():
        for ci, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(zlib.crc32(f"{split}/{name}/{i}".encode()))
                base = rng.integers(0, 60, (4, 4, 3), dtype=np.uint8)
                base[..., ci % 3] += 180
                img = Image.fromarray(base).resize(SIZES[(i + ci) % len(SIZES)],
                                                   Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                (root / split / name / f"{i:03d}.jpg").write_bytes(buf.getvalue())


def stage(root: Path, name: str, sets: list[str]) -> None:
    args = [str(VFLOW), "stage", name, "--root", str(root)]
    for s in sets:
        args += ["-s", s]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.5, 0.1, 0.02, 0.005])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=96)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(REPO / "params.yaml", root / "params.yaml")
        write_photos(root / "data", {"train": 40, "val": 10, "test": 10})
        sets = [f"train.model={a.model}", f"data.image_size={a.image_size}",
                "data.storage=shards", f"train.batch_size={a.batch_size}",
                f"train.epochs={a.epochs}", "train.progress=false", "augment.hflip=0.5",
                "augment.translate=0", "augment.cutout=0"]
        stage(root, "validate", sets)
        stage(root, "pack", sets)
        print(f"{a.model}, {a.image_size} px, batch {a.batch_size}, {a.epochs} epochs; "
              f"ln({len(CLASSES)}) = {math.log(len(CLASSES)):.2f}")
        print("| train.lr | train loss by epoch | val top-1 by epoch |\n|---:|---|---|")
        for lr in a.lr:
            stage(root, "train", [*sets, f"train.lr={lr}"])
            rows = list(csv.DictReader((root / "outputs/train/history.csv").open()))
            loss = ", ".join(f"{float(r['train_loss']):.2f}" for r in rows)
            top1 = ", ".join(f"{float(r['val_top1']):.2f}" for r in rows)
            print(f"| {lr:g} | {loss} | {top1} |", flush=True)


if __name__ == "__main__":
    main()

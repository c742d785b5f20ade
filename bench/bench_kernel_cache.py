"""oneDNN's kernel cache and a segmenter run at many image sizes: peak `RssAnon` and time of
one process evaluating the U-Net (width 8, depth 3) on random images of random sizes, with
`ONEDNN_PRIMITIVE_CACHE_CAPACITY` set before its first convolution (`default`: what
`model.segmentation.build_segmenter` sets). Or, with `--train MODEL`, the time of a training
step (batch 4, 96 px) at that capacity. One setting a process: oneDNN reads it once.

    .venv/bin/python bench/bench_kernel_cache.py --capacities 1024 256 64 --sides 288 384
    .venv/bin/python bench/bench_kernel_cache.py --capacities 1024 64 16 --train deeplabv3_resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

RUN = r"""
import json, os, sys, threading, time
cap, images, lo, hi, train = sys.argv[1:6]
if cap != "default":
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cap
import torch
from visionflow.model.segmentation import SegArch, build_segmenter
from visionflow.model.segmentation_fit import evaluate_segmenter

torch.set_num_threads(2)
torch.manual_seed(0)
name = train or "unet"
kwargs = {"width": 8, "depth": 3} if name == "unet" else {}
model = build_segmenter(SegArch(name, 5, 3, classes=list("abcde"), kwargs=kwargs))
peak, stop = [0.0], threading.Event()


def poll():
    while not stop.is_set():
        with open("/proc/self/status") as f:
            kb = next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon"))
        peak[0] = max(peak[0], kb / 1024)
        time.sleep(0.02)


threading.Thread(target=poll, daemon=True).start()
time.sleep(0.1)
base = peak[0]
if train:
    opt = torch.optim.AdamW(model.parameters())
    x, y = torch.rand(4, 3, 96, 96), torch.randint(0, 5, (4, 96, 96))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(10):
        step()
    out = {"step_ms": round((time.perf_counter() - t) / 10 * 1000)}
else:
    g = torch.Generator().manual_seed(0)

    def pairs():
        for _ in range(int(images)):
            h, w = (int(v) for v in torch.randint(int(lo), int(hi) + 1, (2,), generator=g))
            yield (torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                   torch.randint(0, 5, (h, w)))

    t = time.perf_counter()
    evaluate_segmenter(model, pairs(), 5)
    out = {"seconds": round(time.perf_counter() - t, 1)}
stop.set()
print(json.dumps({"capacity": cap, "base_mb": round(base), "peak_mb": round(peak[0]), **out}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacities", nargs="+", default=["1024", "default"])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--sides", type=int, nargs=2, default=[288, 384], metavar=("MIN", "MAX"))
    ap.add_argument("--train", default="", help="time a training step of this segmenter")
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    for cap in a.capacities:
        proc = subprocess.run([sys.executable, "-c", RUN, cap, str(a.images), str(a.sides[0]),
                               str(a.sides[1]), a.train], env=env, capture_output=True,
                              text=True, check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({"images": a.images, "sides": a.sides, "train": a.train, **row}),
              flush=True)


if __name__ == "__main__":
    main()

"""A segmenter run at many image sizes does not keep growing: oneDNN's kernel cache (one
kernel, with its buffers, for each input shape) is capped when a segmenter is built, unless
the environment sets the cap. Each case is a fresh process (oneDNN reads the cap once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MiB = 2**20
SCRIPT = r"""
import ctypes, json, torch
from visionflow.model.segmentation import SegArch, build_segmenter
from visionflow.model.segmentation_fit import evaluate_segmenter

torch.set_num_threads(1)
model = build_segmenter(SegArch("unet", 5, 3, classes=list("abcde"),
                                kwargs={"width": 8, "depth": 3}))
g = torch.Generator().manual_seed(0)


def anon() -> int:  # live anonymous memory: the heap's free pages returned first
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon"))


def pairs(n):
    for _ in range(n):
        h, w = (int(v) for v in torch.randint(96, 161, (2,), generator=g))
        yield torch.randint(0, 256, (3, h, w), dtype=torch.uint8), torch.randint(0, 5, (h, w))


evaluate_segmenter(model, pairs(20), 5)
warm = anon()
evaluate_segmenter(model, pairs(100), 5)
print(json.dumps({"growth": anon() - warm}))
"""


def _growth(cap: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if cap is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cap
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth"]


def test_many_image_sizes_do_not_grow_the_process():
    capped, uncapped = _growth(None), _growth("1024")  # 1024: oneDNN's own default
    # 100 sizes of 96-160 px, the heap trimmed (an AVX2 EPYC, three runs): 18.8-19.1 MiB
    # capped, 32.1-32.8 at 1,024 kernels. Untrimmed, freed heap pages counted too: capped
    # 4.7-39.6 MiB, and once 40.3 against 59.2 (the ratio 1.47 failed this test)
    assert capped < 64 * MiB, f"{capped / MiB:.0f} MiB over 100 new image sizes"
    # the setting wins; a ratio, since kernel sizes differ between CPU kinds
    assert uncapped > 1.5 * capped, (uncapped / MiB, capped / MiB)

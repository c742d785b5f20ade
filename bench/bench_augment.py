"""Benchmark visionflow.model.augment_ops against kornia.augmentation and torchvision.transforms.v2.

All candidates run side by side in one process, interleaved round-robin (rep 1 of every candidate,
then rep 2, ...) so background load hits them alike; we report the median per candidate.

    PYTHONPATH=src python bench/bench_augment.py --device cpu --threads 1 --reps 30
    PYTHONPATH=src python bench/bench_augment.py --device cuda --reps 50

Input is a uint8 batch (N, 3, 32, 32) as the trainer holds it; every pipeline returns float32 in
[0, 1]. kornia needs float input, so its pipelines include the uint8 -> float conversion.
torchvision v2 draws ONE set of random parameters per call: on a batched tensor every sample gets
the same flip/crop/erase ("v2 batched", not per-sample, listed for reference); per-sample needs a
Python loop over the samples ("v2 per-sample loop"), which is what a user would write.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import kornia
import kornia.augmentation as K
import torch
import torchvision
import torchvision.transforms.v2 as v2
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if (HERE.parent / "src").is_dir() and str(HERE.parent / "src") not in sys.path:
    sys.path.insert(0, str(HERE.parent / "src"))

from visionflow.model import augment_ops as ops  # noqa: E402
from visionflow.model.augment_ops import Policy  # noqa: E402

Fn = Callable[[Tensor], Tensor]
SHIFT, CUT, JIT = 4, 8, 0.4  # translate px, cutout side px, jitter strength


def _kornia_to_float(aug: nn.Module) -> Fn:
    return lambda x: aug(x.float().div_(255))


def _v2_loop(t: Callable[[Tensor], Tensor]) -> Fn:
    return lambda x: torch.stack([t(img) for img in x])


def _v2(jitter: bool) -> v2.Compose:
    steps: list[nn.Module] = [
        v2.RandomHorizontalFlip(0.5),
        v2.RandomCrop(32, padding=SHIFT, padding_mode="reflect"),
    ]
    if jitter:
        steps.append(v2.ColorJitter(JIT, JIT, JIT))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomErasing(0.5, scale=(CUT**2 / 1024,) * 2, ratio=(1.0, 1.0)),
    ]
    return v2.Compose(steps)


def _kornia(jitter: bool, affine: bool = False) -> nn.Module:
    shift = (
        K.RandomAffine(0.0, translate=(SHIFT / 32, SHIFT / 32), padding_mode="reflection", p=1.0)
        if affine
        else K.RandomCrop((32, 32), padding=SHIFT, padding_mode="reflect")
    )
    steps: list[nn.Module] = [K.RandomHorizontalFlip(p=0.5), shift]
    if jitter:
        steps.append(K.ColorJitter(JIT, JIT, JIT, p=1.0))
    steps.append(K.RandomErasing(scale=(CUT**2 / 1024,) * 2, ratio=(1.0, 1.0), p=0.5))
    return nn.Sequential(*steps)


def pipeline_cases(gen: torch.Generator, jitter: bool) -> dict[str, Fn]:
    j = JIT if jitter else 0.0
    policy = Policy(
        hflip=0.5, translate=SHIFT, cutout=CUT, cutout_p=0.5, brightness=j, contrast=j, saturation=j
    )
    return {
        "visionflow augment_batch": lambda x: ops.augment_batch(x, policy, gen),
        "kornia (RandomCrop pad)": _kornia_to_float(_kornia(jitter)),
        "kornia (RandomAffine translate)": _kornia_to_float(_kornia(jitter, affine=True)),
        "tv v2 per-sample loop": _v2_loop(_v2(jitter)),
        "tv v2 batched (same params, NOT per-sample)": _v2(jitter),
    }


def op_cases(gen: torch.Generator) -> dict[str, dict[str, Fn]]:
    """Single ops on float32 input (kornia's native dtype)."""
    erase = K.RandomErasing(scale=(CUT**2 / 1024,) * 2, ratio=(1.0, 1.0), p=0.5)
    flip = K.RandomHorizontalFlip(p=0.5)
    crop = K.RandomCrop((32, 32), padding=SHIFT, padding_mode="reflect")
    geo = Policy(hflip=0.5, translate=SHIFT, cutout=0)
    return {
        f"hflip p=0.5 + translate {SHIFT}px reflect": {
            "visionflow (flip fused into crop gather)": lambda x: ops.augment_batch(x, geo, gen),
            "kornia flip + visionflow translate": lambda x: ops.translate(flip(x), SHIFT, gen),
            "kornia flip + kornia RandomCrop(padding)": lambda x: crop(flip(x)),
        },
        "hflip p=0.5": {
            "visionflow hflip": lambda x: ops.hflip(x, 0.5, gen),
            "kornia RandomHorizontalFlip": K.RandomHorizontalFlip(p=0.5),
        },
        f"translate {SHIFT}px reflect": {
            "visionflow translate": lambda x: ops.translate(x, SHIFT, gen),
            "kornia RandomCrop(padding)": K.RandomCrop(
                (32, 32), padding=SHIFT, padding_mode="reflect"
            ),
            "kornia RandomAffine(translate)": K.RandomAffine(
                0.0, translate=(SHIFT / 32,) * 2, padding_mode="reflection", p=1.0
            ),
        },
        f"cutout {CUT}px p=0.5": {
            "visionflow cutout": lambda x: ops.cutout(x, CUT, 0.5, gen),
            "kornia RandomErasing": erase,
        },
        f"colour jitter {JIT}/{JIT}/{JIT}": {
            "visionflow color_jitter": lambda x: ops.color_jitter(x, JIT, JIT, JIT, gen),
            "kornia ColorJitter": K.ColorJitter(JIT, JIT, JIT, p=1.0),
        },
    }


def measure(cases: dict[str, Fn], x: Tensor, reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call, candidates interleaved round-robin."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.no_grad():
        for i in range(warmup + reps):
            for name, fn in cases.items():
                sync()
                t0 = time.perf_counter()
                out = fn(x)
                sync()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
                assert out.shape == x.shape and out.dtype == torch.float32, name
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict[str, float]) -> None:
    ref = next(iter(medians.values()))
    print(f"\n### {title}\n")
    print("| candidate | median ms | x slower than visionflow |")
    print("|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.2f} | {ms / ref:.2f} |")


def run_all(device: str = "cpu", batch: int = 512, reps: int = 30, warmup: int = 3,
            seed: int = 0) -> dict:
    """Every table, printed as it is measured; returns {title: {candidate: median ms}}."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=dev).manual_seed(seed)
    x8 = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=dev)
    xf = x8.float() / 255
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    header = (f"device={name} threads={torch.get_num_threads()} batch={batch}x3x32x32 "
              f"reps={reps} warmup={warmup} torch={torch.__version__} "
              f"torchvision={torchvision.__version__} kornia={kornia.__version__}")
    print(header)
    tables: dict[str, dict[str, float]] = {}
    for jitter in (False, True):
        title = "flip + translate + cutout" + (" + colour jitter" if jitter else "")
        title = f"Pipeline: {title} (uint8 in, float32 out)"
        tables[title] = measure(pipeline_cases(gen, jitter), x8, reps, warmup)
        report(title, tables[title])
    for title, cases in op_cases(gen).items():
        title = f"Single op: {title} (float32 in)"
        tables[title] = measure(cases, xf, reps, warmup)
        report(title, tables[title])
    return {"header": header, "tables": tables}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads, 0 = default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_all(args.device, args.batch, args.reps, args.warmup, args.seed)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

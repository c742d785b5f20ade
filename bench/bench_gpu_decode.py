"""GpuBatchTransform on the CPU (issue #18): its two crop ops side by side, and against the
per-sample PIL + torchvision v2 pipeline a DataLoader worker runs. Not a GPU figure: it says
which crop op costs less per image on one CPU thread and what the batched path costs there.

    PYTHONPATH=src python bench/bench_gpu_decode.py [--images 64] [--rounds 7]

Same JPEGs (bench/gpu_scale.make_jpeg, 500x375, ~72 kB), one thread, rounds interleaved,
median ms per batch and img/s.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

HERE = Path(__file__).resolve().parent
for _p in (HERE, HERE.parent / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from gpu_scale import make_jpeg  # noqa: E402

from visionflow.model.gpu_decode import GpuBatchTransform  # noqa: E402


def pil_v2(size: int):
    """What a DataLoader worker does per image: PIL decode, v2 RandomResizedCrop + flip."""
    tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                     v2.PILToTensor()])

    def run(encoded: list[torch.Tensor], epoch: int, step: int) -> torch.Tensor:
        return torch.stack([tf(Image.open(io.BytesIO(e.numpy().tobytes())).convert("RGB"))
                            for e in encoded])

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=224)
    a = ap.parse_args()
    torch.set_num_threads(1)
    encoded = [torch.frombuffer(bytearray(make_jpeg(i, i % 10, 500, 375)), dtype=torch.uint8)
               for i in range(a.images)]
    kb = sum(len(e) for e in encoded) / len(encoded) / 1000
    cpu = torch.device("cpu")

    def gbt(train: bool, crop_op: str = "roi_align") -> GpuBatchTransform:
        return GpuBatchTransform(train=train, size=a.size, resize_size=round(a.size * 8 / 7),
                                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True,
                                 channels=3, device=cpu, seed=0, crop_op=crop_op)

    decoded = gbt(True).decode(encoded)
    roi, interp = gbt(True, "roi_align"), gbt(True, "interpolate")
    cases = {
        "decode only (torchvision.io.decode_image)": lambda e, ep, s: roi.decode(e),
        "crop+resize only, roi_align (same-size group)":
            lambda e, ep, s: roi.crop(decoded, ep, s),
        "crop+resize only, resized_crop per image":
            lambda e, ep, s: interp.crop(decoded, ep, s),
        "GpuBatchTransform train, roi_align": roi,
        "GpuBatchTransform train, interpolate": interp,
        "GpuBatchTransform eval (resize 256, centre crop)": gbt(False),
        "per-sample PIL + v2 RandomResizedCrop + flip": pil_v2(a.size),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn(encoded, 0, 0)
    for r in range(a.rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn(encoded, 0, r + 1)
            times[name].append(time.perf_counter() - t0)
    print(f"{a.images} JPEGs of 500x375 (~{kb:.0f} kB) -> {a.size} px, 1 thread, "
          f"median of {a.rounds} rounds, torch {torch.__version__}")
    print(f"| {'path':48s} | ms/batch | img/s |")
    print(f"|{'-' * 50}|---------:|------:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name:48s} | {med * 1000:8.1f} | {a.images / med:5.0f} |")


if __name__ == "__main__":
    main()

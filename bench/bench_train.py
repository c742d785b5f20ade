"""Training throughput (img/s) of the zoo models, with the augmentation policy on.

Each step = augment_batch on device-resident uint8 data + forward + backward + SGD step,
the same work `train.py` does. Median over timed steps after warm-up; all models measured
in one run, side by side.

    .venv/bin/python bench/bench_train.py --device cpu --models alexnet fast resnet18 \
        densenet_bc --image-size 32 --batch 128 --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from visionflow.model.augment_ops import Policy, augment_batch
from visionflow.model.engine import autocast
from visionflow.model.zoo import create_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(name: str, device: torch.device, size: int, batch: int, steps: int,
               warmup: int, amp: bool) -> list[float]:
    torch.manual_seed(0)
    model = create_model(name, 10, size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    data = torch.randint(0, 256, (batch * 4, 3, size, size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch * 4,), device=device)
    policy = Policy(hflip=0.5, translate=4, cutout=8, cutout_p=0.5)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        idx = torch.randint(0, len(data), (batch,), device=device, generator=gen)
        sync(device)
        t0 = time.perf_counter()
        x = augment_batch(data[idx], policy, gen).contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            loss = F.cross_entropy(model(x).float(), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["alexnet", "fast", "resnet18", "densenet_bc"])
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-amp", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"device={device} threads={torch.get_num_threads()} image={a.image_size} "
          f"batch={a.batch} steps={a.steps} torch={torch.__version__}")
    print(f"{'model':<12} {'median img/s':>12} {'min':>8} {'max':>8}  params")
    for name in a.models:
        t = step_times(name, device, a.image_size, a.batch, a.steps, a.warmup, not a.no_amp)
        rates = [a.batch / s for s in t]
        n = sum(p.numel() for p in create_model(name, 10, a.image_size).parameters())
        print(f"{name:<12} {statistics.median(rates):>12,.0f} {min(rates):>8,.0f} "
              f"{max(rates):>8,.0f}  {n / 1e6:.2f}M", flush=True)


if __name__ == "__main__":
    main()

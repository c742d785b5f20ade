"""Training throughput with the full augmentation policy, against plain PyTorch loops (#3).

Three loops train the same model (default resnet18 with the small-image stem) in one run,
same batch, SGD-Nesterov, label smoothing, channels_last, bf16 autocast on CUDA:

- plain-dataloader: torchvision transforms v2 per sample (RandomCrop with 4 px padding,
  RandomHorizontalFlip, RandomErasing) in a DataLoader with `--workers` processes, pinned
  memory and non-blocking copies: the loop most people write first;
- plain-resident: the uint8 images on the device; per batch, a random flip of each sample
  (torch.where) and one random crop offset for the whole batch: the quick GPU-resident loop;
- visionflow: what the train stage does per step (`augment_ops.augment_batch`: per-sample
  flip, translate, cutout and colour jitter; `mix_batch`: mixup/cutmix) on device-resident
  uint8 data.

The loops take turns (`--block` steps each per round, `--rounds` rounds, after `--warmup`
untimed steps each), so load changes hit all alike; img/s is the median over rounds.

    # GPU (H100): CIFAR-10 train split from an augment cache (`vflow stage augment` output)
    .venv/bin/python bench/bench_throughput.py --cache /tmp/cifar/outputs/augment/cache.pt \
        --device cuda --batch 512 --workers 14 --block 20 --rounds 5 --json /tmp/tput.json
    # CPU smoke run on random images
    .venv/bin/python bench/bench_throughput.py --synthetic 1024 --model fast --batch 64 \
        --workers 1 --block 2 --rounds 3 --warmup 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from visionflow.config import AugmentConfig
from visionflow.model.augment_ops import augment_batch, mix_batch
from visionflow.model.engine import autocast
from visionflow.model.zoo import create_model

FULL_POLICY = AugmentConfig(hflip=0.5, translate=4, cutout=8, cutout_p=0.5, brightness=0.2,
                            contrast=0.2, saturation=0.2, mixup_alpha=0.2, cutmix_alpha=1.0,
                            mix_p=0.5)


class Uint8Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def load_images(a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if a.cache:
        from visionflow.data.cache import load_cache

        cache = load_cache(a.cache)
        return cache["train_x"], cache["train_y"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (a.synthetic, 3, a.image_size, a.image_size), dtype=torch.uint8,
                      generator=g)
    return x, torch.randint(0, 10, (a.synthetic,), generator=g)


def plain_dataloader(x, y, a, device) -> Iterator:
    from torchvision.transforms import v2

    size = x.shape[-1]
    tf = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=0.5)])
    loader = torch.utils.data.DataLoader(
        Uint8Images(x, y, tf), batch_size=a.batch, shuffle=True, drop_last=True,
        num_workers=a.workers, pin_memory=device.type == "cuda",
        persistent_workers=a.workers > 0, prefetch_factor=4 if a.workers > 0 else None)
    for xb, yb in itertools.chain.from_iterable(itertools.repeat(loader)):
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def plain_resident(x, y, a, device) -> Iterator:
    x, y = x.to(device), y.to(device)
    n, size = len(x), x.shape[-1]
    while True:
        idx = torch.randint(0, n, (a.batch,), device=device)
        xb = x[idx].float().div_(255)
        flip = torch.rand(a.batch, 1, 1, 1, device=device) < 0.5
        xb = torch.where(flip, xb.flip(3), xb)
        dx, dy = (int(v) for v in torch.randint(0, 9, (2,)))
        xb = F.pad(xb, (4, 4, 4, 4))[..., dy:dy + size, dx:dx + size]
        yield xb, y[idx]


def visionflow_loop(x, y, a, device) -> Iterator:
    x, y = x.to(device), y.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = len(x)
    while True:
        idx = torch.randint(0, n, (a.batch,), device=device, generator=gen)
        xb = augment_batch(x[idx], FULL_POLICY, gen)
        yield mix_batch(xb, y[idx], 10, FULL_POLICY, gen)


LOOPS = {"plain-dataloader": plain_dataloader, "plain-resident": plain_resident,
         "visionflow": visionflow_loop}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", help="an augment-stage cache.pt (uint8 train images)")
    src.add_argument("--synthetic", type=int, help="N random uint8 images instead")
    ap.add_argument("--image-size", type=int, default=32, help="with --synthetic")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers (plain-dataloader)")
    ap.add_argument("--block", type=int, default=20, help="timed steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (all loops)")
    ap.add_argument("--loops", nargs="+", default=list(LOOPS), choices=list(LOOPS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    device = torch.device(a.device)
    x, y = load_images(a)
    torch.manual_seed(0)
    num_classes = int(y.max()) + 1
    model = create_model(a.model, num_classes, x.shape[-1]).to(device)
    model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if a.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def steps(batches: Iterator, n: int) -> None:
        for _ in range(n):
            xb, target = next(batches)
            xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(device, True):
                logits = step_model(xb)
            loss = F.cross_entropy(logits.float(), target, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    iters = {name: LOOPS[name](x, y, a, device) for name in a.loops}
    for it in iters.values():
        steps(it, a.warmup)
    sync()
    rates: dict[str, list[float]] = {name: [] for name in iters}
    for r in range(a.rounds):
        order = a.loops[r % len(a.loops):] + a.loops[:r % len(a.loops)]  # rotating start
        for name in order:
            sync()
            t0 = time.perf_counter()
            steps(iters[name], a.block)
            sync()
            rates[name].append(a.block * a.batch / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in rates.items()}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{a.model}, {len(x)} images {tuple(x.shape[1:])}, batch {a.batch}, device {dev_name}, "
          f"threads {torch.get_num_threads()}, workers {a.workers}, compile {a.compile}, "
          f"{a.rounds} rounds x {a.block} steps, torch {torch.__version__}")
    print(f"{'loop':<18}{'median img/s':>14}{'min':>10}{'max':>10}")
    for n in iters:
        print(f"{n:<18}{med[n]:>14,.0f}{min(rates[n]):>10,.0f}{max(rates[n]):>10,.0f}")
    if "visionflow" in med:
        for base in ("plain-dataloader", "plain-resident"):
            if base in med:
                print(f"visionflow / {base}: {med['visionflow'] / med[base]:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "device": dev_name, "rates": rates, "median": med}, f,
                      indent=1)


if __name__ == "__main__":
    main()

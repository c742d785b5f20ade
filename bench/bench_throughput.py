"""Training throughput with the full augmentation policy, against plain PyTorch loops (#3, #14).

Three loops train the same architecture (default resnet18 with the small-image stem) in one run,
same batch, SGD-Nesterov, label smoothing, channels_last, bf16 autocast on CUDA:

- plain-dataloader: torchvision transforms v2 per sample (RandomCrop with 4 px padding,
  RandomHorizontalFlip, RandomErasing) in a DataLoader with `--workers` processes, pinned
  memory and non-blocking copies: the loop most people write first;
- plain-resident: the uint8 images on the device; per batch, a random flip of each sample
  (torch.where) and one random crop offset for the whole batch: the quick GPU-resident loop;
- visionflow: the project's training loop itself (`model.fit.FitRun`, what the train stage
  runs): per-sample flip, translate, cutout and colour jitter plus mixup/cutmix on
  device-resident uint8 data, LR schedule and lookahead, no host sync per step.

The loops take turns (`--block` steps each per round, `--rounds` rounds, after `--warmup`
untimed steps each), so load changes hit all alike; img/s is the median over rounds. With
`--compile` every loop's model is `torch.compile`d (compiled during the warm-up).
Needs torch and torchvision only (runs on the GPU machine as it is).

    # GPU: real CIFAR-10 (bench/gpu_bench.sh runs this eager and compiled)
    python3 bench/bench_throughput.py --archive cifar10-jpeg.tar.gz --device cuda --batch 512 \
        --workers 14 --json /tmp/tput.json
    # CPU smoke run on random images
    .venv/bin/python bench/bench_throughput.py --synthetic 1024 --model fast --batch 64 \
        --workers 1 --block 2 --rounds 3 --warmup 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent / "src"):
    if p.is_dir() and str(p) not in sys.path:
        sys.path.insert(0, str(p))

from visionflow.core.presets import load_raw  # noqa: E402  (PyYAML only, as on the GPU)
from visionflow.model.augment_ops import Policy  # noqa: E402
from visionflow.model.engine import autocast  # noqa: E402
from visionflow.model.fit import FitRun, Recipe  # noqa: E402
from visionflow.model.zoo import create_model  # noqa: E402

FULL_POLICY = Policy(hflip=0.5, translate=4, cutout=8, cutout_p=0.5, brightness=0.2,
                     contrast=0.2, saturation=0.2, mixup_alpha=0.2, cutmix_alpha=1.0,
                     mix_p=0.5)
LOOP_NAMES = ("plain-dataloader", "plain-resident", "visionflow")


class Uint8Images(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def _train_step(step_model, opt, device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(xb: torch.Tensor, target: torch.Tensor) -> None:
        xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device, True):
            logits = step_model(xb)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _batches_dataloader(x, y, batch, workers, device) -> Iterator:
    from torchvision.transforms import v2

    size = x.shape[-1]
    tf = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=0.5)])
    loader = torch.utils.data.DataLoader(
        Uint8Images(x, y, tf), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    for xb, yb in itertools.chain.from_iterable(itertools.repeat(loader)):
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def _batches_resident(x, y, batch, device) -> Iterator:
    x, y = x.to(device), y.to(device)
    n, size = len(x), x.shape[-1]
    while True:
        idx = torch.randint(0, n, (batch,), device=device)
        xb = x[idx].float().div_(255)
        flip = torch.rand(batch, 1, 1, 1, device=device) < 0.5
        xb = torch.where(flip, xb.flip(3), xb)
        dx, dy = (int(v) for v in torch.randint(0, 9, (2,)))
        xb = F.pad(xb, (4, 4, 4, 4))[..., dy:dy + size, dx:dx + size]
        yield xb, y[idx]


def _model(name: str, num_classes: int, size: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes, size).to(device).to(
        memory_format=torch.channels_last)


def make_loops(x, y, *, model: str, batch: int, block: int, workers: int, device,
               compile: bool) -> dict[str, Callable[[int], None]]:
    """{name: run(n_steps)} for the three loops, each with its own model and optimizer."""
    num_classes, size = int(y.max()) + 1, x.shape[-1]
    loops: dict[str, Callable[[int], None]] = {}
    for name in ("plain-dataloader", "plain-resident"):
        net = _model(model, num_classes, size, device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)
        step = _train_step(torch.compile(net) if compile else net, opt, device)
        batches = (_batches_dataloader(x, y, batch, workers, device) if name ==
                   "plain-dataloader" else _batches_resident(x, y, batch, device))

        def run(n: int, step=step, batches=batches) -> None:
            for _ in range(n):
                step(*next(batches))
        loops[name] = run
    # the project's loop: one "epoch" of a FitRun is `block` steps over block x batch images
    sub = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:block * batch]
    recipe = Recipe.from_params(
        load_raw(HERE.parent / "params.yaml")["train"], epochs=10**6, batch_size=batch,
        lr=0.01, momentum=0.9, weight_decay=5e-4,
        label_smoothing=0.1, schedule="linear", ema_decay=0.95, ema_every=5, ema_ramp=3.0,
        lookahead=True, compile=compile, warmup_epochs=0.0)
    fit_run = FitRun(_model(model, num_classes, size, device), x[sub].to(device),
                     y[sub].to(device), recipe, FULL_POLICY, num_classes=num_classes,
                     device=device)
    if compile:
        fit_run._warm_up()

    def run_fit(n: int) -> None:
        done = 0
        while done < n:  # whole blocks: n is a multiple of `block` (warm-up included)
            fit_run._epoch(None, time.perf_counter())
            done += fit_run.steps_per_epoch
    loops["visionflow"] = run_fit
    return loops


def measure(x: torch.Tensor, y: torch.Tensor, *, model: str = "resnet18", batch: int = 512,
            block: int = 20, rounds: int = 5, warmup_blocks: int = 1, workers: int = 8,
            device: torch.device | str = "cuda", compile: bool = False,
            loops: tuple[str, ...] = LOOP_NAMES) -> dict:
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs = make_loops(x, y, model=model, batch=batch, block=block, workers=workers,
                      device=device, compile=compile)
    runs = {n: runs[n] for n in loops}
    for run in runs.values():
        run(warmup_blocks * block)
    sync()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotating start
            sync()
            t0 = time.perf_counter()
            runs[name](block)
            sync()
            rates[name].append(block * batch / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in rates.items()}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {"model": model, "images": len(x), "shape": list(x.shape[1:]), "batch": batch,
           "device": dev_name, "compile": compile, "workers": workers, "rounds": rounds,
           "block": block, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "rates": rates, "median": med}
    if "visionflow" in med:
        out["ratios"] = {f"visionflow/{b}": med["visionflow"] / med[b] for b in med
                         if b != "visionflow"}
    return out


def report(res: dict) -> None:
    print(f"{res['model']}, {res['images']} images {tuple(res['shape'])}, batch {res['batch']}, "
          f"device {res['device']}, workers {res['workers']}, compile {res['compile']}, "
          f"{res['rounds']} rounds x {res['block']} steps, torch {res['torch']}")
    print(f"{'loop':<18}{'median img/s':>14}{'min':>10}{'max':>10}")
    for n, v in res["rates"].items():
        print(f"{n:<18}{res['median'][n]:>14,.0f}{min(v):>10,.0f}{max(v):>10,.0f}")
    for k, v in res.get("ratios", {}).items():
        print(f"{k}: {v:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--archive", help="the CIFAR-10 JPEG archive (train split is used)")
    src.add_argument("--synthetic", type=int, help="N random uint8 images instead")
    ap.add_argument("--image-size", type=int, default=32, help="with --synthetic")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--workers", type=int, default=8, help="DataLoader workers (plain-dataloader)")
    ap.add_argument("--block", type=int, default=20, help="timed steps per loop per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup-blocks", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (all loops)")
    ap.add_argument("--loops", nargs="+", default=list(LOOP_NAMES), choices=LOOP_NAMES)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.archive:
        from cifar_data import load_cifar

        data = load_cifar(a.archive)
        x, y = data["train_x"], data["train_y"]
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (a.synthetic, 3, a.image_size, a.image_size),
                          dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (a.synthetic,), generator=g)
    res = measure(x, y, model=a.model, batch=a.batch, block=a.block, rounds=a.rounds,
                  warmup_blocks=a.warmup_blocks, workers=a.workers, device=a.device,
                  compile=a.compile, loops=tuple(a.loops))
    report(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

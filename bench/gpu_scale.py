"""Issue #18's GPU figure: ResNet-50 at 224 px fed by GPU-decoded JPEGs, side by side with the
compute bound and a DataLoader (step 6 of `bench/gpu_bench.sh`, or alone:
`python bench/gpu_scale.py --out OUT [--dry-run]`).

Generated photos (about 500x375, ~72 kB JPEGs, 10 classes, written in parallel on all cores
into `--data`, reused when already there), then the same model, SGD, bf16 autocast,
channels_last and batch, eager, in one run:

  a  synthetic uint8 batches already on the GPU: the compute bound;
  b  encoded bytes from `encoded_source` -> `GpuBatchTransform` (nvJPEG decode,
     RandomResizedCrop + flip on the GPU) in a background thread on its own CUDA stream;
  c  torchvision `ImageFolder` + `DataLoader` (PIL decode, RandomResizedCrop, flip) on all
     cores but one, pinned memory;
  diagnostics: b's input path alone (no training), b with one `resized_crop` per image
  instead of `roi_align`, and b decoding on the CPU in threads (all cores but one) with the
  crops still on the GPU (the design to fall back on if nvJPEG does not keep up).

Each: warm-up steps (cuDNN autotuning, worker start, filled prefetch queues), then timed
blocks; img/s is the median over blocks; ratios b/a (target >= 0.9) and b/c (target >= 1.3).
Needs torch, torchvision, numpy and Pillow only (what the GPU machine has), plus
`visionflow.model.gpu_decode` from src/ (torch-only). `--dry-run`: CPU, tiny images, ResNet-18,
a few steps, under a minute.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from visionflow.model.gpu_decode import GpuBatchTransform  # noqa: E402

MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FULL = {"images": 20_000, "width": 500, "height": 375, "size": 224, "batch": 256,
        "model": "resnet50", "warmup": 15, "steps": 90, "blocks": 3}
DRY = {"images": 48, "width": 64, "height": 48, "size": 32, "batch": 8,
       "model": "resnet18", "warmup": 1, "steps": 2, "blocks": 2}


def log(msg: str) -> None:
    print(f"[gpu_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- data -----------------------------------------------------------------------------------

def make_jpeg(seed: int, label: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth colour fields at three scales plus grain (~72 kB at
    500x375, quality 90), tinted by class."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 32, np.int16)
    for cells in (4, 16, 64):
        small = rng.integers(0, 256, (max(2, cells * height // width), cells, 3), np.uint8)
        img += np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC),
                          np.int16) // 4
    img += rng.integers(-17, 18, (height, width, 3), dtype=np.int16)
    img[..., label % 3] += 10 * (label % 4)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_chunk(job: tuple[str, int, int, int, int, int]) -> int:
    root, start, stop, classes, width, height = job
    total = 0
    for i in range(start, stop):
        data = make_jpeg(i, i % classes, width, height)
        path = Path(root) / f"c{i % classes}" / f"{i:06d}.jpg"
        path.write_bytes(data)
        total += len(data)
    return total


def generate(root: Path, n: int, width: int, height: int, classes: int = 10,
             workers: int | None = None) -> dict:
    """n JPEGs in root/c<k>/ (ImageFolder layout), in parallel (spawned processes: safe once
    CUDA is up); reused when root holds the same set already."""
    spec = {"images": n, "width": width, "height": height, "classes": classes}
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()).get("spec") == spec:
        return json.loads(done.read_text()) | {"reused": True, "seconds": 0.0}
    t0 = time.perf_counter()
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    chunk = max(1, n // (workers * 8))
    jobs = [(str(root), s, min(n, s + chunk), classes, width, height) for s in range(0, n, chunk)]
    if workers <= 1:
        total = sum(map(_write_chunk, jobs))
    else:
        with mp.get_context("spawn").Pool(workers) as pool:
            total = sum(pool.imap_unordered(_write_chunk, jobs))
    info = {"spec": spec, "mean_kb": round(total / n / 1000, 1), "workers": workers,
            "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info))
    return info | {"reused": False}


def list_items(root: Path) -> list[tuple[str, int]]:
    return [(str(p), int(p.parent.name[1:])) for p in sorted(root.glob("c*/*.jpg"))]


def encoded_source(items: list[tuple[str, int]], batch_size: int, seed: int,
                   prefetch: int = 6) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """THE source of encoded bytes: endless shuffled epochs of (list of 1-D uint8 CPU tensors,
    int64 labels), read by a background thread `prefetch` batches ahead. Here: JPEG files;
    the integrator points this one function at the shard reader."""
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def read() -> None:
        epoch = 0
        while not stop.is_set():
            order = torch.randperm(len(items), generator=torch.Generator().manual_seed(
                seed * 100_003 + epoch)).tolist()
            for s in range(0, len(order) - batch_size + 1, batch_size):
                batch = [items[i] for i in order[s:s + batch_size]]
                encoded = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8)
                           for p, _ in batch]
                labels = torch.tensor([y for _, y in batch])
                while not stop.is_set():
                    try:
                        q.put((encoded, labels), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            epoch += 1

    reader = threading.Thread(target=_reporting(read, q), daemon=True, name="encoded_source")
    reader.start()
    try:
        while True:
            yield _take(q)
    finally:
        _stop(stop, reader)


def _stop(stop: threading.Event, thread: threading.Thread, timeout: float = 60.0) -> None:
    """Stop a producer thread and wait for it: a thread still inside a torch op when the
    interpreter exits aborts the process ("terminate called without an active exception")."""
    stop.set()
    if thread is not threading.current_thread():
        thread.join(timeout)


def _reporting(target: Callable[[], None], q: queue.Queue) -> Callable[[], None]:
    """A thread body that hands its exception to the consumer instead of dying silently."""
    def run() -> None:
        try:
            target()
        except BaseException as err:  # noqa: BLE001 - re-raised by _take in the consumer
            q.put(err)
    return run


def _take(q: queue.Queue, timeout: float = 300.0):
    """The next item; a producer's exception raised here; a stall is an error, not a hang."""
    try:
        item = q.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError(f"no batch from the input thread in {timeout:.0f} s") from None
    if isinstance(item, BaseException):
        raise item
    return item


def gpu_batches(source: Iterator, transform: GpuBatchTransform, device: torch.device,
                depth: int = 3) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Decode + crop in a background thread (on its own CUDA stream), `depth` batches ahead;
    closing this generator stops the thread and the source."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cuda = device.type == "cuda"

    def produce() -> None:
        with torch.cuda.stream(torch.cuda.Stream(device)) if cuda else nullcontext():
            for step, (encoded, labels) in enumerate(source):
                x = transform(encoded, epoch=0, step=step)
                y = labels.to(device, non_blocking=True)
                event = torch.cuda.Event() if cuda else None
                if event is not None:
                    event.record()  # on the side stream
                while not stop.is_set():
                    try:
                        q.put((x, y, event), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
        if hasattr(source, "close"):  # a generator: stops its reader thread
            source.close()

    producer = threading.Thread(target=_reporting(produce, q), daemon=True, name="gpu_batches")
    producer.start()
    try:
        while True:
            x, y, event = _take(q)
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                x.record_stream(current)
                y.record_stream(current)
            yield x, y
    finally:
        _stop(stop, producer)


def loader_batches(root: Path, size: int, batch: int, workers: int, device: torch.device,
                   total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The plain torchvision loop: ImageFolder + PIL + RandomResizedCrop + flip in workers."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                     v2.PILToTensor()])
    ds = ImageFolder(str(root), transform=tf)
    loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, num_samples=total),
                        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def synthetic_batches(size: int, batch: int, device: torch.device,
                      n: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
             .to(device), torch.randint(0, 10, (batch,), generator=g).to(device))
            for _ in range(n)]
    while True:
        yield from data


def check_against_cpu(items: list[tuple[str, int]], size: int, device: torch.device,
                      n: int = 64) -> dict:
    """One eval batch through b's path (nvJPEG, side stream, thread) against the CPU decoder:
    a fast pipeline that returns garbage would show here, not in img/s."""
    source = encoded_source(items, min(n, len(items)), seed=9)
    encoded, labels = next(source)
    source.close()
    kw = {"train": False, "size": size, "resize_size": round(size * 8 / 7), "scale": (0.08, 1.0),
          "ratio": (3 / 4, 4 / 3), "hflip": False, "channels": 3, "seed": 0}
    batches = gpu_batches(iter([(encoded, labels)]), GpuBatchTransform(device=device, **kw),
                          device)
    x, _ = next(batches)
    batches.close()
    ref = GpuBatchTransform(device=torch.device("cpu"), **kw)(encoded, 0, 0)
    diff = (x.cpu().float() - ref.float()).abs().mean().item()
    return {"images": len(encoded), "mean_abs_diff": round(diff, 3), "ok": diff < 2.0}


# --- training and timing --------------------------------------------------------------------

def make_step(name: str, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], None]:
    import torchvision

    model = getattr(torchvision.models, name)(num_classes=10).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-5)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        x = ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(batches: Iterator, step: Callable | None, batch: int, warmup: int, steps: int,
            blocks: int, device: torch.device) -> dict:
    """img/s per timed block after `warmup` steps; step=None times the input alone."""
    for _ in range(warmup):
        x, y = next(batches)
        if step is not None:
            step(x, y)
    _sync(device)
    rates = []
    per = max(1, steps // blocks)
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per):
            x, y = next(batches)
            if step is not None:
                step(x, y)
        _sync(device)
        rates.append(per * batch / (time.perf_counter() - t0))
    return {"img_per_s": round(statistics.median(rates), 1),
            "blocks": [round(r, 1) for r in rates], "steps_per_block": per}


def run_scale(data_dir: Path, device: torch.device, dry_run: bool, deadline: float,
              write: Callable[[dict], None], workers: int | None = None) -> dict:
    cfg = dict(DRY if dry_run else FULL)
    cpus = os.cpu_count() or 2
    workers = workers if workers is not None else (1 if dry_run else max(1, cpus - 1))
    res: dict = {"config": cfg | {"device": str(device), "loader_workers": workers,
                                  "bf16": True, "channels_last": True, "optimizer": "SGD",
                                  "compile": False},
                 "targets": {"b/a": 0.9, "b/c": 1.3}}
    log(f"generating {cfg['images']} JPEGs of {cfg['width']}x{cfg['height']} in {data_dir}")
    res["generate"] = generate(data_dir, cfg["images"], cfg["width"], cfg["height"],
                               workers=1 if dry_run else None)
    log(f"generated: {res['generate']}")
    write(res)
    items = list_items(data_dir)
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if dry_run:
        torch.set_num_threads(1)  # a busy shared CPU: one thread, no spinning
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        _measure_all(res, cfg, items, data_dir, workers, device, deadline, write)
    finally:  # gpu_bench.py runs other steps in this process after this one
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = autotune
    log(f"ratios {res.get('ratios')} (targets b/a >= 0.9, b/c >= 1.3)")
    return res


def _measure_all(res: dict, cfg: dict, items: list, data_dir: Path, workers: int,
                 device: torch.device, deadline: float, write: Callable[[dict], None]) -> None:
    size, batch = cfg["size"], cfg["batch"]
    total_steps = cfg["warmup"] + cfg["steps"] + cfg["blocks"]
    kw = {"batch": batch, "warmup": cfg["warmup"], "steps": cfg["steps"],
          "blocks": cfg["blocks"], "device": device}

    def transform(crop_op: str, **kw) -> GpuBatchTransform:
        return GpuBatchTransform(train=True, size=size, resize_size=size, scale=(0.08, 1.0),
                                 ratio=(3 / 4, 4 / 3), hflip=True, channels=3, device=device,
                                 seed=0, crop_op=crop_op, **kw)

    res["b_matches_cpu"] = check_against_cpu(items, size, device)
    log(f"b's eval batch against the CPU decoder: {res['b_matches_cpu']}")
    step = make_step(cfg["model"], device)
    gpu_tf = transform("roi_align")
    runs: list[tuple[str, Callable[[], Iterator], bool]] = [
        ("a_synthetic", lambda: synthetic_batches(size, batch, device), True),
        ("b_gpu_decode", lambda: gpu_batches(encoded_source(items, batch, 0), gpu_tf, device),
         True),
        ("c_dataloader", lambda: loader_batches(data_dir, size, batch, workers, device,
                                                total_steps * batch * 2), True),
        # diagnostics: the GPU input path alone, and with one resized_crop per image
        ("b_input_only", lambda: gpu_batches(encoded_source(items, batch, 1),
                                             transform("roi_align"), device), False),
        ("b_interpolate", lambda: gpu_batches(encoded_source(items, batch, 2),
                                              transform("interpolate"), device), True),
        # the fallback design: libjpeg-turbo in threads on all cores but one, crops on the GPU
        ("b_cpu_threads", lambda: gpu_batches(encoded_source(items, batch, 3), transform(
            "roi_align", nvjpeg=False, decode_threads=workers), device), True),
    ]
    for name, make_batches, train in runs:
        if time.perf_counter() > deadline:
            res[name] = {"skipped": "budget spent"}
            log(f"{name}: skipped, budget spent")
            continue
        t0 = time.perf_counter()
        batches = make_batches()
        res[name] = measure(batches, step if train else None, **kw)
        batches.close()  # stops its threads or DataLoader workers
        res[name]["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {res[name]['img_per_s']} img/s {res[name]['blocks']}")
        a, b, c = (res.get(k, {}).get("img_per_s") for k in
                   ("a_synthetic", "b_gpu_decode", "c_dataloader"))
        res["ratios"] = {"b/a": round(b / a, 3) if a and b else None,
                         "b/c": round(b / c, 3) if b and c else None}
        res["b_cpu_decoded_images"] = gpu_tf.cpu_decoded
        write(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="/tmp/vflow-gpu-scale", help="generated JPEGs")
    ap.add_argument("--budget", type=float, default=300, help="seconds for the whole step")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny images, a few steps")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    data = Path(a.data) / ("dry" if a.dry_run else "full")

    def write(res: dict) -> None:
        tmp = out / ".6_scale.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, out / "6_scale.json")

    run_scale(data, device, a.dry_run, time.perf_counter() + a.budget, write)


if __name__ == "__main__":
    main()

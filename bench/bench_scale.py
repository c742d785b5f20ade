"""Issue #18: photos at scale from shards on the CPU: memory flat in N, packing and training.

Generated ~500×375 JPEGs in 10 classes (in /tmp) at two sizes (default 10,000 and 40,000):
- packing img/s (`data.shards.pack_split`, the pack stage's code, all cores);
- packing's and train's peak memory at each size, each in a fresh process: packing the split;
  the same bounded number of steps of `FitRun` streaming the shards (`data.stream.ShardStream`,
  RandomResizedCrop + flip at 224 px in DataLoader workers). Peak RSS is the kernel's
  high-water mark of the process (`VmHWM`: anonymous plus mapped file pages, all of its life),
  read from /proc at the end, and for the DataLoader workers sampled every 20 ms; `RssAnon`
  (what the process allocated itself) is sampled too. Not `ru_maxrss`: a process started by
  `subprocess` inherits its launcher's high-water mark there (the kernel keeps it across
  exec), so it would report the bench's own memory;
- CPU training img/s at 224 px side by side (round-robin, medians) with a plain torchvision
  `ImageFolder` + `DataLoader` loop over the same JPEGs: same model, batch, steps, workers and
  transforms (RandomResizedCrop + flip), the same optimizer step.

    .venv/bin/python bench/bench_scale.py --sizes 10000 40000 --steps 30 --rounds 2
    .venv/bin/python bench/bench_scale.py --decode-only   # the input paths alone, ms/image

The JPEGs: 400 distinct generated photos; every file is one of them with its own JPEG comment
segment, so all bytes differ while generation stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path("/tmp/bench_scale")
CLASSES = [f"c{i}" for i in range(10)]
BASES = 400


def _base(i: int) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(i)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), dtype=np.int16)
    img = (img + rng.integers(-25, 25, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(args: tuple[int, int, str, list[bytes]]) -> None:
    start, stop, root, bases = args
    for i in range(start, stop):
        data = bases[i % len(bases)]
        note = f"vflow bench {i}".encode()
        com = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note  # a comment segment
        path = Path(root) / "train" / CLASSES[i % 10] / f"{i:06d}.jpg"
        path.write_bytes(data[:2] + com + data[2:])


def make_photos(n: int) -> Path:
    root = ROOT / f"photos{n}"
    if (root / "done").is_file():
        return root
    for c in CLASSES:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        bases = list(pool.map(_base, range(BASES)))
        step = 2000
        list(pool.map(_write, [(s, min(n, s + step), str(root), bases)
                               for s in range(0, n, step)]))
    (root / "done").write_text("ok")
    return root


def rows_of(root: Path) -> list[dict]:
    rows = []
    for c in CLASSES:
        for p in sorted((root / "train" / c).iterdir()):
            rows.append({"path": f"train/{c}/{p.name}", "label": c, "format": "JPEG",
                         "mode": "RGB", "width": 500, "height": 375,
                         "sha256": hashlib.sha256(p.name.encode()).hexdigest()})
    return rows


def pack(root: Path) -> tuple[Path, float]:
    from visionflow.data.shards import pack_split

    out = ROOT / f"shards{root.name.removeprefix('photos')}"
    shutil.rmtree(out, ignore_errors=True)  # packed afresh (packing is incremental)
    rows = rows_of(root)
    t = time.perf_counter()
    pack_split(rows, root, out, CLASSES, max_side=1024, channels=3, shard_bytes=64 << 20)
    return out, len(rows) / (time.perf_counter() - t)


# --- one training run in a fresh process ---------------------------------------------------
class MemoryPeaks:
    """Peak RssAnon / RssFile (MB) of this process and, summed, of its children, sampled."""

    def __init__(self, every: float = 0.02) -> None:
        import threading

        self.every, self.peak = every, dict.fromkeys(
            ("main_anon_mb", "main_file_mb", "workers_anon_mb", "workers_file_mb",
             "workers_hwm_mb"), 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status(pid: int | str) -> tuple[float, float, float]:
        """RssAnon, RssFile and VmHWM of a process, MB."""
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0.0, 0.0, 0.0
        kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines()
              if ln.startswith(("RssAnon", "RssFile", "VmHWM"))}
        return kb.get("RssAnon", 0) / 1024, kb.get("RssFile", 0) / 1024, kb.get("VmHWM", 0) / 1024

    def _children(self) -> list[str]:
        out = []
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                out += (task / "children").read_text().split()
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, file, _ = self._status("self")
            kids = [self._status(pid) for pid in self._children()]
            for key, value in (("main_anon_mb", anon), ("main_file_mb", file),
                               ("workers_anon_mb", sum(k[0] for k in kids)),
                               ("workers_file_mb", sum(k[1] for k in kids)),
                               ("workers_hwm_mb", sum(k[2] for k in kids))):
                self.peak[key] = max(self.peak[key], value)
            time.sleep(self.every)

    def __enter__(self) -> MemoryPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak["main_hwm_mb"] = self._status("self")[2]


def pack_child(photos: str) -> None:
    with MemoryPeaks() as peaks:
        _, rate = pack(Path(photos))
    print(json.dumps({"pack_img_s": rate, **{k: round(v) for k, v in peaks.peak.items()}}))


def train_child(kind: str, data: str, steps: int, batch: int, workers: int, model: str) -> None:
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2

    from visionflow.core.config import TrainConfig
    from visionflow.data.stream import ShardStream, View
    from visionflow.model.augment_ops import Policy
    from visionflow.model.classifier import Arch, build_classifier
    from visionflow.model.fit import FitRun, Recipe

    peaks = MemoryPeaks().__enter__()
    torch.manual_seed(0)
    model_ = build_classifier(Arch(model, 10, 224, 3))
    recipe = Recipe.from_params(
        TrainConfig(), epochs=1, batch_size=batch, lr=0.05, amp=False, channels_last=True,
        log_every=10**9, label_smoothing=0.0, schedule="cosine", warmup_epochs=0.0)
    if kind == "shards":
        stream = ShardStream(Path(data), "train", View(224, 256, train=True, hflip=0.5),
                             batch_size=batch, workers=workers, seed=0)
        run = FitRun(model_, torch.zeros(1, 3, 224, 224, dtype=torch.uint8),
                     torch.zeros(1, dtype=torch.long), recipe, Policy(), num_classes=10,
                     device="cpu", stream=stream, whiten=False)
        run.total = steps
        t0 = time.perf_counter()
        run.run()
    else:  # the plain loop: ImageFolder + DataLoader + the same transforms and step
        tf = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(224, antialias=True),
                         v2.RandomHorizontalFlip(0.5)])
        ds = datasets.ImageFolder(str(Path(data) / "train"), transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True,
                                             num_workers=workers, drop_last=True)
        opt = torch.optim.SGD(model_.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i == steps:
                break
            x = x.float().div_(255).contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(model_(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    dt = time.perf_counter() - t0
    peaks.__exit__()
    print(json.dumps({
        "img_s": steps * batch / dt, **{k: round(v) for k, v in peaks.peak.items()}}))


def decode_costs(reps: int = 300, passes: int = 2) -> dict[str, list[float]]:
    """ms per image of the two input paths alone (1 thread, one generated 500×375 JPEG):
    the stream's (`decode_image` of the bytes, transforms v2 on the uint8 tensor) and
    `ImageFolder`'s (PIL decode, `PILToTensor`, the same transforms)."""
    import io

    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from visionflow.data.stream import View, decode

    torch.set_num_threads(1)
    data = _base(0)
    crop = View(224, 256, train=True, hflip=0.5).transform()
    plain = v2.Compose([v2.PILToTensor(), crop])

    def stream() -> None:
        crop(decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), 3))

    def imagefolder() -> None:
        plain(Image.open(io.BytesIO(data)).convert("RGB"))

    out: dict[str, list[float]] = {"stream": [], "imagefolder": []}
    for _ in range(passes):
        for name, fn in (("stream", stream), ("imagefolder", imagefolder)):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            out[name].append(round((time.perf_counter() - t) / reps * 1e3, 2))
    return out


def _child(*args: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def train(kind: str, data: Path, a) -> dict:
    return _child("--child", kind, str(data), str(a.steps), str(a.batch), str(a.workers),
                  a.model, threads=a.threads)


def main() -> None:
    if sys.argv[1:2] == ["--pack-child"]:
        return pack_child(sys.argv[2])
    if sys.argv[1:2] == ["--child"]:
        kind, data, steps, batch, workers, model = sys.argv[2:8]
        return train_child(kind, data, int(steps), int(batch), int(workers), model)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--decode-only", action="store_true", help="the input paths' ms/image")
    a = ap.parse_args()
    if a.decode_only:
        return print(json.dumps(decode_costs()))
    res: dict = {"args": vars(a), "sizes": {}}
    for n in a.sizes:
        t = time.perf_counter()
        photos = make_photos(n)
        gen_s = round(time.perf_counter() - t)
        packed = _child("--pack-child", str(photos), threads=a.threads)
        shards = ROOT / f"shards{n}"
        res["sizes"][n] = {"generate_s": gen_s, "pack": packed,
                           "train": [train("shards", shards, a)]}
        print(n, res["sizes"][n], flush=True)
    small = min(a.sizes)
    photos, shards = ROOT / f"photos{small}", ROOT / f"shards{small}"
    rates: dict[str, list[float]] = {"shards": [], "imagefolder": []}
    for _ in range(a.rounds):  # round-robin, side by side
        rates["shards"].append(train("shards", shards, a)["img_s"])
        rates["imagefolder"].append(train("imagefolder", photos, a)["img_s"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    res["train_img_s"] = {k: [round(x, 2) for x in v] for k, v in rates.items()}
    res["ratio_shards_vs_imagefolder"] = round(med["shards"] / med["imagefolder"], 3)
    for key in ("main_hwm_mb", "main_anon_mb", "workers_hwm_mb", "workers_anon_mb"):
        for what in ("train", "pack"):
            peaks = {n: (r["train"][0] if what == "train" else r["pack"])[key]
                     for n, r in res["sizes"].items()}
            res[f"growth_{what}_{key}"] = round(peaks[max(a.sizes)] / max(peaks[small], 1) - 1,
                                                 4)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

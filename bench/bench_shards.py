"""Issue #18: which streaming-dataset library holds the shards? A short side by side.

LitData vs MosaicML Streaming vs WebDataset on the same generated ~500x375 JPEGs (in /tmp):
write speed (img/s), read throughput with 2 DataLoader workers (bytes read + JPEG decoded, img/s,
median of the passes, libraries round-robin), and whether a loader state taken mid-epoch resumes
at the next sample (checked, not read from docs). The other columns of BENCHMARKS.md (DDP
sharding, S3 custom endpoint, cache cap) come from each library's API.

    PYTHONPATH=/tmp/benchlibs:/tmp/benchstub .venv/bin/python bench/bench_shards.py --images 2000

/tmp/benchlibs holds the three libraries (`pip install --target`); MosaicML Streaming imports
`transformers` at import time (numpy < 2.2 pinned too), so /tmp/benchstub holds three empty
transformers modules for that import only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import decode_image

ROOT = Path("/tmp/bench_shards")


def _make(args: tuple[int, str]) -> None:
    i, out = args
    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)  # smooth photo-like gradients
    img = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (375, 500, 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(f"{out}/{i:06d}.jpg", quality=90)


def make_images(n: int) -> list[Path]:
    src = ROOT / "jpg"
    if not src.exists() or len(list(src.iterdir())) != n:
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_make, [(i, str(src)) for i in range(n)], chunksize=64))
    return sorted(src.iterdir())


def _sample(path: str) -> dict:
    return {"image": Path(path).read_bytes(), "label": int(Path(path).stem) % 10}


# --- writers -----------------------------------------------------------------------------------
def write_litdata(paths: list[Path], out: Path) -> None:
    from litdata.streaming.writer import BinaryWriter

    out.mkdir(parents=True)
    w = BinaryWriter(str(out), chunk_bytes=16 << 20)  # in-process, as the pack stage does
    for i, p in enumerate(paths):
        w[i] = _sample(str(p))
    w.done()
    w.merge()


def write_mds(paths: list[Path], out: Path) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"image": "bytes", "label": "int"},
                   size_limit=16 << 20) as w:
        for p in paths:
            w.write(_sample(str(p)))


def write_wds(paths: list[Path], out: Path) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxsize=16 << 20, verbose=0) as w:
        for p in paths:
            s = _sample(str(p))
            w.write({"__key__": p.stem, "jpg": s["image"], "cls": s["label"]})


# --- readers: (loader factory, whether a mid-epoch state resumes) --------------------------------
def _decode_ld(sample: dict) -> tuple[torch.Tensor, int]:
    data = torch.frombuffer(bytearray(sample["image"]), dtype=torch.uint8)
    return decode_image(data), sample["label"]


def loader_litdata(out: Path, workers: int, batch: int):
    from litdata import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(str(out), shuffle=True, seed=0, transform=_decode_ld)
    return StreamingDataLoader(ds, batch_size=batch, num_workers=workers)


try:  # a module-level class: the spawned DataLoader workers unpickle it
    from streaming import StreamingDataset as _MdsDataset

    class MdsDecoded(_MdsDataset):
        def __getitem__(self, i):  # type: ignore[override]
            return _decode_ld(super().__getitem__(i))
except ImportError:
    MdsDecoded = None  # type: ignore[assignment,misc]


def loader_mds(out: Path, workers: int, batch: int):
    from streaming import StreamingDataLoader

    ds = MdsDecoded(local=str(out), shuffle=True, shuffle_seed=0, batch_size=batch)
    return StreamingDataLoader(ds, batch_size=batch, num_workers=workers)


def _decode_wds(sample: tuple[bytes, bytes]) -> tuple[torch.Tensor, int]:
    img, cls = sample
    return decode_image(torch.frombuffer(bytearray(img), dtype=torch.uint8)), int(cls)


def loader_wds(out: Path, workers: int, batch: int):
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("*.tar"))
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
          .shuffle(500).to_tuple("jpg", "cls").map(_decode_wds).batched(batch))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


def epoch(loader) -> tuple[int, float, float]:
    """Images, steady img/s (from the first batch on: worker start-up excluded), start-up s."""
    t0 = time.perf_counter()
    n, t1, first = 0, 0.0, 0
    for x, _ in loader:
        if not n:
            t1, first = time.perf_counter(), len(x)
        n += len(x)
    return n, (n - first) / (time.perf_counter() - t1), t1 - t0


def resumes(make, out: Path, batch: int) -> str:
    """Take the loader's state after 3 batches; does a new loader continue at batch 4?"""
    first = make(out, 0, batch)
    if not hasattr(first, "state_dict"):
        return "no loader state"
    it, labels = iter(first), []
    for _ in range(4):
        labels.append(next(it)[1].tolist())
    state = None
    first = make(out, 0, batch)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    second = make(out, 0, batch)
    second.load_state_dict(state)
    resumed = next(iter(second))[1].tolist()
    return "yes (batch 4 exact)" if resumed == labels[3] else "state loads, order differs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    paths = make_images(args.images)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{len(paths)} JPEGs, {mb:.0f} MB, made in {time.perf_counter() - t:.1f} s")
    libs = {"litdata": (write_litdata, loader_litdata),
            "mosaicml-streaming": (write_mds, loader_mds),
            "webdataset": (write_wds, loader_wds)}
    res: dict[str, dict] = {}
    for name, (write, _) in libs.items():
        out = ROOT / name
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        write(paths, out)
        dt = time.perf_counter() - t
        files = [f for f in out.rglob("*") if f.is_file()]
        res[name] = {"write_img_s": round(len(paths) / dt), "files": len(files),
                     "bytes_ratio": round(sum(f.stat().st_size for f in files) / mb / 1e6, 3),
                     "read": []}
    for _ in range(args.passes):  # round-robin
        for name, (_, make) in libs.items():
            n, rate, startup = epoch(make(ROOT / name, args.workers, args.batch))
            assert n == len(paths), (name, n)
            res[name]["read"].append(rate)
            res[name].setdefault("startup", []).append(startup)
    for name, (_, make) in libs.items():
        res[name]["read_img_s"] = round(statistics.median(res[name].pop("read")))
        res[name]["startup_s"] = round(statistics.median(res[name].pop("startup")), 2)
        res[name]["mid_epoch_resume"] = resumes(make, ROOT / name, args.batch)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

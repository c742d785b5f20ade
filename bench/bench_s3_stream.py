"""Training epochs streamed from S3 through a capped cache, with and without LitData's
shared chunk-slot counter (`data.remote_shards.size_bound_cache`).

A real S3 server (`rclone serve s3`, the stack's object store) holds one split packed by the
pack stage's code (`data.shards.pack_split`) into 1 MiB shards; each epoch runs in a fresh
process (two DataLoader workers, RandomResizedCrop + flip, the cache capped at `--cap-mib`,
smaller than the split), alternating the two variants round by round. Per epoch: seconds and
the cache folder's peak size (sampled every 5 ms). An epoch over 10 s counts as a stall (a
whole epoch takes about a second here).

    .venv/bin/python bench/bench_s3_stream.py --rounds 6 --per-class 300
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
import tempfile
import threading
import time
from pathlib import Path

KEYS = ("benchkey", "benchsecret")
STALL_S = 10.0


def photos(root: Path, n: int) -> list[dict]:
    """`n` 320×240 noise JPEGs a class, two classes: rows as the manifest has them."""
    import numpy as np
    from PIL import Image

    rows = []
    for ci, name in enumerate(("ants", "bees")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            px = np.random.default_rng(ci * 100_000 + i).integers(0, 256, (240, 320, 3),
                                                                  dtype=np.uint8)
            px[..., ci] = px[..., ci] // 2 + 128  # the class shows in one channel
            path = root / name / f"{i:04d}.jpg"
            Image.fromarray(px).save(path, quality=95)
            rows.append({"path": f"{name}/{path.name}", "label": name,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return rows


def epoch(split_dir: Path, url: str, cache: Path, cap: int, gate: bool) -> dict:
    """One epoch in this process; the counter left on (`gate`) or taken off as visionflow does."""
    from litdata.streaming.reader import PrepareChunksThread

    original = PrepareChunksThread._slot_budget_enabled
    from visionflow.data.remote_shards import RemoteSplit
    from visionflow.data.stream import ShardStream, View

    if gate:
        PrepareChunksThread._slot_budget_enabled = original
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            size = 0
            for dirpath, _, names in os.walk(cache):
                for n in names:
                    with contextlib.suppress(OSError):  # evicted meanwhile
                        size += os.stat(os.path.join(dirpath, n)).st_size
            peak[0] = max(peak[0], size)
            time.sleep(0.005)

    view = View(32, 36, 3, train=True, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3),
                hflip=0.5)
    stream = ShardStream(split_dir, "train", view, batch_size=16, workers=2, seed=0,
                         remote=RemoteSplit(url, cache, cap))
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0, n = time.perf_counter(), 0
    for _, y in stream.epoch():
        n += len(y)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    return {"seconds": seconds, "images": n, "peak_bytes": peak[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=300)  # 35 shards of 1 MiB
    ap.add_argument("--cap-mib", type=int, default=16)
    ap.add_argument("--child", nargs=4, metavar=("SPLIT", "URL", "CACHE", "GATE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    cap = args.cap_mib * 2**20
    if args.child:
        split, url, cache, gate = args.child
        print(json.dumps(epoch(Path(split), url, Path(cache), cap, gate == "on")))
        return

    from visionflow.data.remote_shards import upload_split
    from visionflow.data.shards import pack_split
    from visionflow.orchestration.servers import free_port
    from visionflow.stack import objectstore

    work = Path(tempfile.mkdtemp(prefix="vf-s3bench-"))
    port = free_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": objectstore.endpoint("127.0.0.1", port),
           "AWS_ACCESS_KEY_ID": KEYS[0], "AWS_SECRET_ACCESS_KEY": KEYS[1],
           "AWS_REGION": "us-east-1"}
    (work / "s3" / "shards").mkdir(parents=True)
    server = subprocess.Popen(objectstore.command(work / "s3", "127.0.0.1", port),
                              env={**os.environ, **objectstore.server_env(*KEYS)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rows = photos(work / "photos", args.per_class)
        split_dir = work / "shards" / "train"
        pack_split(rows, work / "photos", split_dir, ["ants", "bees"], max_side=320,
                   channels=3, shard_bytes=2**20)
        os.environ.update(env)
        time.sleep(1.0)
        url = "s3://shards/bench/train"
        shards = upload_split(split_dir, url)
        print(f"{len(rows)} images, {shards} shards of 1 MiB in S3, cache cap "
              f"{args.cap_mib} MiB, 2 workers", flush=True)
        results: dict[str, list[dict]] = {"counter on": [], "size only": []}
        for r in range(args.rounds):
            for name, gate in (("counter on", "on"), ("size only", "off")):
                cache = work / "cache" / f"{r}-{gate}"
                cache.mkdir(parents=True)
                out = subprocess.run(
                    [sys.executable, __file__, "--cap-mib", str(args.cap_mib), "--child",
                     str(split_dir), url, str(cache), gate],
                    env=env, capture_output=True, text=True, timeout=600)
                if out.returncode != 0:  # an epoch that failed: its error's last line
                    print(f"round {r + 1} {name:10s} failed: {out.stderr.strip()[-300:]}")
                    results[name].append({"seconds": float("inf"), "peak_bytes": 0})
                    continue
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[name].append(res)
                print(f"round {r + 1} {name:10s} {res['seconds']:6.1f} s  peak "
                      f"{res['peak_bytes'] / 2**20:5.1f} MiB", flush=True)
        for name, runs in results.items():
            secs = [x["seconds"] for x in runs]
            print(f"{name:10s}: median {statistics.median(secs):.1f} s, "
                  f"{sum(s > STALL_S for s in secs)} of {len(secs)} epochs stalled or failed, max "
                  f"{max(secs):.1f} s, cache peak {max(x['peak_bytes'] for x in runs) / 2**20:.1f}"
                  f" MiB (cap {args.cap_mib})")
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""One epoch of `vflow stage train` streaming the train split from the stack's S3 through the
capped local cache, with one process or several gloo ranks (`train.procs_per_node`): the
stage's seconds and the cache folder's peak size (every file under `.cache/shards/train/`,
sampled every 10 ms).

The project: a checkout with `vflow stack up` run, photos added (`vflow data add`) and packed
to S3 in shards smaller than the cap (params: `data.storage: shards`, `data.shards_url:
s3://shards/photos`, `data.shard_bytes: 2097152`; then `vflow stage validate` and `vflow stage
pack`). Session 14 used 838 train photos (640-1024 px JPEGs, 56 shards, 110 MiB), ResNet-18 at
96 px:

    .venv/bin/python bench/bench_ddp_s3_cache.py --root PROJECT --cap-mib 16 --procs 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def folder_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # evicted while we looked
                total += os.path.getsize(os.path.join(folder, name))
    return total


def stack_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    for line in (root / ".cache/stack/env.sh").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = value.strip("'\"")
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--cap-mib", type=int, default=16)
    ap.add_argument("--procs", type=int, default=2)
    a = ap.parse_args()
    cache = a.root / ".cache" / "shards" / "train"
    shutil.rmtree(cache, ignore_errors=True)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(cache))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vflow"), "stage", "train", "--root", str(a.root),
         "-s", f"train.procs_per_node={a.procs}", "-s", f"data.shard_cache_bytes={a.cap_mib << 20}",
         "-s", "train.epochs=1", "-s", "train.progress=false"],
        env=stack_env(a.root), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    print(json.dumps({"procs": a.procs, "cap_mib": a.cap_mib, "exit": proc.returncode,
                      "seconds": round(seconds, 1), "peak_cache_mib": round(peak[0] / 2**20, 2)}))
    if proc.returncode:
        print(proc.stderr[-3000:])


if __name__ == "__main__":
    main()

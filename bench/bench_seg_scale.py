"""Segmentation at scale: the stages' memory with `data.storage` tensor and shards, at two
set sizes (generated shapes pairs of `--side`-ish px, PNG images and index masks, in /tmp).

For each size: validate once, then for each storage pack, train (one epoch, U-Net width 8 at
64 px, `data.workers=0` so the decoding is in the measured process) and evaluate, each as
`python -m visionflow.stages.<name>` (what `dvc repro` runs). The figure is the peak of the
process's `RssAnon` (what it allocated itself, not the mapped libraries), sampled every 20 ms
from /proc, and its wall time. `--kernel-caches 1024 default` runs train and evaluate twice
each, side by side: with oneDNN's own kernel cache (1,024 shapes) and with the segmenters' cap
(`model.segmentation.KERNEL_CACHE`).

    .venv/bin/python bench/bench_seg_scale.py --sizes 500 2000 --side 384
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ROOT = Path("/tmp/bench_seg_scale")
SETTINGS = {
    "task": "segmentation", "data.val_fraction": 0.1, "data.test_fraction": 0.2,
    "data.workers": 0, "segmentation.model": "unet",
    "segmentation.model_kwargs": {"width": 8, "depth": 3}, "segmentation.image_size": 64,
    "segmentation.epochs": 1, "segmentation.batch_size": 32, "segmentation.worst_images": 4,
    "train.threads": 2,
}


def _set(params: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for key in path:
        params = params.setdefault(key, {})
    params[last] = value


def project(n: int, side: int) -> Path:
    from visionflow.data.segmentation_synth import materialize_shapes

    data = ROOT / f"shapes-{n}-{side}"
    materialize_shapes(data, n_images=n, seed=0, min_side=side * 3 // 4, max_side=side)
    root = ROOT / f"proj-{n}-{side}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "data").symlink_to(data)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**SETTINGS, "data.source": "data"}.items():
        _set(params, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _anon_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def stage(root: Path, name: str, *overrides: str, cache: str = "default") -> dict[str, float]:
    cmd = [sys.executable, "-m", "visionflow.stages." + name, "--root", str(root)]
    for o in overrides:
        cmd += ["-s", o]
    start, peak = time.perf_counter(), 0.0
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if cache != "default":
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cache
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    while proc.poll() is None:
        peak = max(peak, _anon_mb(proc.pid))
        time.sleep(0.02)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{out[-3000:]}")
    return {"anon_peak_mb": round(peak, 1), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--side", type=int, default=384)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/seg_scale.json")
    ap.add_argument("--kernel-caches", nargs="+", default=["default"],
                    help="oneDNN kernel caches to run train and evaluate with (a number or "
                         "default: the segmenters' cap)")
    a = ap.parse_args()
    rows = []
    for n in a.sizes:
        root = project(n, a.side)
        stage(root, "validate")
        for storage in ("tensor", "shards"):
            o = f"data.storage={storage}"
            row = {"pairs": n, "side": a.side, "storage": storage, "pack": stage(root, "pack", o)}
            for cache in a.kernel_caches:
                suffix = "" if len(a.kernel_caches) == 1 else f"@{cache}"
                row.update({s + suffix: stage(root, s, o, cache=cache)
                            for s in ("train", "evaluate")})
            packed = json.loads((root / "outputs/pack/policy.json").read_text())
            row["packed_mb"] = round((root / "outputs/pack/packed.pt").stat().st_size / 2**20, 1)
            row["shard_mb"] = round(sum(f.stat().st_size for f in
                                        (root / "outputs/pack/shards").rglob("chunk-*")) / 2**20,
                                    1)
            row["counts"] = packed["counts"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

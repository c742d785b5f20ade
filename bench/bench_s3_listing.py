"""The memory a refresh of an S3 data version takes to list its prefix, at many keys:
`data.s3_sync.listing` (`list_objects_v2` a page at a time, ETag and size kept) beside the
listing it replaced (s3fs's `find(detail=True)`: every key's whole entry, held at once, and
again in s3fs's directory cache).

A real S3 server (`rclone serve s3`, the stack's object store) serves `--keys` small objects
under photos/set/train/<100 classes>/ (written straight into the folder it serves). Each way
runs in its own process, alternating, `--rounds` times: the listing alone, then `sync()` of
a project whose `data/` already holds every object (a refresh with nothing new: the whole
sync but the downloads). Printed: wall seconds and the process's peak RSS (ru_maxrss), and
its growth over the imports (per key).

    .venv/bin/python bench/bench_s3_listing.py --keys 100000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_s3_import import serve  # noqa: E402

WORK = Path("/tmp/bench_s3_listing")
URL = "s3://photos/set"

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data import s3_sync

def find_listing(fs, url):  # the listing before: s3fs's find, every entry whole
    base = url.removeprefix("s3://").rstrip("/")
    out = {}
    for path, info in fs.find(base, detail=True).items():
        if (info.get("type") == "directory" or not path.startswith(base + "/")
                or (path.endswith("/") and not info.get("size"))):
            continue
        out[s3_sync.safe_key(url, path[len(base) + 1:])] = (
            str(info.get("ETag", "")).strip('"'), int(info.get("size") or 0))
    if not out:
        raise DataError("no objects")
    return out

way, what, url, root = sys.argv[1:5]
if way == "find":
    s3_sync.listing = find_listing
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if what == "listing":
    n = len(s3_sync.listing(s3_sync.filesystem(url), url))
else:
    layout = Layout.at(Path(root))
    staged = s3_sync.staging(layout, "data")
    report, objects = s3_sync.sync(layout, url, "data", staged)
    assert report.kept == len(objects) and not report.downloaded, report
    n = len(objects)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"keys": n, "wall_s": wall, "base_kb": base, "peak_kb": peak}))
"""


def write_keys(served: Path, keys: int) -> Path:
    """`keys` 8-byte objects under photos/set/train/class_NNN/ (100 classes)."""
    folder = served / "photos" / "set"
    shutil.rmtree(served, ignore_errors=True)
    for i in range(keys):
        d = folder / "train" / f"class_{i % 100:03d}"
        if i < 100:
            d.mkdir(parents=True)
        (d / f"IMG_{i:07d}.jpg").write_bytes(i.to_bytes(8, "little"))
    return folder


def project(root: Path, files: Path) -> Path:
    """A project whose data/ holds every object already (hard links to the served files)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text("{}\n")
    subprocess.run(["cp", "-al", str(files), str(root / "data")], check=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    t = time.perf_counter()
    files = write_keys(WORK / "served", args.keys)
    root = project(WORK / "proj", files)
    print(f"{args.keys} objects written in {time.perf_counter() - t:.1f} s", flush=True)
    proc, env = serve(WORK / "served")
    results: dict[tuple[str, str], list[dict]] = {}
    try:
        for r in range(args.rounds):
            for what in ("listing", "sync"):
                ways = ("find", "paged") if r % 2 == 0 else ("paged", "find")
                for way in ways:
                    out = subprocess.run([sys.executable, "-c", CHILD, way, what, URL,
                                          str(root)], capture_output=True, text=True,
                                         env={**os.environ, **env}, check=False)
                    if out.returncode:
                        raise SystemExit(f"{way} {what}: {out.stderr[-2000:]}")
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault((what, way), []).append(res)
                    grow = (res["peak_kb"] - res["base_kb"]) * 1024 / res["keys"]
                    print(f"round {r + 1} {what:7s} {way:5s}: {res['keys']} keys "
                          f"{res['wall_s']:.1f} s, peak RSS {res['peak_kb'] / 1024:.0f} MB "
                          f"(+{(res['peak_kb'] - res['base_kb']) / 1024:.0f} MB over the "
                          f"imports, {grow:.0f} B a key)", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print("\nmedians:")
    for what in ("listing", "sync"):
        row = {}
        for way in ("find", "paged"):
            rs = results[(what, way)]
            row[way] = (statistics.median(r["wall_s"] for r in rs),
                        statistics.median((r["peak_kb"] - r["base_kb"]) / 1024 for r in rs),
                        statistics.median(r["peak_kb"] / 1024 for r in rs))
        (fw, fg, fp), (pw, pg, pp) = row["find"], row["paged"]
        ratio = f"{fg / pg:.2f}x" if pg else "-"
        print(f"{what:7s}: s3fs find {fw:.1f} s, +{fg:.0f} MB (peak {fp:.0f} MB) | paged "
              f"{pw:.1f} s, +{pg:.0f} MB (peak {pp:.0f} MB) | growth ratio {ratio}")


if __name__ == "__main__":
    main()

"""Evaluate's class plots as the number of classes grows: the confusion matrix (counts, and
normalised by row) and the per-class bars, as `stages/evaluate.py` draws them.

Each case runs in a child process, so its peak RSS is its own: the wall seconds of the three
plots, the PNG sizes in pixels, the child's peak RSS. `--src` points at another checkout's
`src/` (e.g. a `git worktree` of an older commit), so both are measured side by side in one
run, cases alternating:

    git worktree add /tmp/vf-old <commit>
    .venv/bin/python bench/bench_plots.py --classes 10 100 300 --src /tmp/vf-old/src
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, random, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from PIL import Image
from visionflow.model import plots
Image.MAX_IMAGE_PIXELS = None  # an oversized plot is a figure here, not an error
n, out = int(sys.argv[2]), Path(sys.argv[3])
rng = random.Random(0)
classes = [f"class_{i:04d}" for i in range(n)]
matrix = [[rng.randint(0, 3) + (20 if i == j else 0) for j in range(n)] for i in range(n)]
rows = [{"class": c, **{m: rng.random() for m in plots.PER_CLASS}} for c in classes]
t0 = time.perf_counter()
plots.plot_confusion(out / "confusion.png", matrix, classes)
plots.plot_confusion(out / "confusion_norm.png", matrix, classes, normalize=True)
plots.plot_per_class(out / "per_class.png", rows)
wall = time.perf_counter() - t0
sizes = {p.stem: list(Image.open(p).size) for p in sorted(out.glob("*.png"))}
print(json.dumps({"seconds": round(wall, 2), "pixels": sizes,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def case(src: Path, n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(n), tmp],
                              capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 300])
    ap.add_argument("--src", type=Path, help="another checkout's src/, measured beside this")
    a = ap.parse_args()
    checkouts = {"this": REPO / "src", **({"other": a.src.resolve()} if a.src else {})}
    print("| classes | code | seconds (3 plots) | confusion px | per-class px | peak RSS MB |")
    print("|---:|---|---:|---|---|---:|")
    for n in a.classes:
        for name, src in checkouts.items():
            r = case(src, n)
            px = r["pixels"]
            print(f"| {n} | {name} | {r['seconds']} | {'x'.join(map(str, px['confusion']))} | "
                  f"{'x'.join(map(str, px['per_class']))} | {r['peak_rss_mb']} |", flush=True)


if __name__ == "__main__":
    main()

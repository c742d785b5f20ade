"""The kernel-cache memory test's figures: a segmenter at 100 new image sizes in a fresh
process, its growth read with the heap trimmed first (as `test_segmentation_memory.py` does)
and as read (`--no-trim`), for the cap unset (ours), 256 and 1,024, `--reps` times each.

    .venv/bin/python bench/bench_kernel_cache_growth.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "segmentation"))
from test_segmentation_memory import SCRIPT  # noqa: E402

TRIM = '    ctypes.CDLL("libc.so.6").malloc_trim(0)\n'


def growth_mib(cap: str | None, script: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if cap:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = cap
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["growth"] / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    assert TRIM in SCRIPT, "the test's script no longer trims the heap"
    for rep in range(a.reps):
        for name, script in (("as read", SCRIPT.replace(TRIM, "")), ("trimmed", SCRIPT)):
            row = {cap or "unset": round(growth_mib(cap, script), 1)
                   for cap in (None, "256", "1024")}
            print(json.dumps({"rep": rep, "heap": name, "growth_mib": row}), flush=True)


if __name__ == "__main__":
    main()

"""A stage's process with and without the collector pause at start-up
(`core.env.imports_without_gc`, `stages/__init__.py`).

`dvc repro` runs each stage as `python3 -m visionflow.stages.<name>`: its imports run with
Python's cycle collector paused, and what they made is frozen out of its later passes. The
same module started through `runpy` from `python -c` runs the same code with the collector as
Python leaves it (the pause keys on `-m`). One digits project (the repo's params.yaml, 30
images a class, 2 epochs, int8 the one compression) runs every stage once; then each round
runs train, evaluate, compress and register once each way, the order alternating by round.
Per stage: the child's median CPU seconds (user + sys) and wall seconds, and the ratios.

    .venv/bin/python bench/bench_stage_startup.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("validate", "pack", "train", "evaluate", "compress", "register")
TIMED = ("train", "evaluate", "compress", "register")
OVERRIDES = ["data.limit_per_class=30", "train.epochs=2", "train.threads=1",
             "compress.methods=[int8]", "compress.calibration_images=64"]


def project(base: Path) -> Path:
    import yaml

    from visionflow.core.configfile import apply_overrides, read_params_file
    from visionflow.data.digits import materialize_digits

    root = base / "proj"
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "flows", "presets"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, root / name)
    materialize_digits(root / "data")
    raw = apply_overrides(read_params_file(REPO / "params.yaml"), OVERRIDES)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def command(stage: str, paused: bool) -> list[str]:
    if paused:  # as dvc.yaml runs it
        return [sys.executable, "-m", f"visionflow.stages.{stage}"]
    return [sys.executable, "-c", "import runpy; runpy.run_module("
            f"'visionflow.stages.{stage}', run_name='__main__', alter_sys=True)"]


def timed_run(stage: str, paused: bool, root: Path, env: dict[str, str]) -> dict[str, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(command(stage, paused), cwd=root, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu": cpu, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vflow-startup-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    try:
        root = project(base)
        for stage in STAGES:  # every stage once: each timed one has its inputs
            timed_run(stage, True, root, env)
        samples: dict[str, dict[str, list[dict]]] = {s: {"paused": [], "plain": []}
                                                     for s in TIMED}
        for r in range(a.rounds):
            for stage in TIMED:
                for paused in ((True, False) if r % 2 == 0 else (False, True)):
                    key = "paused" if paused else "plain"
                    samples[stage][key].append(timed_run(stage, paused, root, env))
        rows = {}
        print(f"{a.rounds} rounds; median of the stage process's own CPU seconds and wall")
        print(f"{'stage':10s} {'plain cpu':>9s} {'paused cpu':>10s} {'ratio':>6s}"
              f" {'plain wall':>10s} {'paused wall':>11s} {'ratio':>6s}")
        for stage, by in samples.items():
            med = {k: {m: statistics.median(x[m] for x in v) for m in ("cpu", "wall")}
                   for k, v in by.items()}
            rows[stage] = med
            print(f"{stage:10s} {med['plain']['cpu']:9.2f} {med['paused']['cpu']:10.2f} "
                  f"{med['paused']['cpu'] / med['plain']['cpu']:6.2f} "
                  f"{med['plain']['wall']:10.2f} {med['paused']['wall']:11.2f} "
                  f"{med['paused']['wall'] / med['plain']['wall']:6.2f}")
        if a.out:
            a.out.write_text(json.dumps({"rounds": a.rounds, "overrides": OVERRIDES,
                                         "medians": rows, "samples": samples}, indent=1))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

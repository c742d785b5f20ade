"""Benchmark the validate stage (manifest + GX gate) on the CIFAR-10 JPEG archive.

Each repetition runs `vflow stage validate` as a subprocess (exactly what `dvc repro` runs)
in a throw-away project under /tmp whose `data.source` is the archive, and times:

  cold        fresh project: archive sha256 + safe extraction + scan + decode of every image
              (process pool over all cores) + GX suite + Data Docs
  unchanged   the same command again: extraction reused, manifest rows from the row cache,
              suite results and Data Docs from the suite memo
  cold-rows   archive already extracted, row cache and suite memo deleted (decode + GX only)

and prints the per-phase timings validate records in `validation.json`. The machine is
shared, so run several repetitions and quote medians:

    .venv/bin/python bench/bench_validate.py --reps 3
    .venv/bin/python bench/bench_validate.py --archive /path/to/other.tar.gz --reps 1

The archive is never copied into the repository; projects live under --workdir (/tmp) and
are removed at the end (deleting 60,000 files is slow on this VM's ext4 with `discard`, so
never between timed runs), unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
VFLOW = Path(sys.executable).with_name("vflow")


def _project(workdir: Path, archive: Path, name: str) -> Path:
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(source=str(archive), image_size=32)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _validate(root: Path) -> tuple[float, dict]:
    env = {**os.environ, "DO_NOT_TRACK": "true", "GX_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    t = time.perf_counter()
    proc = subprocess.run([str(VFLOW), "stage", "validate", "--root", str(root)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    report = json.loads((root / "outputs" / "validate" / "validation.json").read_text())
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"validate failed ({proc.returncode})")
    return wall, report


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--unchanged-reps", type=int, default=3, help="unchanged runs per rep")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the projects")
    a = ap.parse_args()
    if not a.archive.is_file():
        raise SystemExit(f"archive not found: {a.archive}")
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="vflow-bench-validate-"))
    print(f"archive {a.archive} ({a.archive.stat().st_size / 1e6:.1f} MB), "
          f"{os.cpu_count()} cores, workdir {workdir}")
    runs: dict[str, list[float]] = {"cold": [], "unchanged": [], "cold-rows": []}
    phases: dict[str, list[dict]] = {k: [] for k in runs}
    try:
        for rep in range(a.reps):
            root = _project(workdir, a.archive, f"rep{rep}")
            print(f"rep {rep + 1}/{a.reps}: load {_load()}")
            wall, rep_json = _validate(root)
            runs["cold"].append(wall)
            phases["cold"].append(rep_json["timings"])
            print(f"  cold       {wall:6.2f} s  files {rep_json['files']} usable "
                  f"{rep_json['usable']}  {rep_json['timings']}")
            time.sleep(2.5)  # let the newest files age past the row cache's racy window
            for _ in range(a.unchanged_reps):
                wall, rep_json = _validate(root)
                runs["unchanged"].append(wall)
                phases["unchanged"].append(rep_json["timings"])
                print(f"  unchanged  {wall:6.2f} s  cache {rep_json['cache']['reused']} reused "
                      f"{rep_json['cache']['rehashed']} rehashed {rep_json['cache']['decoded']} "
                      f"decoded, suite {rep_json['cache']['suite']}  {rep_json['timings']}")
            shutil.rmtree(root / ".cache" / "validate")  # small: the row cache and suite memo
            wall, rep_json = _validate(root)
            runs["cold-rows"].append(wall)
            phases["cold-rows"].append(rep_json["timings"])
            print(f"  cold-rows  {wall:6.2f} s  {rep_json['timings']}")
    finally:
        _report(runs, phases, a.json)
        if not a.keep:
            print("removing the projects (slow: 60,000 files each) ...")
            for rep in range(a.reps):
                shutil.rmtree(workdir / f"rep{rep}", ignore_errors=True)
            if a.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)


def _report(runs: dict[str, list[float]], phases: dict[str, list[dict]], out: Path | None
            ) -> None:
    print("\nmedian wall seconds (`vflow stage validate`, process start to exit):")
    summary = {}
    for name, values in runs.items():
        if not values:
            continue
        med = statistics.median(values)
        keys = sorted({k for p in phases[name] for k in p})
        ph = {k: round(statistics.median(p.get(k, 0.0) for p in phases[name]), 2) for k in keys}
        summary[name] = {"median_s": round(med, 2), "runs": [round(v, 2) for v in values],
                         "phases_median_s": ph}
        print(f"  {name:10s} {med:6.2f}  (runs: {', '.join(f'{v:.2f}' for v in values)})  "
              f"phases {ph}")
    print(f"load average at the end: {_load()}")
    if out:
        out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

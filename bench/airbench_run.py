"""Run the public CIFAR-10 speed record script itself, N timed runs after its warm-up (#20).

The script (KellerJordan/cifar10-airbench `airbench94_muon.py`, never committed here: it comes
from a git-ignored folder, see README_gpu.md) is imported unmodified and driven as its own
`__main__` does: one `CifarNet`, channels_last, `model.compile(mode="max-autotune")`, one
warm-up `main("warmup", model)` (compilation; excluded), then `main(run, model)` for each run,
whose printed final row carries the seconds the record counts (whitening + training + the
final TTA evaluation, on CUDA events) and whose return value is its flip+translate TTA
accuracy. Only the number of runs differs (its own loop does 200). It reads `cifar10/train.pt`
and `cifar10/test.pt` under `--data` (`airbench_data.py` writes them).

    python bench/airbench_run.py --script .gpu/airbench/airbench94_muon.py \
        --data /tmp/vflow-airbench --runs 10 --out /tmp/record.json

Writes `--out` (JSON) after the warm-up and after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def final_seconds(printed: str, columns: list[str] | None = None) -> float:
    """The `time_seconds` cell of the record's final table row (its `epoch` cell is 'eval')."""
    names = [c.strip() for c in (columns or [])]
    for line in reversed(printed.splitlines()):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "eval" in cells:
            at = names.index("time_seconds") if "time_seconds" in names else len(cells) - 1
            return float(cells[at])
    raise ValueError(f"no final 'eval' row in the record's output: {printed[-500:]!r}")


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location("airbench_record", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python script")
    mod = importlib.util.module_from_spec(spec)
    argv0, sys.argv[0] = sys.argv[0], str(path)  # it reads its own code (for its logs)
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.argv[0] = argv0
    for name in ("CifarNet", "main"):
        if not hasattr(mod, name):
            raise ValueError(f"{path}: no `{name}`: not the airbench94_muon.py this drives")
    return mod


def run_record(script: Path, data: Path, runs: int, out: Path, compile_mode: str | None,
               deadline: float | None = None) -> dict:
    script, out = script.resolve(), out.resolve()
    if not (data / "cifar10" / "train.pt").is_file():
        raise FileNotFoundError(f"{data}/cifar10/train.pt missing: run airbench_data.py")
    os.chdir(data)  # its loader reads the relative folder `cifar10`
    mod = load_script(script)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    columns = getattr(mod, "logging_columns_list", None)
    res: dict = {"script": str(script), "compile_mode": compile_mode, "runs": []}

    def call(run) -> tuple[float, float, float]:
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            acc = float(mod.main(run, model))
        wall = time.perf_counter() - t0
        sys.stdout.write(buf.getvalue())
        return acc, final_seconds(buf.getvalue(), columns), wall

    model = mod.CifarNet().to(device).to(memory_format=torch.channels_last)
    if compile_mode:
        model.compile(mode=compile_mode)
    _, warm_seconds, warm_wall = call("warmup")
    res["warmup"] = {"seconds": warm_seconds, "wall_seconds": warm_wall}  # compile included
    write(out, res)
    for run in range(runs):
        if res["runs"] and deadline is not None and time.time() > deadline:
            res["cut"] = f"time: {len(res['runs'])} of {runs} runs"
            break
        acc, seconds, wall = call(run)
        res["runs"].append({"run": run, "tta_val_acc": acc, "seconds": seconds,
                            "wall_seconds": wall})
        secs = [r["seconds"] for r in res["runs"]]
        accs = [r["tta_val_acc"] for r in res["runs"]]
        res["summary"] = {"n": len(secs), "seconds_median": statistics.median(secs),
                          "seconds_min": min(secs), "seconds_max": max(secs),
                          "tta_val_acc_mean": statistics.mean(accs),
                          "tta_val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        write(out, res)
    return res


def write(out: Path, res: dict) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="folder holding cifar10/*.pt")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--compile-mode", default="max-autotune", help="'' for eager (dry runs)")
    ap.add_argument("--deadline", type=float, default=None, help="time.time() to stop at")
    a = ap.parse_args()
    if not a.script.is_file():
        sys.exit(f"error: {a.script}: record script not found (bench/README_gpu.md says how "
                 f"to fetch it)")
    run_record(a.script, a.data, a.runs, a.out, a.compile_mode or None, a.deadline)


if __name__ == "__main__":
    main()

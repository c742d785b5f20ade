"""Every GPU figure of issue #14 in one run (`bench/gpu_bench.sh OUT` calls this).

Steps (numbered as in the issue), each writing `OUT/<n>_<name>.json` as soon as it ends, so a
run cut off by the device's time limit still returns what it finished:

1. `fast`: the cifar10-fast preset, one warm-up run excluded, then >= 5 seeds: seconds of
   whitening + training + the final flip-TTA test evaluation (as the speed records count) and
   flip-TTA test accuracy; median and spread; per-epoch accuracy measured outside the clock.
2. throughput: ResNet-18 with the full augmentation policy, the project's `fit` loop against a
   plain GPU-resident loop and a DataLoader loop, side by side; eager, then compiled.
3. `cifar10-resnet18` preset: training time until flip-TTA test accuracy first reaches 92%
   (checked after every epoch, outside the clock).
4. augmentation ops against kornia and torchvision v2 on GPU batches.
5. the CUDA-only tests: `pytest -m gpu` on the test files that need no pydantic or MLflow.
6. issue #18: ResNet-50 at 224 px from generated JPEGs decoded on the GPU against the compute
   bound and a DataLoader (`bench/gpu_scale.py`); needs no CIFAR archive.
7. issue #20: the `cifar10-muon` preset through `fit` (compiled: `train.compile: auto`) side by
   side with the public record script itself (`airbench_run.py`, from the git-ignored
   `--record-script`) on the same decoded archive (`airbench_data.py`): each one's compile and
   warm-up run reported apart and excluded, then seeds / runs; the ratio of the medians.
   Not in the default order (the record's max-autotune compile takes minutes): `--steps 7,...`.

Run order is 1, 3, 2 (eager), 4, 5, 6, 2 (compiled): the compiled pass is the least certain in
time. The CIFAR archive is decoded only when a step that needs it (1, 2, 3) is asked for.
Needs torch, torchvision, numpy, Pillow, PyYAML, pytest (and kornia for step 4): what the
GPU machine has, plus the kornia wheels. `--dry-run` runs every step on the CPU at toy sizes
(a test does, so this script cannot rot) with pydantic and MLflow made unimportable, as there.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (HERE, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
# not on the GPU machine: the dry run (and step 5's pytest) prove we do without
BLOCKED = ("pydantic", "mlflow", "dvc", "prefect")
GPU_TEST_FILES = ["tests/model/test_gpu.py", "tests/model/test_augment_ops.py",
                  "tests/model/test_gpu_decode.py", "tests/model/test_ddp_stop.py"]

import torch  # noqa: E402
from cifar_data import load_cifar  # noqa: E402
from cifar_fast import summary, train_seed  # noqa: E402

from visionflow.core.presets import load_raw  # noqa: E402

T0 = time.perf_counter()
DEFAULT_STEPS = "1,3,2e,4,5,6,8,2c"  # 2e/2c: eager/compiled; 7 asked for by name


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f}s] {msg}", flush=True)


def write(out: Path, name: str, payload: dict) -> None:
    tmp = out / f".{name}.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, out / name)
    log(f"wrote {name}")


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cpus": os.cpu_count(), "device": str(device)}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version())
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                 "temperature.gpu,power.draw", "--format=csv"], capture_output=True,
                text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"unavailable: {err}"
    return env


def step_fast(data: dict, a: argparse.Namespace, device: torch.device, out: Path,
              deadline: float) -> None:
    raw = load_raw(ROOT / "params.yaml", "cifar10-fast")
    over = {"epochs": a.fast_epochs, "batch_size": a.fast_batch} if a.dry_run else {}
    log("1 fast: warm-up run (not counted)")
    warm = train_seed(data, raw, 999, device, eval_every=0,
                      **({"epochs": 1} if not a.dry_run else over))
    rows: list[dict] = []
    res: dict = {"preset": "cifar10-fast", "target": 0.905, "metric": "flip-TTA test top-1",
                 "counted": "whitening + training + final flip-TTA evaluation",
                 "warmup_seconds": warm["seconds"], "runs": rows}
    for seed in range(a.seeds):
        if rows and time.perf_counter() > deadline:
            res["cut"] = f"time: {len(rows)} of {a.seeds} seeds"
            break
        row = train_seed(data, raw, seed, device, eval_every=1, tta=1, target=0.905, **over)
        rows.append(row)
        log(f"1 fast seed {seed}: {row['seconds']:.2f} s, tta1 {row['tta1']:.4f}, "
            f"tta2 {row['tta2']:.4f}, first epoch >= 90.5%: {row['epoch_at_target']}")
        res["summary"] = summary(rows) | {
            "reached": sum(r["tta1"] >= 0.905 for r in rows),
            "seconds_to_target_median": statistics.median(
                [r["seconds_to_target"] for r in rows if r["seconds_to_target"]] or [0.0]),
            "tta2_mean": statistics.mean(r["tta2"] for r in rows)}
        write(out, "1_fast.json", res)


def step_record(data: dict, a: argparse.Namespace, device: torch.device, out: Path,
                deadline: float) -> None:
    """7: ours (cifar10-muon through `fit`) then the record script, then the ratio."""
    from airbench_data import write_airbench

    raw = load_raw(ROOT / "params.yaml", "cifar10-muon")
    over = ({"epochs": a.fast_epochs, "batch_size": a.fast_batch, "compile": True}
            if a.dry_run else {})
    rows: list[dict] = []
    res: dict = {"ours": {"preset": "cifar10-muon", "runs": rows,
                          "counted": "whitening + training + final flip-TTA evaluation"},
                 "record": {}, "target": 0.905}
    log("7 record: ours, warm-up run with compilation (not counted)")
    t0 = time.perf_counter()
    warm = train_seed(data, raw, 999, device, **(over or {"epochs": 1}))
    res["ours"]["warmup"] = {"wall_seconds": time.perf_counter() - t0,
                             "seconds": warm["seconds"]}
    ours_end = time.perf_counter() + 0.3 * (deadline - time.perf_counter())
    for seed in range(a.seeds):
        if rows and time.perf_counter() > ours_end:
            res["ours"]["cut"] = f"time: {len(rows)} of {a.seeds} seeds"
            break
        row = train_seed(data, raw, seed, device, eval_every=1, tta=1, target=0.905, **over)
        rows.append(row)
        log(f"7 ours seed {seed}: {row['seconds']:.2f} s, tta1 {row['tta1']:.4f}, "
            f"tta2 {row['tta2']:.4f}")
        res["ours"]["summary"] = summary(rows) | {
            "tta2_mean": statistics.mean(r["tta2"] for r in rows),
            "reached": sum(r["tta1"] >= 0.905 for r in rows)}
        write(out, "7_record.json", res)
    folder = Path(a.record_data)
    res["record"]["images"] = write_airbench(data, folder / "cifar10")
    script = Path(a.record_script)
    runs_json = out / "7_record_runs.json"
    log(f"7 record: {script} ({a.record_runs} runs after its warm-up)")
    left = deadline - time.perf_counter()
    argv = [sys.executable, str(HERE / "airbench_run.py"), "--script", str(script),
            "--data", str(folder), "--runs", str(a.record_runs), "--out", str(runs_json),
            "--deadline", str(time.time() + left - 15),
            "--compile-mode", "" if a.dry_run else "max-autotune"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=max(30, left))
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = -1, f"timeout after {left:.0f} s\n{err.stdout or ''}"
    print(text[-3000:], flush=True)
    res["record"] |= {"returncode": rc, "output_tail": text[-3000:]}
    if runs_json.is_file():
        res["record"] |= json.loads(runs_json.read_text())
    ours_med = res["ours"].get("summary", {}).get("seconds_median")
    rec_med = res["record"].get("summary", {}).get("seconds_median")
    if ours_med and rec_med:
        res["ratio_of_medians"] = ours_med / rec_med  # < 1: ours is faster
        log(f"7 record: ours {ours_med:.2f} s / record {rec_med:.2f} s = "
            f"{res['ratio_of_medians']:.2f}")
    write(out, "7_record.json", res)


def step_resnet(data: dict, a: argparse.Namespace, device: torch.device, out: Path,
                deadline: float) -> None:
    raw = load_raw(ROOT / "params.yaml", "cifar10-resnet18")
    over = {"epochs": 1, "batch_size": 16} if a.dry_run else {}

    def subset(n: int) -> dict:
        return {k: (v[:: max(1, len(v) // n)][:n] if k.endswith(("_x", "_y")) else v)
                for k, v in data.items()}

    if a.dry_run:
        data = subset(32)
    log("3 resnet18: warm-up on a subset (not counted)")
    train_seed(subset(4096 if not a.dry_run else 16), raw, 999, device, **(over or {"epochs": 1}))
    row = train_seed(data, raw, 0, device, eval_every=1, tta=1, target=0.92,
                     stop_at_target=True, deadline=deadline, **over)
    row |= {"preset": "cifar10-resnet18", "metric": "flip-TTA test top-1",
            "reached": row["epoch_at_target"] is not None,
            "best_tta1": max((r.get("test_tta1", 0.0) for r in row["per_epoch"]), default=0.0)}
    log(f"3 resnet18: epochs {row['epochs']}, to 92%: {row['seconds_to_target']} s, "
        f"best tta1 {row['best_tta1']:.4f}")
    write(out, "3_resnet18.json", row)


def step_throughput(data: dict, a: argparse.Namespace, device: torch.device, out: Path,
                    compile: bool, results: dict) -> None:
    from bench_throughput import measure, report

    kw = ({"model": "fast", "batch": 16, "block": 2, "rounds": 2, "workers": 0}
          if a.dry_run else {"model": "resnet18", "batch": 512, "block": 20, "rounds": 5,
                             "workers": max(1, (os.cpu_count() or 2) - 2)})
    log(f"2 throughput: compile={compile}")
    res = measure(data["train_x"], data["train_y"], device=device, compile=compile, **kw)
    report(res)
    results["compiled" if compile else "eager"] = res
    write(out, "2_throughput.json", results)


def step_augment(a: argparse.Namespace, device: torch.device, out: Path) -> None:
    from bench_augment import run_all

    log("4 augment ops vs kornia vs torchvision v2")
    kw = {"batch": 64, "reps": 2, "warmup": 1} if a.dry_run else {"reps": 30, "warmup": 5}
    write(out, "4_augment.json", run_all(str(device.type), **kw))


def pytest_gpu_argv(args: list[str]) -> list[str]:
    """`pytest -m gpu ARGS` with the packages the GPU machine lacks made unimportable."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)
    code = (f"import sys; {block}; import pytest; "
            f"sys.exit(pytest.main(['-q', '-m', 'gpu', '-p', 'no:cacheprovider', *sys.argv[1:]]))")
    return [sys.executable, "-c", code, *args]


def step_scale(a: argparse.Namespace, device: torch.device, out: Path,
               deadline: float) -> None:
    from gpu_scale import run_scale

    log("6 scale: GPU-decoded JPEGs vs synthetic batches vs a DataLoader")
    data = Path(a.scale_data) / ("dry" if a.dry_run else "full")
    run_scale(data, device, a.dry_run, deadline, lambda res: write(out, "6_scale.json", res))


def step_segmentation(a: argparse.Namespace, device: torch.device, out: Path,
                      timeout: float) -> None:
    """`bench_segmentation.py` (U-Net on the generated shapes set: train img/s, val / test
    mIoU) on the device, in a process where the packages the GPU machine lacks are blocked."""
    log("8 segmentation: U-Net on the generated shapes set")
    size = (["--images", "40", "--size", "32", "--width", "8", "--epochs", "1"] if a.dry_run
            else ["--images", "600", "--size", "64", "--width", "16", "--epochs", "8",
                  "--batch", "64"])
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in BLOCKED)
    code = (f"import runpy, sys; {block}; sys.argv = sys.argv[1:]; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    cmd = [sys.executable, "-c", code, str(HERE / "bench_segmentation.py"), *size,
           "--device", device.type, "--threads", str(torch.get_num_threads()),
           "--data", str(Path(a.scale_data).parent / "vflow-gpu-seg"),
           "--out", str(out / "8_segmentation.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode:
        raise RuntimeError(f"bench_segmentation.py exited {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout)[-2000:]}")


def step_tests(a: argparse.Namespace, out: Path, timeout: float) -> None:
    log("5 pytest -m gpu")
    files = GPU_TEST_FILES
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(pytest_gpu_argv(files), cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, text = -1, f"timeout after {timeout:.0f} s\n{err.stdout or ''}"
    print(text[-3000:], flush=True)
    last = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
    write(out, "5_gpu_tests.json", {"files": files, "returncode": rc, "summary": last[0],
                                    "seconds": time.perf_counter() - t0,
                                    "output_tail": text[-6000:]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--archive", default=str(ROOT / ".gpu" / "cifar10-jpeg.tar.gz"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=520, help="seconds for all steps")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, every step")
    ap.add_argument("--steps", default=DEFAULT_STEPS,
                    help="order; 2e/2c: eager/compiled")
    ap.add_argument("--scale-data", default="/tmp/vflow-gpu-scale",
                    help="step 6's generated JPEGs (reused when there)")
    ap.add_argument("--record-script",
                    default=str(ROOT / ".gpu" / "airbench" / "airbench94_muon.py"),
                    help="step 7: the record script (git-ignored, see README_gpu.md)")
    ap.add_argument("--record-runs", type=int, default=10, help="step 7: timed record runs")
    ap.add_argument("--record-data", default="/tmp/vflow-airbench",
                    help="step 7: where the record's cifar10/train.pt, test.pt are written")
    a = ap.parse_args()
    a.fast_epochs, a.fast_batch = 1, 64
    if a.dry_run:
        for m in BLOCKED:
            sys.modules[m] = None  # type: ignore[assignment]
        torch.set_num_threads(min(2, torch.get_num_threads()))
        torch.compile = functools.partial(torch.compile, backend="eager")  # trace, no codegen
    device = torch.device("cpu" if a.dry_run or not torch.cuda.is_available() else "cuda")
    # every seed's FitRun compiles its own model (`train.compile: auto`); past Dynamo's
    # recompile limit (8 per code object) it would silently run eager
    dynamo_config = importlib.import_module("torch._dynamo").config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = a.steps.split(",")
    data: dict = {}
    if set(steps) & {"1", "3", "2e", "2c", "7"}:
        log(f"decoding {a.archive}")  # before CUDA starts: the decoder forks worker processes
        data = load_cifar(a.archive, limit=256 if a.dry_run else None)
    env = environment(device) | {"dry_run": a.dry_run, "argv": sys.argv}
    if data:
        env["decode_seconds"] = round(elapsed(), 1)
        env["images"] = {"train": len(data["train_x"]), "test": len(data["test_x"])}
    log(f"device {env.get('gpu', device)}")
    write(out, "env.json", env)
    end = T0 + a.budget
    throughput: dict = {}
    # each step's share of what is left: it ends early (fewer seeds, fewer epochs) past it
    shares = {"1": 0.2, "3": 0.35, "2e": 0.25, "4": 0.3, "5": 0.4, "6": 0.6, "8": 0.3,
              "2c": 1.0, "7": 0.8}
    for step in steps:
        left = end - time.perf_counter()
        if left < 10:
            log(f"step {step} skipped: budget spent")
            write(out, f"skipped_{step}.json", {"step": step, "why": "budget spent"})
            continue
        deadline = time.perf_counter() + shares.get(step, 0.3) * left
        try:
            if step == "1":
                step_fast(data, a, device, out, deadline)
            elif step == "3":
                step_resnet(data, a, device, out, deadline)
            elif step in ("2e", "2c"):
                step_throughput(data, a, device, out, step == "2c", throughput)
            elif step == "4":
                step_augment(a, device, out)
            elif step == "6":
                step_scale(a, device, out, deadline)
            elif step == "7":
                step_record(data, a, device, out, deadline)
            elif step == "8":
                step_segmentation(a, device, out, timeout=max(30.0, deadline - time.perf_counter()))
            elif step == "5":
                step_tests(a, out, timeout=max(30.0, shares["5"] * left))
            else:
                raise ValueError(f"unknown step {step!r}")
        except Exception as err:  # one broken step must not cost the others
            traceback.print_exc()
            write(out, f"error_{step}.json", {"step": step, "error": repr(err),
                                              "traceback": traceback.format_exc()[-4000:]})
    log("done")


if __name__ == "__main__":
    main()

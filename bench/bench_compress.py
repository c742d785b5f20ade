"""CPU latency / size / MACs of compressed resnet18 variants, side by side in one run.

resnet18 (small-image stem, 10 classes, 32x32 input, random weights: latency only) as the
project's classifier (normalisation first). Variants: fp32 eager, fp32 ONNX Runtime, int8 QDQ
ONNX Runtime (per-channel, calibrated on random images), 50% channel-pruned eager and ORT,
and, when torchao is installed, fp32 torch.compile vs int8 PT2E X86Inductor torch.compile.
Each latency is the median of `--reps` timed calls after `--warmup` untimed ones.

    PYTHONPATH=src .venv/bin/python bench/bench_compress.py --reps 30 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from visionflow.atomic import torch_save
from visionflow.classifier import Arch, build_classifier
from visionflow.compression.measure import (
    count_macs,
    count_params,
    cpu_latency_ms,
    ort_latency_ms,
)
from visionflow.compression.onnx_export import OrtClassifier, export_onnx
from visionflow.compression.prune import save_pruned, structured_prune
from visionflow.compression.pt2e import quantize_pt2e_x86, torchao_available
from visionflow.compression.quantize import quantize_int8_onnx

SHAPE = (1, 3, 32, 32)


def _latencies(run, example, batches, reps, warmup, ort: bool) -> dict[int, dict]:
    timer = ort_latency_ms if ort else cpu_latency_ms
    return {b: timer(run, example, batch=b, reps=reps, warmup=warmup) for b in batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, default=None, help="default: torch's default")
    ap.add_argument("--prune-ratio", type=float, default=0.5)
    ap.add_argument("--no-torchao", action="store_true", help="skip the PT2E rows")
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    arch = Arch(name="resnet18", num_classes=10, image_size=32)
    model = build_classifier(arch).eval()
    example = torch.rand(*SHAPE)
    calib = torch.rand(128, *SHAPE[1:])
    pruned = structured_prune(model, example, ratio=args.prune_ratio)
    out = Path(tempfile.mkdtemp(prefix="vf-bench-"))
    paths = {
        "fp32.pt": out / "fp32.pt",
        "pruned.pt": out / "pruned.pt",
        "fp32.onnx": export_onnx(model, example, out / "fp32.onnx"),
        "pruned.onnx": export_onnx(pruned, example, out / "pruned.onnx"),
    }
    torch_save({"arch": vars(arch), "state_dict": model.state_dict()}, paths["fp32.pt"])
    save_pruned(paths["pruned.pt"], pruned, vars(arch))
    paths["int8.onnx"] = quantize_int8_onnx(paths["fp32.onnx"], calib, out / "int8.onnx")

    macs_fp32, macs_pruned = count_macs(model, SHAPE), count_macs(pruned, SHAPE)
    rows: list[dict] = []

    def add(name, file, macs, params, run, ort=False):
        lat = _latencies(run, example, args.batches, args.reps, args.warmup, ort)
        size = Path(file).stat().st_size if file else None
        rows.append(
            {"variant": name, "size_bytes": size, "macs": macs, "params": params, "latency": lat}
        )
        print(name, {b: round(v["median_ms"], 2) for b, v in lat.items()}, flush=True)

    load0 = os.getloadavg()
    n_fp32, n_pruned = count_params(model), count_params(pruned)
    add("fp32 eager", paths["fp32.pt"], macs_fp32, n_fp32, model)
    add(
        "fp32 ORT",
        paths["fp32.onnx"],
        macs_fp32,
        n_fp32,
        OrtClassifier(paths["fp32.onnx"]),
        ort=True,
    )
    add(
        "int8 QDQ ORT",
        paths["int8.onnx"],
        macs_fp32,
        n_fp32,
        OrtClassifier(paths["int8.onnx"]),
        ort=True,
    )
    add(f"pruned {args.prune_ratio:.0%} eager", paths["pruned.pt"], macs_pruned, n_pruned, pruned)
    add(
        f"pruned {args.prune_ratio:.0%} ORT",
        paths["pruned.onnx"],
        macs_pruned,
        n_pruned,
        OrtClassifier(paths["pruned.onnx"]),
        ort=True,
    )
    if torchao_available() and not args.no_torchao:
        # dynamic=False: one graph per batch size, compiled during warm-up (not timed)
        start = time.perf_counter()
        add("fp32 torch.compile", None, macs_fp32, n_fp32, torch.compile(model, dynamic=False))
        add(
            "int8 PT2E X86Inductor compile",
            None,
            macs_fp32,
            n_fp32,
            torch.compile(quantize_pt2e_x86(model, calib), dynamic=False),
        )
        print(f"torch.compile rows incl. compilation: {time.perf_counter() - start:.0f}s")

    meta = {
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(meta))
    print(markdown(rows, args.batches, paths))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


def markdown(rows: list[dict], batches: list[int], paths: dict[str, Path]) -> str:
    head = ["variant", "file MB", "MMACs/img", "params M"]
    head += [f"b={b} median ms (p90)" for b in batches]
    head += [f"b={b} img/s" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.1f}" if r["size_bytes"] else "-"
        cells = [r["variant"], size, f"{r['macs'] / 1e6:.0f}", f"{r['params'] / 1e6:.2f}"]
        lat = r["latency"]
        cells += [f"{lat[b]['median_ms']:.2f} ({lat[b]['p90_ms']:.2f})" for b in batches]
        cells += [f"{b / lat[b]['median_ms'] * 1e3:.0f}" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

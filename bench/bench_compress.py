"""Compression benchmarks, two modes.

1. Latency only (default): CPU latency / size / MACs of compressed resnet18 variants side by
   side in one run. resnet18 (small-image stem, 10 classes, 32x32 input, random weights) as
   the project's classifier (normalisation first). Variants: fp32 eager, fp32 ONNX Runtime,
   int8 QDQ ONNX Runtime (per-channel, calibrated on random images), 50% channel-pruned
   eager and ORT, and, when torchao is installed, fp32 torch.compile vs int8 PT2E
   X86Inductor torch.compile. Per batch size, all variants are timed round-robin (one call
   each per round) after `--warmup` untimed calls each (this is where torch.compile
   compiles), so load from other processes on a shared CPU hits every variant alike; the
   median of `--reps` rounds is reported.

       PYTHONPATH=src .venv/bin/python bench/bench_compress.py --reps 30 --json /tmp/bench.json

2. `--cifar ARCHIVE`: the compress *stage* on a trained model, with accuracy. A project is
   set up in `--workdir` (outside the repo) on the CIFAR-10 archive, validate / pack /
   train run (resnet18 preset at 32 px; `--limit-per-class` and `--epochs` set the training
   budget), then `compress` runs its search and the report gives, measured side by side in
   that one run: int8 size ratio and top-1 drop, structured pruning MACs and top-1 drop after
   fine-tune, the selected variant's CPU batch-1 latency against fp32 eager, and on a GPU
   machine the pruned model's GPU latency against the original.

       # CPU, brief training on a subset (what this 2-core machine can afford)
       PYTHONPATH=src .venv/bin/python bench/bench_compress.py \
           --cifar ../shared/datasets/cifar10-jpeg.tar.gz --workdir /tmp/vf-bench-cifar \
           --limit-per-class 200 --epochs 4 --device cpu --threads 1 --json /tmp/cifar.json
       # GPU session: full CIFAR-10, a real training budget
       PYTHONPATH=src .venv/bin/python bench/bench_compress.py \
           --cifar ../shared/datasets/cifar10-jpeg.tar.gz --workdir /tmp/vf-bench-cifar-gpu \
           --epochs 30 --device cuda --threads 4 --json /tmp/cifar_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from visionflow.compression.measure import (
    Runner,
    batch_of,
    count_macs,
    count_params,
    eager_runner,
    interleaved_latency_ms,
    model_size_bytes,
    ort_runner,
)
from visionflow.compression.onnx_export import export_onnx
from visionflow.compression.prune import save_pruned, structured_prune
from visionflow.compression.pt2e import quantize_pt2e_x86, torchao_available
from visionflow.compression.quantize import quantize_int8_onnx
from visionflow.core.files import torch_save
from visionflow.model.classifier import Arch, build_classifier

SHAPE = (1, 3, 32, 32)


@dataclass
class Variant:
    name: str
    file: Path | None
    macs: int
    params: int
    runner: Runner


def build_variants(args: argparse.Namespace, out: Path) -> list[Variant]:
    arch = Arch(name="resnet18", num_classes=10, image_size=32)
    model = build_classifier(arch).eval()
    example, calib = torch.rand(*SHAPE), torch.rand(128, *SHAPE[1:])
    pruned = structured_prune(model, example, ratio=args.prune_ratio)

    fp32_pt, pruned_pt = out / "fp32.pt", out / "pruned.pt"
    torch_save({"arch": vars(arch), "state_dict": model.state_dict()}, fp32_pt)
    save_pruned(pruned_pt, pruned, vars(arch))
    fp32_onnx = export_onnx(model, example, out / "fp32.onnx")
    pruned_onnx = export_onnx(pruned, example, out / "pruned.onnx")
    int8_onnx = quantize_int8_onnx(fp32_onnx, calib, out / "int8.onnx")

    full = (count_macs(model, SHAPE), count_params(model))
    small = (count_macs(pruned, SHAPE), count_params(pruned))
    pct = f"{args.prune_ratio:.0%}"
    variants = [
        Variant("fp32 eager", fp32_pt, *full, eager_runner(model)),
        Variant("fp32 ORT", fp32_onnx, *full, ort_runner(fp32_onnx)),
        Variant("int8 QDQ ORT", int8_onnx, *full, ort_runner(int8_onnx)),
        Variant(f"pruned {pct} eager", pruned_pt, *small, eager_runner(pruned)),
        Variant(f"pruned {pct} ORT", pruned_onnx, *small, ort_runner(pruned_onnx)),
    ]
    if torchao_available() and not args.no_torchao:
        import torch._inductor.config as inductor_config

        # freezing: weights become constants so Inductor can prepack them (int8 needs it);
        # dynamic=False: one graph per batch size, compiled in the (untimed) warm-up
        inductor_config.freezing = True
        int8_pt2e = quantize_pt2e_x86(model, calib)
        variants += [
            Variant(
                "fp32 torch.compile", None, *full, eager_runner(torch.compile(model, dynamic=False))
            ),
            Variant(
                "int8 PT2E X86Inductor compile",
                None,
                *full,
                eager_runner(torch.compile(int8_pt2e, dynamic=False)),
            ),
        ]
    return variants


def markdown(
    variants: list[Variant], sizes: dict[str, int | None], results: dict[int, dict[str, dict]]
) -> str:
    batches = list(results)
    head = ["variant", "file MB", "MMACs/img", "params M"]
    head += [f"b={b} median ms (p90)" for b in batches] + [f"b={b} img/s" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        size = f"{sizes[v.name] / 1e6:.1f}" if sizes[v.name] else "-"
        cells = [v.name, size, f"{v.macs / 1e6:.0f}", f"{v.params / 1e6:.2f}"]
        lat = {b: results[b][v.name] for b in batches}
        cells += [f"{lat[b]['median_ms']:.2f} ({lat[b]['p90_ms']:.2f})" for b in batches]
        cells += [f"{b / lat[b]['median_ms'] * 1e3:.0f}" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, default=None,
                    help="run the compress stage on a model trained on this CIFAR-10 archive")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vf-bench-cifar"))
    ap.add_argument("--limit-per-class", type=int, default=0, help="0 = every image")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--retrain", action="store_true", help="train again even if a model exists")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra params overrides, e.g. compress.structured_ratios=[0.3,0.5]")
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
    if args.cifar is not None:
        cifar_main(args)
        return

    with tempfile.TemporaryDirectory(prefix="vf-bench-") as tmp:
        variants = build_variants(args, Path(tmp))
        sizes = {v.name: model_size_bytes(v.file) if v.file else None for v in variants}
    load_before = os.getloadavg()
    results: dict[int, dict[str, dict]] = {}
    example = torch.rand(*SHAPE)
    with torch.inference_mode():
        for b in args.batches:
            x = batch_of(example, b)
            runners = {v.name: v.runner(x) for v in variants}
            results[b] = interleaved_latency_ms(runners, args.reps, args.warmup)
    meta = {
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "warmup": args.warmup,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(meta))
    print(markdown(variants, sizes, results))
    if args.json:
        rows = [
            {
                "variant": v.name,
                "size_bytes": sizes[v.name],
                "macs": v.macs,
                "params": v.params,
                "latency": {b: results[b][v.name] for b in results},
            }
            for v in variants
        ]
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))



# --------------------------------------------------------------------------- --cifar mode


def cifar_params(args: argparse.Namespace) -> dict[str, Any]:
    """Overrides of the repo's params.yaml for the CIFAR benchmark project."""
    over: dict[str, Any] = {
        "data.source": str(args.cifar.resolve()),
        "data.image_size": 32,
        "data.channels": 3,
        "data.val_fraction": 0.02,
        "data.limit_per_class": args.limit_per_class or None,
        "augment.hflip": 0.5,
        "augment.translate": 4,
        "augment.cutout": 0,
        "train.model": "resnet18",
        "train.epochs": args.epochs,
        "train.batch_size": 128,
        "train.lr": 0.1,
        "train.device": args.device,
        "train.threads": args.threads or 0,
        "train.progress": False,
        "compress.methods": ["int8", "prune", "structured", "pt2e"],
        "compress.objective": "cpu_latency",
        "compress.max_top1_drop": 1.0,
        "compress.structured_ratios": [0.3, 0.5],
        "compress.finetune_epochs": 2,
        "compress.stop_at_first_miss": False,
        "compress.latency_reps": args.reps,
        "compress.latency_reps_large": max(3, args.reps // 4),
        "compress.latency_warmup": args.warmup,
        "compress.threads": args.threads or 0,
    }
    for item in args.set:
        key, value = item.split("=", 1)
        over[key] = yaml.safe_load(value)
    return over


def cifar_main(args: argparse.Namespace) -> None:
    import time

    from visionflow.core.configfile import apply_overrides, load_params, read_params_file
    from visionflow.core.layout import Layout
    from visionflow.orchestration.stage_runner import run_stage

    repo = Path(__file__).resolve().parents[1]
    root = args.workdir.resolve()
    if repo in root.parents or root == repo:
        raise SystemExit("--workdir must be outside the repository")
    root.mkdir(parents=True, exist_ok=True)
    (root / "mlruns").mkdir(exist_ok=True)
    raw = apply_overrides(read_params_file(repo / "params.yaml"), cifar_params(args))
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    layout = Layout.at(root)
    params = load_params(layout.params)
    seconds: dict[str, float] = {}
    stages = ["validate", "pack", "train", "evaluate", "compress"]
    if layout.model.is_file() and layout.packed.is_file() and not args.retrain:
        stages = ["evaluate", "compress"]  # same workdir: reuse the trained model
    for name in stages:
        t0 = time.perf_counter()
        run_stage(name, params, layout)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
    report = json.loads(layout.compress_report.read_text())
    history = (layout.history.read_text().splitlines() if layout.history.is_file() else [])
    summary = cifar_summary(report)
    meta = {
        "archive": str(args.cifar), "workdir": str(root),
        "limit_per_class": args.limit_per_class, "epochs": args.epochs,
        "train_device": args.device, "stage_seconds": seconds,
        "train_history_tail": history[-1:] if history else [],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        **report["environment"],
    }
    print(json.dumps(meta))
    print(cifar_markdown(report))
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": summary,
                                         "report": report}, indent=2))


def cifar_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's benchmark figures, next to their targets."""
    v, base = report["variants"], report["original"]
    out: dict[str, Any] = {"original_top1": base["top1"]}
    if "int8" in v:
        i8, ref = v["int8"], v.get("onnx_fp32", {})
        out["int8"] = {
            "size_ratio_vs_model_pt": i8["size_ratio"],
            "size_ratio_vs_onnx_fp32": round(i8["size_bytes"] / ref["size_bytes"], 4)
            if ref else None,
            "top1_drop_points": i8["top1_drop_points"],
            "agreement_with_fp32": i8["agreement_with_fp32"],
            "target": "size <= 0.3x, drop <= 0.5 pt"}
    structured = {n: e for n, e in v.items() if e["family"] == "structured"}
    out["structured"] = {n: {"mac_ratio": e["mac_ratio"],
                             "macs_fewer_x": round(1 / e["mac_ratio"], 2),
                             "top1_drop_points": e["top1_drop_points"],
                             "target": ">= 2x fewer MACs, drop <= 1 pt"}
                         for n, e in structured.items()}
    sel = report["selected"]
    if sel:
        out["selected"] = {"name": sel["name"], "cpu_b1_ms": sel["cpu_b1_ms"],
                           "fp32_eager_b1_ms": base["cpu_b1_ms"],
                           "speedup_b1_vs_fp32_eager": sel["speedup_b1_vs_fp32_eager"],
                           "top1_drop_points": sel["top1_drop_points"],
                           "target": ">= 1.5x"}
    else:
        out["selected"] = {"name": None, "reason": report["selected_reason"]}
    gpu = {n: e.get("gpu_b1_ms") for n, e in [("original", base), *v.items()]
           if e.get("gpu_b1_ms") is not None}
    out["gpu_b1_ms"] = gpu or "not measured (no CUDA device)"
    return out


def cifar_markdown(report: dict[str, Any]) -> str:
    head = ["variant", "runtime", "top-1", "drop pt", "file MB", "size x", "MMACs", "MACs x",
            "CPU b1 ms", "CPU b32 ms", "b1 speed-up vs fp32 eager", "deployable", "selected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        val = r.get(key)
        return fmt.format(val) if isinstance(val, int | float) else "-"

    for r in report["pareto"]:
        def f(key: str, fmt: str, r: dict[str, Any] = r) -> str:
            return cell(r, key, fmt)

        lines.append("| " + " | ".join([
            r["name"], str(r["runtime"]), f("top1", "{:.4f}"), f("top1_drop_points", "{:+.2f}"),
            f"{r['size_bytes'] / 1e6:.2f}" if r.get("size_bytes") else "-",
            f("size_ratio", "{:.3f}"), f"{r['macs'] / 1e6:.0f}", f("mac_ratio", "{:.3f}"),
            f("cpu_b1_ms", "{:.2f}"), f("cpu_b32_ms", "{:.1f}"),
            f("speedup_b1_vs_fp32_eager", "{:.2f}"), str(r["deployable"]),
            "**yes**" if r["selected"] else ""]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

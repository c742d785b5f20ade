"""CPU latency / size / MACs of compressed resnet18 variants, side by side in one run.

resnet18 (small-image stem, 10 classes, 32x32 input, random weights: latency only) as the
project's classifier (normalisation first). Variants: fp32 eager, fp32 ONNX Runtime, int8 QDQ
ONNX Runtime (per-channel, calibrated on random images), 50% channel-pruned eager and ORT,
and, when torchao is installed, fp32 torch.compile vs int8 PT2E X86Inductor torch.compile.

Per batch size, all variants are timed round-robin (one call each per round) after `--warmup`
untimed calls each (this is where torch.compile compiles), so load from other processes on a
shared CPU hits every variant alike; the median of `--reps` rounds is reported.

    PYTHONPATH=src .venv/bin/python bench/bench_compress.py --reps 30 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.atomic import torch_save
from visionflow.classifier import Arch, build_classifier
from visionflow.compression.measure import (
    batch_of,
    count_macs,
    count_params,
    interleaved_latency_ms,
    model_size_bytes,
)
from visionflow.compression.onnx_export import OrtClassifier, export_onnx
from visionflow.compression.prune import save_pruned, structured_prune
from visionflow.compression.pt2e import quantize_pt2e_x86, torchao_available
from visionflow.compression.quantize import quantize_int8_onnx

SHAPE = (1, 3, 32, 32)
Runner = Callable[[torch.Tensor], Callable[[], Any]]  # input batch -> timed zero-arg call


@dataclass
class Variant:
    name: str
    file: Path | None
    macs: int
    params: int
    runner: Runner


def eager(model: nn.Module) -> Runner:
    return lambda x: lambda: model(x)


def ort(path: Path) -> Runner:
    clf = OrtClassifier(path)  # intra-op threads = torch.get_num_threads()

    def make(x: torch.Tensor) -> Callable[[], Any]:
        feed = {clf.input_name: x.numpy()}
        return lambda: clf.session.run(None, feed)

    return make


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
        Variant("fp32 eager", fp32_pt, *full, eager(model)),
        Variant("fp32 ORT", fp32_onnx, *full, ort(fp32_onnx)),
        Variant("int8 QDQ ORT", int8_onnx, *full, ort(int8_onnx)),
        Variant(f"pruned {pct} eager", pruned_pt, *small, eager(pruned)),
        Variant(f"pruned {pct} ORT", pruned_onnx, *small, ort(pruned_onnx)),
    ]
    if torchao_available() and not args.no_torchao:
        import torch._inductor.config as inductor_config

        # freezing: weights become constants so Inductor can prepack them (int8 needs it);
        # dynamic=False: one graph per batch size, compiled in the (untimed) warm-up
        inductor_config.freezing = True
        int8_pt2e = quantize_pt2e_x86(model, calib)
        variants += [
            Variant("fp32 torch.compile", None, *full, eager(torch.compile(model, dynamic=False))),
            Variant(
                "int8 PT2E X86Inductor compile",
                None,
                *full,
                eager(torch.compile(int8_pt2e, dynamic=False)),
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


if __name__ == "__main__":
    main()

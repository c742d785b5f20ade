"""Latency of built variants, side by side, and the machine it was measured on.

CPU: every variant in every runtime it has (torch eager, ONNX Runtime, the PT2E graph), at
each of `latency_batches`, timed round-robin (one call each per round) so load on a shared
CPU hits all alike; medians, warm-up excluded, threads recorded. GPU (when CUDA is present):
eager latency of every torch variant, synchronised after each call. Results go into each
variant's report row: `latency.cpu.<runtime>.b<N>`, `latency.gpu.torch.b<N>`, and the
headline `cpu_b1_ms` (of the runtime it deploys with), `cpu_b<largest>_ms`,
`speedup_b1_vs_fp32_eager` (against the first variant, the original), `torch_b1_ms`,
`gpu_b1_ms`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import onnxruntime
import torch
from torch import nn

from visionflow.compression.measure import (
    batch_of,
    cuda_available,
    interleaved_latency_ms,
)
from visionflow.compression.variants import Variant
from visionflow.core.config import CompressConfig
from visionflow.core.env import cpu_name


def measure_latency(variants: list[Variant], example: torch.Tensor,
                    cfg: CompressConfig) -> None:
    """Time every variant on the CPU (and the GPU when present); fill their rows."""
    threads = torch.get_num_threads()
    with torch.inference_mode():
        for b in cfg.latency_batches:
            x = batch_of(example, b)
            runners = {f"{v.name}|{rt}": make(x) for v in variants
                       for rt, make in v.runners.items()}
            reps = cfg.latency_reps if b == 1 else cfg.latency_reps_large
            results = interleaved_latency_ms(runners, reps, cfg.latency_warmup, threads)
            for v in variants:
                for rt in v.runners:
                    r = results[f"{v.name}|{rt}"]
                    cpu = v.entry.setdefault("latency", {}).setdefault("cpu", {})
                    cpu.setdefault(rt, {})[f"b{b}"] = {
                        "median_ms": round(r["median_ms"], 4), "p90_ms": round(r["p90_ms"], 4),
                        "threads": r["threads"], "reps": r["reps"]}
        if cuda_available():
            measure_gpu(variants, example, cfg)
    _headline(variants, max(cfg.latency_batches))


def _headline(variants: list[Variant], big: int) -> None:
    base = variants[0].entry["latency"]["cpu"]["torch"]
    for v in variants:
        cpu = v.entry["latency"]["cpu"]
        own = cpu.get(v.runtime) or next(iter(cpu.values()))
        v.entry["cpu_b1_ms"] = own["b1"]["median_ms"]
        v.entry[f"cpu_b{big}_ms"] = own[f"b{big}"]["median_ms"]
        v.entry["speedup_b1_vs_fp32_eager"] = round(base["b1"]["median_ms"]
                                                    / own["b1"]["median_ms"], 3)
        if "torch" in cpu and v.runtime != "torch":
            v.entry["torch_b1_ms"] = cpu["torch"]["b1"]["median_ms"]
        gpu = (v.entry["latency"].get("gpu") or {}).get("torch")
        if gpu:
            v.entry["gpu_b1_ms"] = gpu["b1"]["median_ms"]
    if "cpu_b32_ms" not in variants[0].entry:  # the Pareto table's column
        for v in variants:
            v.entry["cpu_b32_ms"] = None


def measure_gpu(variants: list[Variant], example: torch.Tensor, cfg: CompressConfig,
                device: str = "cuda") -> None:
    """Eager latency of every torch variant on `device` (a CUDA device; synchronised after
    each call), round-robin like the CPU timing, into `latency.gpu.torch.b<N>`."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    models = {v.name: copy.deepcopy(v.model).to(dev).eval() for v in variants
              if v.model is not None}
    name = torch.cuda.get_device_name(dev) if cuda else str(dev)
    for b in cfg.latency_batches:
        x = batch_of(example, b).to(dev)

        def call(m: nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            return lambda: (m(x), torch.cuda.synchronize(dev) if cuda else None)

        reps = cfg.latency_reps if b == 1 else cfg.latency_reps_large
        results = interleaved_latency_ms({n: call(m) for n, m in models.items()}, reps,
                                         cfg.latency_warmup)
        for v in variants:
            if v.name in results:
                r = results[v.name]
                gpu = v.entry.setdefault("latency", {}).setdefault("gpu", {})
                gpu.setdefault("torch", {})[f"b{b}"] = {
                    "median_ms": round(r["median_ms"], 4), "p90_ms": round(r["p90_ms"], 4),
                    "reps": r["reps"], "device": name}
    del models
    if cuda:
        torch.cuda.empty_cache()


def environment() -> dict[str, Any]:
    """The machine and library versions the timings come from."""
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

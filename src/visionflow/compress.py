"""Stage 5, compress: shrink the trained model and score every variant like the original.

Variants (chosen in `params.yaml` `compress.methods`):
- `int8`: ONNX export, then ONNX Runtime QDQ static quantization (per-channel),
  calibrated on training images;
- `prune`: global L1 unstructured magnitude pruning (`torch.nn.utils.prune`). Sparse
  weights in dense kernels give no speedup; the report says so.
Each variant is scored by `evaluate.score_logits` on the same test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from visionflow.atomic import atomic_dir, write_json
from visionflow.config import Params
from visionflow.layout import Layout


def _entry(path: Path, scores: dict[str, Any], base: dict[str, Any] | None,
           **extra: Any) -> dict[str, Any]:
    from visionflow.evaluate import headline

    size = path.stat().st_size
    entry = {"path": str(path.name), "size_bytes": size, **headline(scores), **extra}
    if base is not None:
        entry["size_ratio"] = round(size / base["size_bytes"], 4)
        entry["top1_drop"] = round(base["top1"] - scores["top1"], 4)
    return entry


def run_compress(params: Params, layout: Layout) -> dict[str, Any]:
    from visionflow import tracking
    from visionflow.augment import load_cache
    from visionflow.classifier import load_classifier
    from visionflow.evaluate import score_logits
    from visionflow.train import predict_logits

    cfg = params.compress
    model, arch = load_classifier(layout.model)
    cache = load_cache(layout.cache)
    test_x, test_y, classes = cache["test_x"], cache["test_y"], arch.classes
    topk = params.evaluate.topk

    def score(logits: torch.Tensor) -> dict[str, Any]:
        return score_logits(logits, test_y, classes, topk)

    base = _entry(layout.model, score(predict_logits(model, test_x)), None, format="torch fp32")
    report: dict[str, Any] = {"original": base, "variants": {}}
    with atomic_dir(layout.compress_models) as out:
        report["variants"] = _variants(cfg, params, layout, model, arch, cache, out, score, base)

    write_json(layout.compress_report, report)
    with tracking.stage_run(layout):
        import mlflow

        for name, v in report["variants"].items():
            mlflow.log_metrics({f"compress_{name}_top1": v["top1"],
                                f"compress_{name}_size_ratio": v["size_ratio"]})
        mlflow.log_artifact(str(layout.compress_report), "compress")
    return report


def _variants(cfg, params, layout, model, arch, cache, out: Path, score, base) -> dict:
    from visionflow.classifier import save_classifier
    from visionflow.train import predict_logits

    test_x = cache["test_x"]
    variants: dict[str, Any] = {}
    if "int8" in cfg.methods:
        from visionflow.compression.onnx_export import OrtClassifier, export_onnx
        from visionflow.compression.quantize import quantize_int8_onnx

        fp32, int8 = out / "model_fp32.onnx", out / "model_int8.onnx"
        export_onnx(model, test_x[:1].float().div(255), fp32)
        calib = _calibration(cache["train_x"], cfg.calibration_images, params.seed)
        quantize_int8_onnx(fp32, calib, int8)
        fp32_logits = torch.from_numpy(OrtClassifier(fp32).predict_logits(test_x.float() / 255))
        int8_logits = torch.from_numpy(OrtClassifier(int8).predict_logits(test_x.float() / 255))
        variants["onnx_fp32"] = _entry(fp32, score(fp32_logits), base, format="onnx fp32")
        agree = float((int8_logits.argmax(1) == fp32_logits.argmax(1)).float().mean())
        variants["int8"] = _entry(int8, score(int8_logits), base,
                                  format="onnx int8 QDQ per-channel",
                                  top1_agreement_with_fp32=round(agree, 4))
    if "prune" in cfg.methods:
        from visionflow.compression.prune import magnitude_prune

        pruned, sparsity = magnitude_prune(_fresh(layout), cfg.prune_amount)
        path = out / "model_pruned.pt"
        save_classifier(path, pruned, arch)
        variants["prune"] = _entry(
            path, score(predict_logits(pruned, test_x)), base,
            format="torch fp32, unstructured sparsity", sparsity=round(sparsity, 4),
            note="zeros in dense kernels: no size or speed gain unless stored sparse")
    return variants


def _fresh(layout: Layout):
    from visionflow.classifier import load_classifier

    return load_classifier(layout.model)[0]


def _calibration(train_x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train_x), generator=g)[:n]
    return train_x[idx].float().div(255)

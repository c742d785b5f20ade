"""Stage 5, compress: build compressed variants of the trained model and pick the best one
inside an accuracy budget.

The variants (`params.yaml` `compress.methods`: int8, prune, structured, lowrank, distill,
pt2e; strengths and fine-tuning there too) are built, saved and scored by
`compression.sweep.build_variants` (see `compression.variants` for each method) and timed by
`compression.latency`; fine-tuning and distillation use the packed data's train split and
run on `train.device`, scoring, export and timing on the CPU with `compress.threads`
threads. Every variant is scored on the test split in the form it deploys in.

The choice (`compression.pareto.choose`): the deployable variant with the lowest
`objective` (size | macs | cpu_latency) whose top-1 drop is at most `max_top1_drop` points
and which improves on the original. Writes `outputs/compress/models/`, `compress.json`
(every variant, the Pareto table, the choice), `metrics.json` (the DVC metric: the recommended
model against the original in a dozen numbers), `pareto.csv`, `pareto.png`; logs them to the
pipeline's MLflow run. `visionflow.mlops.compact.register_compact` registers the choice
after `register`.

Segmentation models (#19; `model.pt` carries `task: segmentation`): int8 and structured
variants (`compression.segmentation`), scored by mIoU on the test pairs at their own sizes
(read through `data.segmentation_feed.segmentation_pairs`), chosen within `max_miou_drop`
mIoU points; the Pareto table has `miou` where classifiers have `top1`.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import mlflow
import torch

from visionflow.compression import pareto
from visionflow.compression.context import Context
from visionflow.compression.latency import environment, measure_latency
from visionflow.compression.segmentation import SegContext, build_segmentation_variants
from visionflow.compression.sweep import Sweep, build_variants
from visionflow.core.config import CompressConfig, Params
from visionflow.core.files import atomic_dir, note_if_empty, write_json
from visionflow.core.layout import Layout
from visionflow.data.feed import is_shards, with_images
from visionflow.data.packed import load_packed
from visionflow.data.segmentation_feed import segmentation_pack, segmentation_pairs
from visionflow.data.segmentation_shards import BYTES_PER_PIXEL
from visionflow.mlops import tracking
from visionflow.model.classifier import load_classifier
from visionflow.model.inference import pick_device
from visionflow.model.segmentation import TASK, load_segmenter, saved_task
from visionflow.model.segmentation_fit import resize_pair
from visionflow.stages import main

LABELS = {"top1": "top-1", "miou": "mIoU"}
NO_VARIANTS = "no_variants.json"  # what models/ holds when no variant was written


def run(params: Params, layout: Layout) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = params.compress
    segmentation = saved_task(layout.model) == TASK
    metric, budget = ("miou", cfg.max_miou_drop) if segmentation else ("top1", cfg.max_top1_drop)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with atomic_dir(layout.compress_models) as out:
            if segmentation:
                ctx: Context | SegContext = _seg_context(params, layout, out)
                sweep = build_segmentation_variants(ctx, layout.model)
            else:
                ctx = _context(params, layout, out)
                sweep = build_variants(ctx, layout.model)
            measure_latency(sweep.variants, ctx.example, cfg)
            env = environment()
            note_if_empty(out, NO_VARIANTS, {
                "variants": 0, "methods": list(cfg.methods),
                "why": "no compressed variant was written; compress.json has the scores"})
    finally:
        torch.set_num_threads(threads_before)

    rows = [v.entry for v in sweep.variants]
    selected, reason = pareto.choose(rows, rows[0], cfg.objective, budget, metric)
    pareto.mark(rows, budget, selected, metric)
    for row in rows:  # files now live in the final models dir
        row["path"] = row["file"]
    base = ctx.base[metric]
    report = _report(cfg, sweep, base, selected, reason, env, time.perf_counter() - t0,
                     metric, budget)
    if segmentation:
        report["task"] = TASK
    pareto.write_csv(layout.pareto_csv, rows,
                     pareto.SEG_TABLE_COLUMNS if segmentation else pareto.TABLE_COLUMNS)
    pareto.plot(layout.pareto_png, rows, base, budget, selected, metric)
    write_json(layout.compress_report, report)
    write_json(layout.compress_metrics, dvc_metrics(report, metric))
    _log(layout, report, metric)
    print(_summary_line(report))
    return report


def _context(params: Params, layout: Layout, out: Path) -> Context:
    """The trained model, the packed data's splits and the options, for the library."""
    model, arch = load_classifier(layout.model)
    # shards: the splits decoded through resize + centre crop
    cache = with_images(layout, load_packed(layout.packed), ("train", "test"),
                        params.data.shard_cache_bytes, params.evaluate.batch_size)
    cfg = params.compress
    if not isinstance(cache["train_x"], torch.Tensor) and cfg.finetune_images is None:
        # shards: the fine-tune set is held decoded; null = what fits the tensor budget
        fits = params.data.storage_budget_bytes // (cache["channels"] * cache["image_size"]**2)
        cfg = cfg.model_copy(update={"finetune_images": max(1, fits)})
    return Context(model, arch, cache["train_x"], cache["train_y"], cache["test_x"],
                   cache["test_y"], cfg=cfg, evaluate=params.evaluate,
                   seed=params.seed, device=pick_device(params.train.device), out=out)


def _seg_context(params: Params, layout: Layout, out: Path) -> SegContext:
    """The trained segmenter, a bounded train subset resized to `segmentation.image_size` (int8
    calibration, fine-tuning) and the test pairs, streamed at their own sizes."""
    model, arch = load_segmenter(layout.model)
    cfg, side = params.compress, params.segmentation.image_size
    pack = segmentation_pack(layout)  # read once: in tensor mode it holds the pixels
    limit = max(cfg.calibration_images, cfg.finetune_images or 0) or None
    if cfg.finetune_images is None and "structured" in cfg.methods:
        # fine-tuning on the whole train split, as for classifiers; shards: what fits the
        # tensor budget (the subset is held decoded)
        limit = (params.data.storage_budget_bytes // (BYTES_PER_PIXEL * side * side)
                 if is_shards(pack) else None)
    train = [resize_pair(x, y, (side, side))
             for x, y in segmentation_pairs(params, layout, "train", limit, pack)]
    return SegContext(model, arch, lambda: segmentation_pairs(params, layout, "test", pack=pack),
                      torch.stack([x for x, _ in train]), torch.stack([y for _, y in train]),
                      cfg=cfg, seed=params.seed, device=pick_device(params.train.device),
                      out=out)


def _report(cfg: CompressConfig, sweep: Sweep, base_score: float, selected: str | None,
            reason: str, env: dict[str, Any], seconds: float, metric: str = "top1",
            budget: float | None = None) -> dict[str, Any]:
    budget = cfg.max_top1_drop if budget is None else budget
    variants = {v.name: v.entry for v in sweep.variants[1:]}
    chosen = None
    if selected is not None:
        e = variants[selected]
        chosen = {"name": selected, "file": e["file"], "runtime": e["runtime"],
                  "recipe": e["recipe"], metric: e[metric],
                  f"{metric}_drop_points": e[f"{metric}_drop_points"],
                  "size_bytes": e["size_bytes"],
                  "size_ratio": e.get("size_ratio"), "macs": e["macs"],
                  "mac_ratio": e.get("mac_ratio"), "cpu_b1_ms": e["cpu_b1_ms"],
                  "speedup_b1_vs_fp32_eager": e["speedup_b1_vs_fp32_eager"]}
    return {
        "objective": cfg.objective,
        f"max_{metric}_drop": budget,
        f"budget_{metric}": round(base_score - budget / 100, 6),
        "selected": chosen,
        "selected_reason": reason,
        "recommended": selected or "original",
        "recommended_reason": reason,
        "original": sweep.variants[0].entry,
        "variants": variants,
        "skipped": sweep.skipped,
        "pareto": pareto.table_rows([v.entry for v in sweep.variants],
                                    pareto.SEG_TABLE_COLUMNS if metric == "miou"
                                    else pareto.TABLE_COLUMNS),
        "environment": env,
        "notes": [
            "mIoU drop in points (percent); every variant scored in its deploy form on the "
            "test pairs, each at its own size" if metric == "miou" else
            "top-1 drop in points (percent); every variant scored in its deploy form on the "
            "test split by evaluate.model_logits + score_logits",
            "latency: medians of round-robin timing on this machine, warm-up excluded; "
            "`runtime` says which runtime a variant deploys with (torch eager or ONNX Runtime)",
            "the choice is made on the test split, the split every number here is scored on",
        ],
        "seconds": round(seconds, 2),
    }


def _chosen_keys(metric: str) -> tuple[str, ...]:
    """What says how a variant compares with the original (DVC metric, MLflow metrics)."""
    return (metric, f"{metric}_drop_points", "size_ratio", "mac_ratio", "cpu_b1_ms",
            "speedup_b1_vs_fp32_eager")


def dvc_metrics(report: dict[str, Any], metric: str) -> dict[str, Any]:
    """`metrics.json`, compress's DVC metric: the recommended model (the original when no
    variant fits) against the original, with the same keys every run, so that `dvc metrics
    diff` lines up. `compress.json` is an out: DVC makes a column of each of its leaves."""
    name = report["recommended"]
    chosen = report["original"] if name == "original" else report["variants"][name]

    def numbers(entry: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
        return {k: entry[k] for k in keys if isinstance(entry.get(k), int | float)}

    return {"variants": len(report["variants"]),
            "original": numbers(report["original"], (metric, "size_bytes", "macs",
                                                     "cpu_b1_ms")),
            "recommended": {"name": name, **numbers(chosen, _chosen_keys(metric))}}


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", text)


def _log(layout: Layout, report: dict[str, Any], metric: str = "top1") -> None:
    with tracking.stage_run(layout):
        metrics: dict[str, float] = {}
        for name, v in report["variants"].items():
            key = _metric_name(name)
            for field_ in (metric, "size_ratio", "mac_ratio", "cpu_b1_ms"):
                if isinstance(v.get(field_), int | float):
                    metrics[f"variants/{key}/{field_}"] = float(v[field_])
        sel = report["selected"]
        if sel:
            metrics.update({f"variants/selected/{k}": float(sel[k])
                            for k in _chosen_keys(metric)
                            if isinstance(sel.get(k), int | float)})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"compress_selected": sel["name"] if sel else "none",
                         "compress_objective": report["objective"],
                         "compress_reason": report["selected_reason"][:5000]})
        for path in (layout.compress_report, layout.compress_metrics, layout.pareto_csv,
                     layout.pareto_png):
            mlflow.log_artifact(str(path), "compress")


def _summary_line(report: dict[str, Any]) -> str:
    sel = report["selected"]
    if not sel:
        return f"compress: nothing selected ({report['selected_reason']})"
    metric = "miou" if "miou" in sel else "top1"
    return (f"compress: selected {sel['name']} ({report['objective']}): "
            f"{sel['size_bytes'] / 1e6:.2f} MB ({sel['size_ratio']}x), "
            f"{sel['mac_ratio']}x MACs, CPU b1 {sel['cpu_b1_ms']:.2f} ms "
            f"({sel['speedup_b1_vs_fp32_eager']}x fp32 eager), {LABELS[metric]} "
            f"{sel[metric]:.4f} ({0.0 - sel[f'{metric}_drop_points']:+.2f} pt against fp32)")


if __name__ == "__main__":
    main("compress", run)

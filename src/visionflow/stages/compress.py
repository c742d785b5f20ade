"""Stage 5, compress: build compressed variants of the trained model and pick the best one
inside an accuracy budget.

The variants (`params.yaml` `compress.methods`: int8, prune, structured, lowrank, distill,
pt2e; strengths and fine-tuning there too) are built, saved and scored by
`compression.sweep.build_variants` (see `compression.variants` for each method) and timed by
`compression.latency`; fine-tuning and distillation use the pack cache's train split and
run on `train.device`, scoring, export and timing on the CPU with `compress.threads`
threads. Every variant is scored on the test split in the form it deploys in.

The choice (`compression.pareto.choose`): the deployable variant with the lowest
`objective` (size | macs | cpu_latency) whose top-1 drop is at most `max_top1_drop` points
and which improves on the original. Writes `outputs/compress/models/`, `compress.json`
(every variant, the Pareto table, the choice), `pareto.csv`, `pareto.png`; logs them to the
pipeline's MLflow run. `visionflow.mlops.compact.register_compact` registers the choice
after `register`.
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
from visionflow.compression.sweep import Sweep, build_variants
from visionflow.core.config import CompressConfig, Params
from visionflow.core.files import atomic_dir, write_json
from visionflow.core.layout import Layout
from visionflow.data.cache import load_cache
from visionflow.data.feed import with_images
from visionflow.mlops import tracking
from visionflow.model.classifier import load_classifier
from visionflow.model.inference import pick_device
from visionflow.stages import main


def run(params: Params, layout: Layout) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = params.compress
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with atomic_dir(layout.compress_models) as out:
            ctx = _context(params, layout, out)
            sweep = build_variants(ctx, layout.model)
            measure_latency(sweep.variants, ctx.example, cfg)
            env = environment()
    finally:
        torch.set_num_threads(threads_before)

    rows = [v.entry for v in sweep.variants]
    selected, reason = pareto.choose(rows, rows[0], cfg.objective, cfg.max_top1_drop)
    pareto.mark(rows, cfg.max_top1_drop, selected)
    for row in rows:  # files now live in the final models dir
        row["path"] = row["file"]
    base_top1 = ctx.base["top1"]
    report = _report(cfg, sweep, base_top1, selected, reason, env, time.perf_counter() - t0)
    pareto.write_csv(layout.pareto_csv, rows)
    pareto.plot(layout.pareto_png, rows, base_top1, cfg.max_top1_drop, selected)
    write_json(layout.compress_report, report)
    _log(layout, report)
    print(_summary_line(report))
    return report


def _context(params: Params, layout: Layout, out: Path) -> Context:
    """The trained model, the pack cache's splits and the options, for the library."""
    model, arch = load_classifier(layout.model)
    # shards: the splits decoded through resize + centre crop
    cache = with_images(layout, load_cache(layout.cache), ("train", "test"))
    return Context(model, arch, cache["train_x"], cache["train_y"], cache["test_x"],
                   cache["test_y"], cfg=params.compress, evaluate=params.evaluate,
                   seed=params.seed, device=pick_device(params.train.device), out=out)


def _report(cfg: CompressConfig, sweep: Sweep, base_top1: float, selected: str | None,
            reason: str, env: dict[str, Any], seconds: float) -> dict[str, Any]:
    variants = {v.name: v.entry for v in sweep.variants[1:]}
    chosen = None
    if selected is not None:
        e = variants[selected]
        chosen = {"name": selected, "file": e["file"], "runtime": e["runtime"],
                  "recipe": e["recipe"], "top1": e["top1"],
                  "top1_drop_points": e["top1_drop_points"], "size_bytes": e["size_bytes"],
                  "size_ratio": e.get("size_ratio"), "macs": e["macs"],
                  "mac_ratio": e.get("mac_ratio"), "cpu_b1_ms": e["cpu_b1_ms"],
                  "speedup_b1_vs_fp32_eager": e["speedup_b1_vs_fp32_eager"]}
    return {
        "objective": cfg.objective,
        "max_top1_drop": cfg.max_top1_drop,
        "budget_top1": round(base_top1 - cfg.max_top1_drop / 100, 6),
        "selected": chosen,
        "selected_reason": reason,
        "recommended": selected or "original",
        "recommended_reason": reason,
        "original": sweep.variants[0].entry,
        "variants": variants,
        "skipped": sweep.skipped,
        "pareto": pareto.table_rows([v.entry for v in sweep.variants]),
        "environment": env,
        "notes": [
            "top-1 drop in points (percent); every variant scored in its deploy form on the "
            "test split by evaluate.model_logits + score_logits",
            "latency: medians of round-robin timing on this machine, warm-up excluded; "
            "`runtime` says which runtime a variant deploys with (torch eager or ONNX Runtime)",
            "the choice is made on the test split, the split every number here is scored on",
        ],
        "seconds": round(seconds, 2),
    }


def _metric_name(text: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", text)


def _log(layout: Layout, report: dict[str, Any]) -> None:
    with tracking.stage_run(layout):
        metrics: dict[str, float] = {}
        for name, v in report["variants"].items():
            key = _metric_name(name)
            for field_ in ("top1", "size_ratio", "mac_ratio", "cpu_b1_ms"):
                if isinstance(v.get(field_), int | float):
                    metrics[f"variants/{key}/{field_}"] = float(v[field_])
        sel = report["selected"]
        if sel:
            metrics.update({f"variants/selected/{k}": float(sel[k]) for k in
                            ("top1", "top1_drop_points", "size_ratio", "mac_ratio",
                             "cpu_b1_ms", "speedup_b1_vs_fp32_eager")
                            if isinstance(sel.get(k), int | float)})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"compress_selected": sel["name"] if sel else "none",
                         "compress_objective": report["objective"],
                         "compress_reason": report["selected_reason"][:5000]})
        for path in (layout.compress_report, layout.pareto_csv, layout.pareto_png):
            mlflow.log_artifact(str(path), "compress")


def _summary_line(report: dict[str, Any]) -> str:
    sel = report["selected"]
    if not sel:
        return f"compress: nothing selected ({report['selected_reason']})"
    return (f"compress: selected {sel['name']} ({report['objective']}): "
            f"{sel['size_bytes'] / 1e6:.2f} MB ({sel['size_ratio']}x), "
            f"{sel['mac_ratio']}x MACs, CPU b1 {sel['cpu_b1_ms']:.2f} ms "
            f"({sel['speedup_b1_vs_fp32_eager']}x fp32 eager), top-1 {sel['top1']:.4f} "
            f"({sel['top1_drop_points']:+.2f} pt)")


if __name__ == "__main__":
    main("compress", run)

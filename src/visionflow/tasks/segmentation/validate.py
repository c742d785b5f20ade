"""Validate for `task: segmentation`: pair images with masks, gate the pairs with a Great
Expectations suite (by name), quarantine bad pairs with a reason (nothing is moved or
deleted) and measure drift of the per-class pixel frequency against the champion's.

The same files as classification's validate: `manifest.csv` (one row per pair: image, mask,
split, pair sha256), `quarantine.csv`, `validation.json`, `data_summary.json` (class pixel
counts of train: what drift compares) and the Data Docs. The gate fails on a hard
expectation, on more quarantined pairs than `validate.max_quarantine_fraction`, or (with
`validate.drift: fail`) on drift; the one-line error says which.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.errors import ValidationFailed
from visionflow.core.files import atomic_dir, sha256_file, write_csv, write_json
from visionflow.core.layout import Layout
from visionflow.data.expectations import Check, run_gx
from visionflow.data.quality_report import print_gate_table, split_rows, write_report
from visionflow.data.segmentation_layout import Pair, scan_segmentation
from visionflow.data.segmentation_stats import class_pixel_summary, pixel_frequency_drift
from visionflow.data.source import dvc_record, resolve_source, source_path
from visionflow.mlops.lineage import champion_summary, split_against_champion
from visionflow.mlops.tracking import log_validation

# quarantine reason -> the property of a pair it breaks (one GX expectation each)
PROPERTIES = {
    "has_image": ("mask_without_image", "listed_without_files"),
    "has_mask": ("image_without_mask",),
    "one_to_one": ("duplicate_stem",),
    "readable": ("unreadable_image", "unreadable_mask"),
    "same_size": ("size_mismatch",),
    "single_channel": ("multi_channel_mask",),
    "values_in_classes": ("value_outside_classes", "rgb_colour_not_in_palette"),
}
DESCRIBE = {
    "has_image": "every mask has an image with its stem",
    "has_mask": "every image has exactly one mask with its stem",
    "one_to_one": "no two images (or masks) share a stem",
    "readable": "images and masks decode",
    "same_size": "each mask has its image's width and height",
    "single_channel": "masks are single-channel (index/palette) or VOC-colour RGB",
    "values_in_classes": "mask values are declared classes or 255 (ignore)",
}
MANIFEST_HEADER = ["path", "mask", "stem", "split", "sha256", "quarantine_reason", "error"]


@dataclass
class SegValidateResult:
    success: bool
    summary: dict[str, Any]


def pair_sha256(root: Path, pair: Pair) -> str:
    both = sha256_file(root / pair.image) + sha256_file(root / pair.mask)
    return hashlib.sha256(both.encode()).hexdigest()


def run(params: Params, layout: Layout) -> SegValidateResult:
    t0 = time.perf_counter()
    d = params.data
    root = resolve_source(source_path(params, layout), layout.extract_cache)
    scan = scan_segmentation(root, d.val_fraction, d.test_fraction, d.split_seed)
    rows = [{"path": p.image, "mask": p.mask, "stem": p.stem, "split": p.split,
             "sha256": pair_sha256(root, p), "quarantine_reason": "", "error": ""}
            for p in scan.pairs]
    rows += [{"path": q.path, "mask": "", "stem": q.stem, "split": "", "sha256": "",
              "quarantine_reason": q.reason, "error": q.detail} for q in scan.quarantined]
    write_csv(layout.manifest, ([r[k] for k in MANIFEST_HEADER] for r in rows),
              header=MANIFEST_HEADER)
    write_csv(layout.quarantine, ([r["path"], r["split"], r["stem"], r["quarantine_reason"],
                                   r["error"]] for r in rows if r["quarantine_reason"]),
              header=["path", "split", "stem", "reason", "detail"])
    usable = [r for r in rows if not r["quarantine_reason"]]
    dhash = hashlib.sha256("".join(f"{r['path']}\t{r['split']}\t{r['sha256']}\n" for r in
                                   sorted(usable, key=lambda r: r["path"])).encode()
                           ).hexdigest()[:32]
    pixels = class_pixel_summary(root, scan.pairs, scan.classes, split="train")
    data_summary = {"task": "segmentation", "classes": scan.classes, **pixels,
                    "data_hash": dhash, "source": d.source}
    write_json(layout.data_summary, data_summary)

    checks = build_checks(params)
    with atomic_dir(layout.data_docs) as docs:
        results = run_gx(checks, _tables(rows), docs)
    drift = _drift(params, layout, data_summary)
    split = split_against_champion(layout, scan.scheme, params.register_.model_name,
                                   params.register_.alias)
    failed = [r for r in results if not r["success"]]
    quarantined = Counter(r["quarantine_reason"] for r in rows if r["quarantine_reason"])
    n_bad = sum(quarantined.values())
    drift_failed = drift.get("mode") == "fail" and drift.get("status") == "drift"
    budget = params.validate_.max_quarantine_fraction
    summary = {
        "success": not failed and not drift_failed,
        "task": "segmentation",
        "layout": scan.layout,
        "dataset_root": str(root),
        "source": d.source,
        **dvc_record(params, layout),  # the .dvc file, its origin
        "data_hash": dhash,
        "classes": scan.classes,
        "classes_declared": scan.classes_declared,
        "counts": {s: {"pairs": n} for s, n in
                   sorted(Counter(r["split"] for r in usable).items())},
        "files": len(rows),
        "usable": len(usable),
        "quarantined": dict(quarantined),
        "quarantine": {"files": n_bad, "fraction": round(n_bad / len(rows), 6) if rows else 0.0,
                       "budget": budget, "exceeded": any(
                           r.get("kind") == "budget" for r in failed),
                       "examples": _examples(rows)},
        "unlisted_masks": scan.unlisted[:20],
        "split_scheme": scan.scheme,
        "split": split,
        "failed_expectations": [r["description"] for r in failed],
        "expectations": results,
        "drift": drift,
        "data_summary": data_summary,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(layout.validation, summary)
    write_report(summary, layout.data_docs)
    _print(summary)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        log_validation(layout)
    if not summary["success"]:
        raise ValidationFailed(_failure(summary))
    return SegValidateResult(True, summary)


def build_checks(params: Params) -> list[Check]:
    budget = params.validate_.max_quarantine_fraction
    checks = [Check("pairs", "ExpectColumnValuesToBeInSet",
                    {"column": name, "value_set": [True], "mostly": 1.0 - budget},
                    f"{DESCRIBE[name]} (at least {1 - budget:.2%} of the pairs; "
                    f"validate.max_quarantine_fraction={budget})", "budget")
              for name in PROPERTIES]
    checks += [
        Check("usable", "ExpectColumnValuesToBeUnique", {"column": "path"},
              "each usable image is in exactly one pair"),
        Check("usable", "ExpectColumnValuesToBeUnique", {"column": "mask"},
              "each usable mask is in exactly one pair"),
        Check("usable", "ExpectColumnValuesToBeInSet",
              {"column": "split", "value_set": ["train", "val", "test"]},
              "every pair is in train, val or test"),
        Check("train", "ExpectTableRowCountToBeBetween", {"min_value": 1},
              "the train split has at least one pair"),
    ]
    return checks


def _tables(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import pandas as pd  # with GX, only when the suite runs (as data.expectations)

    table = pd.DataFrame([{**r, **{name: r["quarantine_reason"] not in reasons
                                   for name, reasons in PROPERTIES.items()}} for r in rows],
                         columns=MANIFEST_HEADER + list(PROPERTIES))
    usable = table[table["quarantine_reason"] == ""].reset_index(drop=True)
    return {"pairs": table, "usable": usable,
            "train": usable[usable["split"] == "train"].reset_index(drop=True)}


def _drift(params: Params, layout: Layout, current: dict[str, Any]) -> dict[str, Any]:
    mode = params.validate_.drift
    if mode == "off":
        return {"mode": "off", "status": "off"}
    reg = params.register_
    reference, info = champion_summary(layout, reg.model_name, reg.alias)
    if reference is None or "pixels" not in reference:
        return {"mode": mode, "status": "no_reference", "champion": info}
    s = params.segmentation
    report = pixel_frequency_drift(current, reference, s.drift_psi, s.drift_change)
    return {"mode": mode, "status": "drift" if report["drift"] else "ok", "champion": info,
            "checks": {"class_pixels": {**report, "threshold": s.drift_psi}},
            "message": report["message"]}


def _examples(rows: list[dict[str, Any]], per_reason: int = 3) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in rows:
        if (reason := r["quarantine_reason"]) and len(out.setdefault(reason, [])) < per_reason:
            out[reason].append(r["path"])
    return out


def _failure(summary: dict[str, Any]) -> str:
    parts = []
    q = summary["quarantine"]
    if q["exceeded"]:
        why = "; ".join(f"{k}: {', '.join(v)}" for k, v in q["examples"].items())
        parts.append(f"quarantine budget exceeded: {q['files']} of {summary['files']} pairs "
                     f"({q['fraction']:.2%}) > validate.max_quarantine_fraction={q['budget']} "
                     f"({why}; see outputs/validate/quarantine.csv)")
    hard = [r for r in summary["expectations"] if not r["success"] and r["kind"] == "hard"]
    parts += [f"hard expectation failed: {r['expectation']}({r['column']}): "
              f"{r['description']}: observed {r['observed']}" for r in hard[:3]]
    d = summary["drift"]
    if d.get("mode") == "fail" and d.get("status") == "drift":
        champ = d.get("champion", {})
        parts.append(f"data drift against {champ.get('model')} v{champ.get('version')}: "
                     f"{d['message']} (validate.drift=fail)")
    return "data gate failed: " + "; ".join(parts)


def _print(summary: dict[str, Any]) -> None:
    split = summary.get("split") or {}
    con = print_gate_table(f"segmentation data gate: {summary['layout']} ({summary['files']} "
                           f"pairs, {summary['usable']} usable; classes "
                           f"{', '.join(summary['classes'])})", summary["expectations"],
                           split_rows(split))
    if split.get("status") == "new_split":
        con.print(f"[yellow]{split['message']}[/]")
    if summary["quarantined"]:
        con.print("quarantined: " + ", ".join(f"{k}={v}" for k, v in
                                              sorted(summary["quarantined"].items()))
                  + "  -> outputs/validate/quarantine.csv (files left in place)")
    d = summary["drift"]
    if d.get("status") == "drift":
        con.print(f"[yellow]class pixel drift against the champion: {d['message']}[/]")

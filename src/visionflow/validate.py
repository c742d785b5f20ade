"""Stage 1, validate: manifest the dataset and gate it with a Great Expectations suite.

Writes `manifest.csv`, `quarantine.csv`, `validation.json` and GX Data Docs under
`outputs/validate/`. Unusable files are quarantined with a reason code (never moved or
deleted); the stage fails when a hard expectation fails, naming it and example files.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.atomic import atomic_dir, atomic_path, write_json
from visionflow.config import Params
from visionflow.errors import ValidationFailed
from visionflow.layout import Layout
from visionflow.manifest import (
    build_manifest,
    class_counts,
    data_hash,
    usable_rows,
    write_manifest,
)


@dataclass
class Check:
    """One expectation: GX class name, kwargs, which table it runs on, plain description."""

    table: str
    expectation: str
    kwargs: dict[str, Any]
    description: str


@dataclass
class ValidateResult:
    success: bool
    summary: dict[str, Any]


def build_checks(params: Params, labels: list[str]) -> list[Check]:
    v = params.validate_
    budget = v.max_quarantine_fraction
    return [
        Check("files", "ExpectColumnValuesToBeInSet",
              {"column": "quarantine_reason", "value_set": [""], "mostly": 1.0 - budget},
              f"usable files (not quarantined) are at least {1 - budget:.2%} of all files"),
        Check("files", "ExpectColumnValuesToBeInSet",
              {"column": "decodable", "value_set": [True], "mostly": 1.0 - budget},
              f"at least {1 - budget:.2%} of files decode as images"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "label", "value_set": labels},
              "every image carries a known label"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "width", "min_value": v.min_width, "max_value": v.max_width},
              f"image width within {v.min_width}..{v.max_width} px"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "height", "min_value": v.min_height, "max_value": v.max_height},
              f"image height within {v.min_height}..{v.max_height} px"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "mode", "value_set": v.allowed_modes},
              f"image modes in {v.allowed_modes}"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "bytes", "max_value": v.max_bytes},
              f"file size at most {v.max_bytes} bytes"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "splits_sharing_file", "value_set": [1]},
              "no file (by sha256) appears in two splits"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "duplicate_in_split", "value_set": [False],
               "mostly": 1.0 - v.max_duplicate_rate},
              f"duplicates within a split at most {v.max_duplicate_rate:.2%}"),
        Check("classes", "ExpectColumnMinToBeBetween",
              {"column": "train_count", "min_value": v.min_images_per_class},
              f"at least {v.min_images_per_class} training images per class"),
        Check("classes", "ExpectColumnValuesToBeInSet",
              {"column": "in_train", "value_set": [True]},
              "every val/test class also appears in train"),
        Check("classes", "ExpectColumnMaxToBeBetween",
              {"column": "imbalance_ratio", "max_value": v.max_imbalance_ratio},
              f"largest/smallest class ratio at most {v.max_imbalance_ratio}"),
    ]


def _tables(rows: list[dict[str, Any]], labels: list[str], empty_classes: list[str]):
    import pandas as pd

    files = pd.DataFrame(rows)
    files["decodable"] = files["decodable"].astype(bool)
    images = files[files["quarantine_reason"].isin(["", "cross_split_duplicate"])].copy()
    images = images[images["decodable"]]
    for col in ("width", "height", "bytes"):
        images[col] = pd.to_numeric(images[col])
    images["splits_sharing_file"] = images.groupby("sha256")["split"].transform("nunique")
    images.loc[images["quarantine_reason"] != "", "splits_sharing_file"] = 1
    images["duplicate_in_split"] = images.duplicated(["split", "sha256"], keep="first")
    train = Counter(r["label"] for r in usable_rows(rows) if r["split"] == "train")
    all_labels = sorted({r["label"] for r in usable_rows(rows)} | set(labels)
                        | set(empty_classes))
    smallest = max(1, min((train[c] for c in all_labels), default=1))
    biggest = max((train[c] for c in all_labels), default=0)
    classes = pd.DataFrame([
        {"label": c, "train_count": train[c], "in_train": train[c] > 0,
         "imbalance_ratio": biggest / smallest}
        for c in all_labels
    ])
    return {"files": files, "images": images, "classes": classes}


def run_gx(checks: list[Check], tables: dict[str, Any], docs_dir: Path | None) -> list[dict]:
    """Run the suite with a real GX ephemeral context; optionally build Data Docs."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    if docs_dir is not None:
        ctx.add_data_docs_site(site_name="local", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = ctx.data_sources.add_pandas("visionflow")
    results = []
    for table, df in tables.items():
        table_checks = [c for c in checks if c.table == table]
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"visionflow_{table}"))
        for c in table_checks:
            suite.add_expectation(getattr(gx.expectations, c.expectation)(
                **c.kwargs, description=c.description))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["local"])] \
            if docs_dir is not None else []
        cp = ctx.checkpoints.add(gx.Checkpoint(
            name=f"cp_{table}", validation_definitions=[vd], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5}))
        run = cp.run(batch_parameters={"dataframe": df})
        for vr in run.run_results.values():
            for r in vr.results:
                results.append(_result_row(table, r, df))
    return results


def _result_row(table: str, r: Any, df: Any) -> dict[str, Any]:
    cfg = r.expectation_config
    res = r.result or {}
    examples: list[str] = []
    idx = res.get("partial_unexpected_index_list") or []
    if idx and "path" in df.columns:
        examples = [str(df.loc[i, "path"]) if i in df.index else str(i) for i in idx[:5]]
    elif idx and "label" in df.columns:
        examples = [str(df.loc[i, "label"]) for i in idx[:5] if i in df.index]
    elif not examples:
        examples = [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]]
    observed = res.get("observed_value", res.get("unexpected_percent"))
    if res.get("unexpected_percent") is not None:
        observed = f"{res['unexpected_count']} unexpected ({res['unexpected_percent']:.2f}%)"
    return {
        "table": table,
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column"),
        "description": cfg.description,
        "success": bool(r.success),
        "observed": observed if observed is None or isinstance(observed, str | int | float)
        else str(observed),
        "examples": examples,
    }


def run_validate(params: Params, layout: Layout) -> ValidateResult:
    t0 = time.perf_counter()
    root, rows, empty_classes = build_manifest(params, layout)
    labels = params.validate_.labels or sorted(
        {r["label"] for r in usable_rows(rows) if r["split"] == "train"})
    checks = build_checks(params, labels)
    tables = _tables(rows, labels, empty_classes)

    write_manifest(layout.manifest, rows)
    _write_quarantine(layout.quarantine, rows)
    with atomic_dir(layout.data_docs) as docs:
        results = run_gx(checks, tables, docs)
    failed = [r for r in results if not r["success"]]
    quarantined = Counter(r["quarantine_reason"] for r in rows if r["quarantine_reason"])
    summary = {
        "success": not failed,
        "dataset_root": str(root),
        "source": params.data.source,
        "data_hash": data_hash(rows),
        "classes": labels,
        "counts": class_counts(rows),
        "files": len(rows),
        "usable": len(usable_rows(rows)),
        "quarantined": dict(quarantined),
        "empty_classes": empty_classes,
        "failed_expectations": [r["description"] for r in failed],
        "expectations": results,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(layout.validation, summary)
    if failed:
        raise ValidationFailed(failure_line(failed))
    return ValidateResult(True, summary)


def failure_line(failed: list[dict[str, Any]]) -> str:
    parts = []
    for r in failed[:3]:
        ex = f" e.g. {', '.join(r['examples'][:3])}" if r["examples"] else ""
        parts.append(f"{r['expectation']}({r['column']}): {r['description']}: "
                     f"observed {r['observed']}{ex}")
    more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
    return f"data gate failed: {'; '.join(parts)}{more}"


def _write_quarantine(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label", "reason", "detail"])
        for r in rows:
            if r["quarantine_reason"]:
                w.writerow([r["path"], r["split"], r["label"], r["quarantine_reason"],
                            r["error"]])

"""The dataset manifest: one row per file, the contract between validate and augment."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from visionflow.atomic import atomic_path
from visionflow.config import Params
from visionflow.errors import DataError
from visionflow.layout import Layout

COLUMNS = [
    "path", "split", "label", "sha256", "bytes", "format", "width", "height", "mode",
    "decodable", "quarantine_reason", "error", "mean", "std",
]


def build_manifest(params: Params, layout: Layout) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """Resolve the source, scan it, assign splits, inspect every file.

    Returns (dataset root, rows, empty class folders)."""
    from visionflow import ingest

    src = Path(params.data.source)
    src = src if src.is_absolute() else layout.root / src
    root = ingest.resolve_source(src, layout.extract_cache)
    scan = ingest.scan_imagefolder(root)
    if not scan.entries:
        raise DataError(f"{params.data.source}: no image files found")
    entries = ingest.assign_splits(
        scan.entries, params.data.val_fraction, params.data.test_fraction, params.data.split_seed
    )
    if params.data.limit_per_class:
        entries = ingest.subset_per_class(entries, params.data.limit_per_class,
                                          params.data.split_seed)

    v = params.validate_
    infos = ingest.inspect_many(
        [e.path for e in entries], params.data.channels, v.workers,
        min_width=v.min_width, min_height=v.min_height,
    )
    rows = [_row(e, i) for e, i in zip(entries, infos, strict=True)]
    rows += [
        {"path": r.relpath, "split": "", "label": "", "decodable": False,
         "quarantine_reason": r.reason, "error": r.detail}
        for r in scan.rejects
    ]
    _mark_cross_split_duplicates(rows)
    empty = sorted({c.split("/")[-1] for c in scan.empty_classes})
    return root, [{c: r.get(c, "") for c in COLUMNS} for r in rows], empty


def _row(entry: Any, info: Any) -> dict[str, Any]:
    return {
        "path": entry.relpath, "split": entry.split, "label": entry.label,
        "sha256": info.sha256, "bytes": info.bytes, "format": info.format or "",
        "width": info.width if info.decodable else "",
        "height": info.height if info.decodable else "",
        "mode": info.mode or "", "decodable": info.decodable,
        "quarantine_reason": info.reason or "", "error": info.error or "",
        "mean": _fmt(info.mean), "std": _fmt(info.std),
    }


def _fmt(values: Any) -> str:
    return " ".join(f"{v:.4f}" for v in values) if values else ""


def _mark_cross_split_duplicates(rows: list[dict[str, Any]]) -> None:
    """A file in val/test whose bytes also sit in an earlier split is leakage: quarantine it."""
    order = {"train": 0, "val": 1, "test": 2}
    first_split: dict[str, str] = {}
    for r in sorted((r for r in rows if r.get("sha256") and not r["quarantine_reason"]),
                    key=lambda r: order.get(r["split"], 3)):
        seen = first_split.setdefault(r["sha256"], r["split"])
        if seen != r["split"]:
            r["quarantine_reason"] = "cross_split_duplicate"
            r["error"] = f"same bytes as a file in {seen}"


def data_hash(rows: list[dict[str, Any]]) -> str:
    """Content hash of the usable dataset: paths, splits, labels and file hashes."""
    h = hashlib.sha256()
    for r in sorted(usable_rows(rows), key=lambda r: r["path"]):
        h.update(f"{r['path']}\t{r['split']}\t{r['label']}\t{r['sha256']}\n".encode())
    return h.hexdigest()[:32]


def class_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in usable_rows(rows):
        out[r["split"]][r["label"]] += 1
    return {s: dict(sorted(c.items())) for s, c in out.items()}


def usable_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not r["quarantine_reason"]]


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def read_manifest(layout: Layout) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (validation summary, manifest rows); fails if validate has not passed."""
    if not layout.validation.is_file() or not layout.manifest.is_file():
        raise DataError(f"{layout.manifest}: missing, run the validate stage first")
    meta = json.loads(layout.validation.read_text())
    if not meta.get("success"):
        raise DataError(f"{layout.validation}: the data gate failed, fix the data first")
    with layout.manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return meta, rows

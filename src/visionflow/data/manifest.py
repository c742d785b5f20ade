"""The dataset manifest: one row per file, the contract between validate and augment
(`outputs/validate/manifest.csv`). validate writes it (see `data.survey`), augment reads it."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from visionflow.core.errors import DataError
from visionflow.core.files import write_csv
from visionflow.core.layout import Layout

COLUMNS = [
    "path", "split", "label", "sha256", "bytes", "format", "width", "height", "mode",
    "decodable", "quarantine_reason", "error", "mean", "std",
]
# reason codes a manifest row can carry (images.REASONS + scan rejects + leakage)
REASON_CODES = (
    "zero_byte", "not_an_image", "truncated", "undecodable", "too_small", "decompression_bomb",
    "cross_split_duplicate", "outside_root", "broken_link", "not_a_file", "no_class",
)

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
    write_csv(path, rows, header=COLUMNS)


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

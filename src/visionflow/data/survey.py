"""Surveying the dataset into manifest rows: resolve the source, scan it, hash every file
(splits follow content: `data.splits`), assign splits and inspect every file (decode,
describe), on all cores.

Rows are cached in `.cache/validate/rows-<root hash>.json` (see `RowCache`): a file whose
(path, size, mtime, inode) is unchanged reuses its row without being read; a changed file
is re-hashed, and when its sha256 is already known its decode results are reused, so only
new content is decoded. The cache is only an accelerator: a missing, stale or corrupt cache
file is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.files import atomic_path, sha256_file
from visionflow.core.layout import Layout
from visionflow.data import image_checks, scan, source, splits
from visionflow.data.archive import ArchiveLimits
from visionflow.data.manifest import COLUMNS

CACHE_VERSION = 1
# what the cache keeps per file, after the stat key (size, mtime_ns, inode)
_CACHED = ("sha256", "format", "width", "height", "mode", "decodable", "reason", "error",
           "mean", "std")
_RACY_NS = 2_000_000_000  # files modified this close to the scan are re-hashed next time


@dataclass
class CacheStats:
    status: str = "off"  # off | new | loaded | discarded (<why>)
    path: str = ""
    reused: int = 0  # stat unchanged: row reused, file not read
    rehashed: int = 0  # stat changed, same sha256 as a cached file: not decoded again
    decoded: int = 0  # new content: hashed and decoded
    while_extracting: int = 0  # of those, decoded while the archive was being extracted
    timings: dict[str, float] = field(default_factory=dict)  # seconds per manifest phase

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_cache_file(layout: Layout, dataset_root: Path) -> Path:
    key = hashlib.sha256(str(dataset_root).encode()).hexdigest()[:16]
    return layout.row_cache(key)


def _signature(channels: int, max_pixels: int) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "channels": channels, "max_pixels": max_pixels,
            "pillow": version("pillow")}


class RowCache:
    """Per-file inspection results keyed by relpath, plus an index by sha256."""

    def __init__(self, path: Path, signature: dict[str, Any]):
        self.path, self.signature = path, signature
        self.entries: dict[str, list[Any]] = {}
        self.dirty = True  # whether the file needs writing
        self.stats = CacheStats(status="new", path=str(path))

    @classmethod
    def load(cls, path: Path, signature: dict[str, Any]) -> RowCache:
        cache = cls(path, signature)
        if not path.is_file():
            return cache
        try:
            blob = json.loads(path.read_text())
            if blob.get("signature") != signature or blob.get("columns") != list(_CACHED):
                cache.stats.status = "discarded (made with other settings)"
                return cache
            width = 3 + len(_CACHED)
            entries = blob["entries"]
            if not isinstance(entries, dict) or not all(
                isinstance(v, list) and len(v) == width for v in entries.values()
            ):
                raise ValueError("bad entry")
            cache.entries, cache.dirty = entries, False
            cache.stats.status = "loaded"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            cache.entries = {}
            cache.stats.status = "discarded (unreadable)"
        return cache

    def save(self, entries: dict[str, list[Any]]) -> None:
        blob = {"signature": self.signature, "columns": list(_CACHED), "entries": entries}
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(blob, separators=(",", ":")))
        except OSError:  # a read-only project still validates, just without the cache
            pass


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _info_values(info: Any) -> list[Any]:
    return [info.sha256, info.format or "", info.width, info.height, info.mode or "",
            bool(info.decodable), info.reason or "", info.error or "",
            _fmt(info.mean), _fmt(info.std)]


def hash_entries(entries: list[Any], cache: RowCache | None, workers: int = 0
                 ) -> dict[str, str]:
    """relpath -> sha256 of every entry: from the row cache when the file's stat is
    unchanged, else read and hashed (no decoding). Unreadable files are left out."""
    old = cache.entries if cache is not None else {}
    out: dict[str, str] = {}
    todo: list[Any] = []
    for e in entries:
        hit = old.get(e.relpath)
        if hit is not None and hit[3]:
            try:
                if hit[:3] == _stat_key(os.stat(e.fspath)):
                    out[e.relpath] = hit[3]
                    continue
            except OSError:
                continue
        todo.append(e)

    def one(e: Any) -> tuple[str, str | None]:
        try:
            return e.relpath, sha256_file(e.fspath)
        except OSError:
            return e.relpath, None

    if len(todo) > 64:  # hashlib and reads release the GIL: threads overlap the I/O
        with ThreadPoolExecutor(min(8, workers or os.cpu_count() or 1)) as pool:
            done = list(pool.map(one, todo, chunksize=64))
    else:
        done = [one(e) for e in todo]
    out.update((rel, sha) for rel, sha in done if sha)
    return out


def inspect_entries(entries: list[Any], channels: int, workers: int, max_pixels: int,
                    cache: RowCache | None, hashes: dict[str, str] | None = None
                    ) -> list[list[Any]]:
    """Per entry: [size, mtime_ns, inode, *_CACHED values], from the cache where it can
    (`hashes`: sha256 already computed by `hash_entries`, not read again)."""
    hashes = hashes or {}
    scan_start = time.time_ns()
    old = cache.entries if cache is not None else {}
    stats = cache.stats if cache is not None else CacheStats()
    out: list[list[Any] | None] = [None] * len(entries)
    stat_keys: list[list[int] | None] = [None] * len(entries)
    misses: list[int] = []
    for i, e in enumerate(entries):
        try:
            key = _stat_key(os.stat(e.fspath))
        except OSError:
            misses.append(i)  # inspect_image reports the read error
            continue
        stat_keys[i] = key
        hit = old.get(e.relpath)
        if hit is not None and hit[:3] == key:
            out[i] = hit
            stats.reused += 1
        else:
            misses.append(i)
    n_changed = len(misses)
    by_sha: dict[str, list[Any]] = {}
    if misses and old:  # changed stat: is the same content already decoded?
        for v in old.values():
            if v[3] and v[3] not in by_sha:
                by_sha[v[3]] = v
    if by_sha:
        still = []
        for i in misses:
            sha = hashes.get(entries[i].relpath)
            if sha is None:
                try:
                    sha = sha256_file(entries[i].fspath)
                except OSError:
                    still.append(i)
                    continue
            known = by_sha.get(sha)
            if known is not None and stat_keys[i] is not None:
                out[i] = [*stat_keys[i], *known[3:]]
                stats.rehashed += 1
            else:
                still.append(i)
        misses = still
    if misses:
        infos = image_checks.inspect_many([entries[i].fspath for i in misses], channels, workers,
                                    max_pixels=max_pixels)
        for i, info in zip(misses, infos, strict=True):
            key = stat_keys[i] or [info.bytes, 0, 0]
            out[i] = [*key, *_info_values(info)]
        stats.decoded += len(misses)
    if cache is not None and (n_changed or cache.dirty):
        keep = {}
        for e, v in zip(entries, out, strict=True):
            if v is not None and v[1] and v[1] < scan_start - _RACY_NS:
                keep[e.relpath] = v
            elif v is not None:  # racy or unreadable: keep the content, force a re-hash
                keep[e.relpath] = [-1, 0, 0, *v[3:]]
        # entries of files outside this run's subset stay cached while the files exist
        for rel, v in old.items():
            keep.setdefault(rel, v)
        cache.save(keep)
    return out  # type: ignore[return-value]  # every slot is filled above


@dataclass
class Survey:
    """What `survey_dataset` found: the dataset root, manifest rows, empty class
    folders, row-cache statistics, the split scheme and what was ignored (no images)."""

    root: Path
    rows: list[dict[str, Any]]
    empty: list[str]
    stats: CacheStats
    scheme: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def build_manifest(params: Params, layout: Layout) -> tuple[Path, list[dict[str, Any]], list[str]]:
    """Resolve the source, scan it, assign splits, inspect every file.

    Returns (dataset root, rows, empty class folders)."""
    found = survey_dataset(params, layout)
    return found.root, found.rows, found.empty


def survey_dataset(params: Params, layout: Layout) -> Survey:
    """`build_manifest` plus the row-cache statistics, phase timings, the split scheme and
    the ignored top-level entries."""
    t = {"start": time.perf_counter()}
    v, d = params.validate_, params.data
    src = source.source_path(params, layout, fetch=True)
    # a first extraction feeds each member to a process pool: decode overlaps extraction
    early = image_checks.BackgroundInspector(d.channels, v.workers, v.max_pixels) \
        if v.cache else None
    try:
        root = source.resolve_source(src, layout.extract_cache,
                                     early.submit if early is not None else None,
                                     ArchiveLimits.from_params(d))
        inspected = early.finish() if early is not None else {}
    finally:
        if early is not None:
            early.close()
    t["resolve"] = time.perf_counter()
    found = scan.scan_imagefolder(root, shown_as=d.source)
    if not found.entries:
        raise DataError(f"{d.source}: no image files found")

    cache = None
    seeded: set[str] = set()
    if v.cache:
        cache = RowCache.load(row_cache_file(layout, root), _signature(d.channels, v.max_pixels))
        # drop entries of files that are gone (kept: every scanned file, even outside subset)
        present = {e.relpath for e in found.entries}
        kept = {k: e for k, e in cache.entries.items() if k in present}
        cache.dirty |= len(kept) != len(cache.entries)
        cache.entries = kept
        if inspected:
            seeded = _seed(cache, inspected, root, layout.extract_cache, present)
    t["scan"] = time.perf_counter()
    hashes = hash_entries(found.entries, cache, v.workers)  # splits follow content
    entries = splits.assign_splits(found.entries, d.val_fraction, d.test_fraction,
                                   d.split_seed, hashes=hashes)
    if d.limit_per_class:
        entries = splits.subset_per_class(entries, d.limit_per_class, d.split_seed,
                                          hashes=hashes)
    scheme = splits.split_scheme(found.entries, d.val_fraction, d.test_fraction, d.split_seed)
    t["hash"] = time.perf_counter()
    values = inspect_entries(entries, d.channels, v.workers, v.max_pixels, cache, hashes)
    if cache is not None and seeded:
        n = sum(e.relpath in seeded for e in entries)
        cache.stats.reused -= n
        cache.stats.decoded += n
        cache.stats.while_extracting = n
    t["inspect"] = time.perf_counter()
    rows = [_row(e, i, v.min_width, v.min_height) for e, i in zip(entries, values, strict=True)]
    blank = dict.fromkeys(COLUMNS, "")
    rows += [
        {**blank, "path": r.relpath, "decodable": False, "quarantine_reason": r.reason,
         "error": r.detail}
        for r in found.rejects
    ]
    _mark_cross_split_duplicates(rows)
    empty = sorted({c.split("/")[-1] for c in found.empty_classes})
    stats = cache.stats if cache is not None else CacheStats()
    t["rows"] = time.perf_counter()
    names = list(t)
    stats.timings = {b: round(t[b] - t[a], 3) for a, b in zip(names, names[1:], strict=False)}
    return Survey(root, rows, empty, stats, scheme, found.ignored)


def _seed(cache: RowCache, inspected: dict[str, Any], root: Path, extract_root: Path,
          present: set[str]) -> set[str]:
    """Cache rows for files inspected while their archive was extracted (their relpaths)."""
    seeded: set[str] = set()
    try:
        parts = root.relative_to(extract_root.resolve()).parts  # <digest>[/wrapper...]
    except ValueError:
        return seeded
    prefix = "/".join(parts[1:])
    cut = len(prefix) + 1 if prefix else 0
    base = os.path.join(str(root), "")
    for name, info in inspected.items():
        if prefix and not name.startswith(prefix + "/"):
            continue
        rel = name[cut:]
        if rel not in present:
            continue
        try:
            st = os.stat(base + rel)
        except OSError:
            continue
        if st.st_size == info.bytes:
            cache.entries[rel] = [*_stat_key(st), *_info_values(info)]
            cache.dirty = True
            seeded.add(rel)
    return seeded


def _row(entry: Any, v: list[Any], min_width: int, min_height: int) -> dict[str, Any]:
    size, _, _, sha, fmt, width, height, mode, decodable, reason, error, mean, std = v
    if decodable and not reason and (width < min_width or height < min_height):
        reason = "too_small"
        error = f"{width}x{height} is below the minimum {min_width}x{min_height}"
    return {
        "path": entry.relpath, "split": entry.split, "label": entry.label,
        "sha256": sha, "bytes": size, "format": fmt,
        "width": width if decodable else "", "height": height if decodable else "",
        "mode": mode, "decodable": decodable, "quarantine_reason": reason, "error": error,
        "mean": mean, "std": std,
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

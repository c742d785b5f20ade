"""Train/val/test splits: deterministic, stratified per class, from the seed alone."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from visionflow.data.scan import SPLITS, FileEntry
from visionflow.errors import DataError


def _group_rng(seed: int, key: str) -> np.random.Generator:
    # crc32 is stable across runs (unlike hash()); one stream per class/group
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())])


def _n_take(n: int, fraction: float) -> int:
    if fraction <= 0 or n <= 0:
        return 0
    k = int(round(n * fraction))
    if k == 0 and n >= 3:
        k = 1  # every class gets at least one image where it can spare it
    return k


def _carve(
    items: list[FileEntry], fractions: Sequence[tuple[str, float]], seed: int, key: str
) -> list[FileEntry]:
    """Shuffle sorted `items` and move fractions of them to the named splits."""
    items = sorted(items, key=lambda e: e.relpath)
    order = _group_rng(seed, key).permutation(len(items))
    n = len(items)
    takes = [(name, _n_take(n, frac)) for name, frac in fractions]
    while sum(k for _, k in takes) >= n and any(k for _, k in takes):  # keep >= 1 in train
        i = max(range(len(takes)), key=lambda j: takes[j][1])
        takes[i] = (takes[i][0], takes[i][1] - 1)
    out = list(items)
    pos = 0
    for name, k in takes:
        for idx in order[pos : pos + k]:
            out[idx] = items[idx].with_split(name)
        pos += k
    for idx in order[pos:]:
        out[idx] = items[idx].with_split("train")
    return out


def assign_splits(
    entries: Iterable[FileEntry], val_fraction: float, test_fraction: float, seed: int
) -> list[FileEntry]:
    """Fill in missing splits with a deterministic stratified split.

    * no splits at all: train/val/test from `val_fraction`/`test_fraction` of each class;
    * train (+test) without val: carve val as `val_fraction` of each train class;
    * train (+val) without test: carve test as `test_fraction` of each train class;
    * all three present: unchanged.
    The result depends only on the relpaths, labels and seed (not file-system order).
    """
    entries = list(entries)
    if not entries:
        return []
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise DataError(f"{name} must be in [0, 1): {frac}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be < 1: {val_fraction} + {test_fraction}"
        )
    splits = {e.split for e in entries}
    if None in splits and len(splits) > 1:
        raise DataError("entries mix assigned and unassigned splits")
    if None in splits:
        fractions = [("val", val_fraction), ("test", test_fraction)]
        pool, fixed = entries, []
    else:
        unknown = splits - set(SPLITS)
        if unknown:
            raise DataError(f"unknown split name(s): {', '.join(sorted(unknown))}")
        if "train" not in splits:
            raise DataError("dataset has val/test folders but no train folder")
        fractions = []
        if "val" not in splits:
            fractions.append(("val", val_fraction))
        if "test" not in splits:
            fractions.append(("test", test_fraction))
        if not fractions:
            return sorted(entries, key=lambda e: e.relpath)
        pool = [e for e in entries if e.split == "train"]
        fixed = [e for e in entries if e.split != "train"]
    by_label: dict[str, list[FileEntry]] = defaultdict(list)
    for e in pool:
        by_label[e.label].append(e)
    out = list(fixed)
    for label in sorted(by_label):
        out.extend(_carve(by_label[label], fractions, seed, label))
    return sorted(out, key=lambda e: e.relpath)


def subset_per_class(entries: Iterable[FileEntry], limit: int, seed: int) -> list[FileEntry]:
    """Keep at most `limit` entries per (split, class), chosen deterministically."""
    if limit <= 0:
        raise DataError(f"limit_per_class must be positive: {limit}")
    groups: dict[tuple[str, str], list[FileEntry]] = defaultdict(list)
    for e in entries:
        groups[(e.split or "", e.label)].append(e)
    out: list[FileEntry] = []
    for (split, label), items in sorted(groups.items()):
        items.sort(key=lambda e: e.relpath)
        if len(items) > limit:
            idx = _group_rng(seed, f"{split}/{label}").choice(len(items), limit, replace=False)
            items = [items[i] for i in sorted(idx)]
        out.extend(items)
    return sorted(out, key=lambda e: e.relpath)


def split_counts(entries: Iterable[FileEntry]) -> dict[str, dict[str, int]]:
    """{split: {label: count}} for reports."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in entries:
        counts[e.split or ""][e.label] += 1
    return {s: dict(sorted(c.items())) for s, c in sorted(counts.items())}

"""Train/val/test splits addressed by content: a file's split depends on its bytes alone.

When val and/or test are carved (the dataset folder does not bring them), each file gets a
position `u` in [0, 1): a keyed BLAKE2b of its sha256 with `data.split_seed` as the key.
The bands are fixed: test is `u < test_fraction`, val is
`test_fraction <= u < test_fraction + val_fraction`, the rest is train (a band applies only
when that split is carved). So per-class fractions are met in expectation, identical bytes
always share a split, and adding, removing or renaming files never moves another file.
Folders that bring their own `val/` or `test/` keep them.

One exception keeps a tiny class trainable: when every file of a class falls in carved
bands, its file with the highest position stays in train (the only case in which a file's
split depends on other files).

`limit_per_class` subsets rank the files of each (split, class) by another keyed hash of
their content and keep the lowest ranks: also stable when files come and go.

`split_scheme` fingerprints what decides the split (method, seed, carved bands): a
different fingerprint is a new split, which the validation report says.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from visionflow.core.errors import DataError
from visionflow.data.scan import SPLITS, FileEntry

METHOD = "blake2b(sha256, key=split_seed) bands v1"
_SCALE = float(1 << 64)


def _position(sha256: str, key: str) -> float:
    h = hashlib.blake2b(sha256.encode(), key=key.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") / _SCALE


def split_position(sha256: str, seed: int) -> float:
    """The file's place in [0, 1) that picks its split (uniform over contents)."""
    return _position(sha256, f"visionflow-split:{int(seed)}")


def _content(entry: FileEntry, hashes: Mapping[str, str]) -> str:
    # an unreadable file has no hash: its relpath stands in (it is quarantined anyway)
    return hashes.get(entry.relpath) or f"unreadable:{entry.relpath}"


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= frac < 1:
            raise DataError(f"{name} must be in [0, 1): {frac}")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction must be < 1: {val_fraction} + {test_fraction}"
        )


def carved_splits(entries: Iterable[FileEntry]) -> list[str]:
    """Which of val/test are carved out of train for these scanned entries."""
    splits = {e.split for e in entries}
    if not splits or splits == {None}:
        return ["val", "test"]
    if None in splits:
        raise DataError("entries mix assigned and unassigned splits")
    unknown = splits - set(SPLITS)
    if unknown:
        raise DataError(f"unknown split name(s): {', '.join(sorted(unknown))}")
    if "train" not in splits:
        raise DataError("dataset has val/test folders but no train folder")
    return [s for s in ("val", "test") if s not in splits]


def _bands(carved: list[str], val_fraction: float, test_fraction: float
           ) -> list[tuple[str, float, float]]:
    bands = [("test", 0.0, test_fraction), ("val", test_fraction, test_fraction + val_fraction)]
    return [(name, lo, hi) for name, lo, hi in bands if name in carved and hi > lo]


def assign_splits(entries: Iterable[FileEntry], val_fraction: float, test_fraction: float,
                  seed: int, *, hashes: Mapping[str, str]) -> list[FileEntry]:
    """Fill in missing splits from each file's content hash (`hashes`: relpath -> sha256).

    * no splits at all: train/val/test from `val_fraction`/`test_fraction`;
    * train (+test) without val: val carved from train; train (+val) without test: test;
    * all three present: unchanged.
    The result depends only on the contents, labels and seed (not on names or order).
    """
    entries = list(entries)
    if not entries:
        return []
    _check_fractions(val_fraction, test_fraction)
    carved = carved_splits(entries)
    if not carved:
        return sorted(entries, key=lambda e: e.relpath)
    bands = _bands(carved, val_fraction, test_fraction)
    fixed = [e for e in entries if e.split not in (None, "train")]
    by_label: dict[str, list[tuple[float, FileEntry]]] = defaultdict(list)
    for e in entries:
        if e.split in (None, "train"):
            by_label[e.label].append((split_position(_content(e, hashes), seed), e))
    out = list(fixed)
    for label in sorted(by_label):
        placed = [(u, e.with_split(_band(u, bands))) for u, e in by_label[label]]
        if all(e.split != "train" for _, e in placed):  # a tiny class keeps one to train on
            i = max(range(len(placed)), key=lambda j: (placed[j][0], placed[j][1].relpath))
            placed[i] = (placed[i][0], placed[i][1].with_split("train"))
        out.extend(e for _, e in placed)
    return sorted(out, key=lambda e: e.relpath)


def _band(u: float, bands: list[tuple[str, float, float]]) -> str:
    for name, lo, hi in bands:
        if lo <= u < hi:
            return name
    return "train"


def subset_per_class(entries: Iterable[FileEntry], limit: int, seed: int, *,
                     hashes: Mapping[str, str]) -> list[FileEntry]:
    """Keep at most `limit` entries per (split, class): those whose contents rank lowest
    under a keyed hash, so a new or removed file displaces at most one other."""
    if limit <= 0:
        raise DataError(f"limit_per_class must be positive: {limit}")
    groups: dict[tuple[str, str], list[FileEntry]] = defaultdict(list)
    for e in entries:
        groups[(e.split or "", e.label)].append(e)
    key = f"visionflow-subset:{int(seed)}"
    out: list[FileEntry] = []
    for _, items in sorted(groups.items()):
        items.sort(key=lambda e: (_position(_content(e, hashes), key), e.relpath))
        out.extend(items[:limit])
    return sorted(out, key=lambda e: e.relpath)


def split_scheme(entries: Iterable[FileEntry], val_fraction: float, test_fraction: float,
                 seed: int, given: str = "the dataset's own train/val/test folders"
                 ) -> dict[str, Any]:
    """What decides each file's split, with a fingerprint: the same fingerprint means the
    same file always lands in the same split; another one is a new split. `given`: where
    the splits come from when the dataset brings them all."""
    carved = carved_splits(entries)
    scheme: dict[str, Any] = {"carved": carved}
    if carved:
        scheme.update(method=METHOD, split_seed=int(seed),
                      bands={n: [round(lo, 9), round(hi, 9)]
                             for n, lo, hi in _bands(carved, val_fraction, test_fraction)})
    else:
        scheme["method"] = f"given: {given}"
    blob = json.dumps(scheme, sort_keys=True).encode()
    return {**scheme, "fingerprint": hashlib.sha256(blob).hexdigest()[:16]}


def describe_scheme(scheme: Mapping[str, Any]) -> str:
    if not scheme.get("carved"):
        return str(scheme.get("method", ""))
    bands = ", ".join(f"{n} [{lo:g}, {hi:g})" for n, (lo, hi) in scheme.get("bands", {}).items())
    return f"by content hash, split_seed={scheme.get('split_seed')}: {bands or 'none'}"


def compare_schemes(current: Mapping[str, Any], reference: Mapping[str, Any] | None,
                    who: str) -> dict[str, Any]:
    """Same split as `who` (the champion), a new split, or no reference; with a message."""
    fp = current.get("fingerprint", "")
    if not reference or not reference.get("fingerprint"):
        return {"status": "no_reference", "fingerprint": fp,
                "message": f"split scheme {fp}: no reference ({who})"}
    if reference["fingerprint"] == fp:
        return {"status": "same", "fingerprint": fp, "reference": reference["fingerprint"],
                "message": f"same split as {who} ({fp})"}
    old = reference.get("description") or (
        describe_scheme(reference) if reference.get("carved") is not None else "unknown")
    return {"status": "new_split", "fingerprint": fp, "reference": reference["fingerprint"],
            "message": f"NEW SPLIT: {describe_scheme(current)} ({fp}) differs from {who}'s "
                       f"{old} ({reference['fingerprint']}); images may change split, the "
                       f"gate scores only test images neither model trained on"}

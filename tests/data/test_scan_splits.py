"""Scanning ImageFolders and assigning splits."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from builders import snapshot, touch_png

from visionflow.core.errors import DataError
from visionflow.data import scan, splits
from visionflow.data.scan import FileEntry

# ---------------------------------------------------------------------------
# scanning


def test_scan_flat_layout(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    touch_png(outside / "secret.png")
    (outside / "dir").mkdir()
    touch_png(outside / "dir" / "x.png")
    for rel in ("cat/a.png", "cat/nested/deep/b.png", "dog/c.png", "dog/sub/d.png"):
        touch_png(root / rel)
    for rel in ("cat/.DS_Store", "cat/Thumbs.db", "dog/desktop.ini", "cat/.hidden/e.png"):
        touch_png(root / rel)
    touch_png(root / "__MACOSX" / "cat" / "._a.png")
    touch_png(root / ".git" / "x.png")
    (root / "bird").mkdir()
    (root / "fish" / ".thumbs").mkdir(parents=True)  # only hidden content: empty
    (root / "cat" / "link_out.png").symlink_to(outside / "secret.png")
    (root / "dog" / "dir_out").symlink_to(outside / "dir")
    (root / "dog" / "link_in.png").symlink_to(root / "cat" / "a.png")
    (root / "README.txt").write_text("hello")  # not an image: ignored and listed
    touch_png(root / "loose.png")  # an image outside any class folder: a reject
    (root / "logs").mkdir()
    (root / "logs" / "run.log").write_text("epoch 1")  # a folder without images: not a class
    before = snapshot(tmp_path)

    found = scan.scan_imagefolder(root)
    rel = [e.relpath for e in found.entries]
    assert rel == sorted(rel)
    assert rel == [
        "cat/a.png",
        "cat/nested/deep/b.png",
        "dog/c.png",
        "dog/link_in.png",
        "dog/sub/d.png",
    ]
    assert {e.label for e in found.entries if e.relpath.startswith("cat/")} == {"cat"}
    assert all(e.split is None and e.path.is_absolute() for e in found.entries)
    assert all(e.path == root.resolve() / e.relpath for e in found.entries)
    assert found.empty_classes == ["bird", "fish"]
    reasons = {r.relpath: r.reason for r in found.rejects}
    assert reasons == {
        "loose.png": "no_class",
        "cat/link_out.png": "outside_root",
        "dog/dir_out": "outside_root",
    }
    assert found.ignored == ["README.txt", "logs/"]
    assert found.layout == "flat"
    assert snapshot(tmp_path) == before


def test_scan_split_layout(tmp_path):
    root = tmp_path / "data"
    for rel in ("train/a/1.png", "train/b/2.png", "test/a/3.png", "test/b/4.png"):
        touch_png(root / rel)
    (root / "test" / "c").mkdir()
    found = scan.scan_imagefolder(root)
    assert [(e.split, e.label) for e in found.entries] == [
        ("test", "a"),
        ("test", "b"),
        ("train", "a"),
        ("train", "b"),
    ]
    assert found.empty_classes == ["test/c"]
    assert found.layout == "split"
    (root / "logs").mkdir()  # no images next to the splits: ignored, not an error
    (root / "logs" / "train.log").write_text("ok")
    (root / "train" / "labels.csv").write_text("a,b")
    assert scan.scan_imagefolder(root).ignored == ["logs/", "train/labels.csv"]
    touch_png(root / "extra" / "x" / "1.png")
    with pytest.raises(DataError, match="extra/") as err:
        scan.scan_imagefolder(root, shown_as="~/Downloads/mydata")
    assert str(err.value).startswith("~/Downloads/mydata: ") and str(root) not in str(err.value)


def test_scan_missing_root(tmp_path):
    with pytest.raises(DataError, match="nope"):
        scan.scan_imagefolder(tmp_path / "nope")


# ---------------------------------------------------------------------------
# splits


def _entries(counts: dict[str, int], split: str | None = None) -> list[FileEntry]:
    out = []
    for label, n in counts.items():
        for i in range(n):
            rel = f"{split + '/' if split else ''}{label}/{i:03d}.png"
            out.append(FileEntry(Path("/d") / rel, rel, split, label))
    return out


def _hashes(entries: list[FileEntry]) -> dict[str, str]:
    """A distinct (made-up) content hash per file."""
    return {e.relpath: hashlib.sha256(e.relpath.encode()).hexdigest() for e in entries}


def test_assign_splits_stratified_and_deterministic():
    # content-addressed (see test_splits.py): per-class fractions hold in expectation, so the
    # counts are checked within 4 binomial standard deviations, not exactly
    entries = _entries({"a": 2000, "b": 1000, "c": 10})
    h = _hashes(entries)
    out = splits.assign_splits(entries, 0.1, 0.2, seed=3, hashes=h)
    assert len(out) == len(entries)
    assert sorted(e.relpath for e in out) == sorted(e.relpath for e in entries)  # each once
    counts = Counter((e.label, e.split) for e in out)
    for label, n in (("a", 2000), ("b", 1000)):
        for split, frac in (("val", 0.1), ("test", 0.2), ("train", 0.7)):
            sd = (n * frac * (1 - frac)) ** 0.5
            assert abs(counts[label, split] - n * frac) <= 4 * sd, (label, split, counts)
    assert counts["c", "train"] >= 1
    shuffled = list(reversed(entries))
    assert splits.assign_splits(shuffled, 0.1, 0.2, seed=3, hashes=h) == out  # order
    assert splits.assign_splits(entries, 0.1, 0.2, seed=3, hashes=h) == out  # deterministic
    other = splits.assign_splits(entries, 0.1, 0.2, seed=4, hashes=h)
    assert {e.relpath: e.split for e in other} != {e.relpath: e.split for e in out}


def _carved_hashes(n: int, below: float, seed: int = 0) -> list[str]:
    """`n` made-up hashes whose split position is below `below` (they all get carved)."""
    out, i = [], 0
    while len(out) < n:
        h = hashlib.sha256(f"x{i}".encode()).hexdigest()
        if splits.split_position(h, seed) < below:
            out.append(h)
        i += 1
    return out


def test_assign_splits_tiny_class_keeps_train():
    entries = _entries({"a": 2, "b": 3})
    h = _hashes(entries)
    h["a/000.png"], h["a/001.png"] = _carved_hashes(2, 0.6)  # both in carved bands
    out = splits.assign_splits(entries, 0.3, 0.3, seed=0, hashes=h)
    counts = Counter((e.label, e.split) for e in out)
    assert counts["a", "train"] == 1 and counts["b", "train"] >= 1
    kept = next(e.relpath for e in out if e.label == "a" and e.split == "train")
    assert kept == max(("a/000.png", "a/001.png"),
                       key=lambda r: splits.split_position(h[r], 0))  # the highest position


def test_assign_splits_carves_val_from_train():
    entries = _entries({"a": 400, "b": 200}, "train") + _entries({"a": 10, "b": 10}, "test")
    h = _hashes(entries)
    out = splits.assign_splits(entries, 0.25, 0.2, seed=0, hashes=h)
    test_before = {e.relpath for e in entries if e.split == "test"}
    assert {e.relpath for e in out if e.split == "test"} == test_before
    assert all(e.relpath.startswith("train/") for e in out if e.split == "val")
    val = {e.relpath for e in out if e.split == "val"}
    # the val band sits after the (uncarved) test band: [0.2, 0.45)
    assert val == {e.relpath for e in entries if e.split == "train"
                   and 0.2 <= splits.split_position(h[e.relpath], 0) < 0.45}
    assert abs(len(val) - 0.25 * 600) <= 4 * (600 * 0.25 * 0.75) ** 0.5
    full = entries + _entries({"a": 3}, "val")
    assert splits.assign_splits(full, 0.25, 0.2, seed=0, hashes=_hashes(full)) == sorted(
        full, key=lambda e: e.relpath)


def test_assign_splits_errors():
    with pytest.raises(DataError, match="val_fraction"):
        splits.assign_splits(_entries({"a": 5}), 1.5, 0.1, seed=0, hashes={})
    with pytest.raises(DataError, match="0.6"):
        splits.assign_splits(_entries({"a": 5}), 0.6, 0.4, seed=0, hashes={})
    with pytest.raises(DataError, match="no train"):
        splits.assign_splits(_entries({"a": 5}, "test"), 0.1, 0.1, seed=0, hashes={})


def test_subset_per_class():
    entries = _entries({"a": 30, "b": 5}, "train") + _entries({"a": 30}, "test")
    h = _hashes(entries)
    sub = splits.subset_per_class(entries, 10, seed=1, hashes=h)
    counts = Counter((e.split, e.label) for e in sub)
    assert counts == {("train", "a"): 10, ("train", "b"): 5, ("test", "a"): 10}
    assert splits.subset_per_class(list(reversed(entries)), 10, seed=1, hashes=h) == sub
    assert splits.subset_per_class(entries, 10, seed=2, hashes=h) != sub
    # stable: a file outside the subset leaving, or a new file, displaces at most one
    kept = {e.relpath for e in sub}
    dropped = next(e for e in entries if e.relpath not in kept and e.label == "a")
    fewer = [e for e in entries if e is not dropped]
    assert splits.subset_per_class(fewer, 10, seed=1, hashes=h) == sub
    more = entries + _entries({"z": 1}, "train")
    more[-1] = FileEntry(Path("/d/train/a/new.png"), "train/a/new.png", "train", "a")
    grown = {e.relpath for e in splits.subset_per_class(more, 10, seed=1,
                                                        hashes={**h, "train/a/new.png": "n"})}
    assert len(kept - grown) <= 1
    with pytest.raises(DataError, match="0"):
        splits.subset_per_class(entries, 0, seed=0, hashes=h)



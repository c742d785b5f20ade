"""Scanning ImageFolders and assigning splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from builders import snapshot, touch_png

from visionflow.data import scan, splits
from visionflow.data.scan import FileEntry
from visionflow.errors import DataError

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
    (root / "README.txt").write_text("hello")
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
        "README.txt": "no_class",
        "cat/link_out.png": "outside_root",
        "dog/dir_out": "outside_root",
    }
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
    touch_png(root / "extra" / "x" / "1.png")
    with pytest.raises(DataError, match="extra"):
        scan.scan_imagefolder(root)


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


def test_assign_splits_stratified_and_deterministic():
    entries = _entries({"a": 100, "b": 50, "c": 10})
    out = splits.assign_splits(entries, 0.1, 0.2, seed=3)
    assert len(out) == len(entries)
    assert sorted(e.relpath for e in out) == sorted(e.relpath for e in entries)  # each once
    counts = Counter((e.label, e.split) for e in out)
    assert (counts["a", "val"], counts["a", "test"], counts["a", "train"]) == (10, 20, 70)
    assert (counts["b", "val"], counts["b", "test"], counts["b", "train"]) == (5, 10, 35)
    assert (counts["c", "val"], counts["c", "test"], counts["c", "train"]) == (1, 2, 7)
    shuffled = list(reversed(entries))
    assert splits.assign_splits(shuffled, 0.1, 0.2, seed=3) == out  # order independent
    other = splits.assign_splits(entries, 0.1, 0.2, seed=4)
    assert {e.relpath: e.split for e in other} != {e.relpath: e.split for e in out}


def test_assign_splits_tiny_class_keeps_train():
    out = splits.assign_splits(_entries({"a": 2, "b": 3}), 0.3, 0.3, seed=0)
    counts = Counter((e.label, e.split) for e in out)
    assert counts["a", "train"] >= 1 and counts["b", "train"] >= 1
    assert counts["b", "val"] == 1 and counts["b", "test"] == 1


def test_assign_splits_carves_val_from_train():
    entries = _entries({"a": 40, "b": 20}, "train") + _entries({"a": 10, "b": 10}, "test")
    out = splits.assign_splits(entries, 0.25, 0.2, seed=0)
    counts = Counter((e.split, e.label) for e in out)
    assert counts == {
        ("train", "a"): 30,
        ("val", "a"): 10,
        ("train", "b"): 15,
        ("val", "b"): 5,
        ("test", "a"): 10,
        ("test", "b"): 10,
    }
    test_before = {e.relpath for e in entries if e.split == "test"}
    assert {e.relpath for e in out if e.split == "test"} == test_before
    assert all(e.relpath.startswith("train/") for e in out if e.split == "val")
    full = entries + _entries({"a": 3}, "val")
    assert splits.assign_splits(full, 0.25, 0.2, seed=0) == sorted(full, key=lambda e: e.relpath)


def test_assign_splits_errors():
    with pytest.raises(DataError, match="val_fraction"):
        splits.assign_splits(_entries({"a": 5}), 1.5, 0.1, seed=0)
    with pytest.raises(DataError, match="0.6"):
        splits.assign_splits(_entries({"a": 5}), 0.6, 0.4, seed=0)
    with pytest.raises(DataError, match="no train"):
        splits.assign_splits(_entries({"a": 5}, "test"), 0.1, 0.1, seed=0)


def test_subset_per_class():
    entries = _entries({"a": 30, "b": 5}, "train") + _entries({"a": 30}, "test")
    sub = splits.subset_per_class(entries, 10, seed=1)
    counts = Counter((e.split, e.label) for e in sub)
    assert counts == {("train", "a"): 10, ("train", "b"): 5, ("test", "a"): 10}
    assert splits.subset_per_class(list(reversed(entries)), 10, seed=1) == sub
    assert splits.subset_per_class(entries, 10, seed=2) != sub
    with pytest.raises(DataError, match="0"):
        splits.subset_per_class(entries, 0, seed=0)



"""The offline digits dataset is a deterministic, stratified PNG ImageFolder."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.data import scan
from visionflow.data.digits import N_DIGITS, materialize_digits


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return materialize_digits(tmp_path_factory.mktemp("d") / "digits")


def test_layout_and_counts(digits_dir):
    files = sorted(digits_dir.rglob("*.png"))
    assert len(files) == N_DIGITS == 1797
    assert sorted(p.name for p in digits_dir.iterdir()) == ["test", "train", "val"]
    assert {p.parent.name for p in files} == {str(d) for d in range(10)}
    assert len({p.name for p in files}) == N_DIGITS  # each index in exactly one split
    with Image.open(files[0]) as img:
        assert (img.mode, img.size, img.format) == ("L", (8, 8), "PNG")
        assert img.getextrema()[1] <= 255
    found = scan.scan_imagefolder(digits_dir)
    assert len(found.entries) == N_DIGITS and not found.rejects and not found.empty_classes
    counts = Counter(e.split for e in found.entries)
    assert counts["test"] == pytest.approx(0.2 * N_DIGITS, abs=10)
    assert counts["val"] == pytest.approx(0.1 * N_DIGITS, abs=10)
    per_split = Counter((e.split, e.label) for e in found.entries)
    assert all(per_split[s, str(d)] > 0 for s in ("train", "val", "test") for d in range(10))


def test_pixels_scaled(digits_dir):
    from sklearn.datasets import load_digits

    data = load_digits()
    path = next(digits_dir.glob("*/*/0000.png"))
    with Image.open(path) as img:
        pixels = list(img.getdata())
    expected = [round(v * 255 / 16) for v in data.images[0].ravel()]
    assert pixels == expected
    assert path.parent.name == str(data.target[0])


def test_deterministic_bytes_and_idempotent(digits_dir, tmp_path):
    again = materialize_digits(tmp_path / "again")
    assert _tree_hash(again) == _tree_hash(digits_dir)
    marker = digits_dir / "train" / "0"
    mtime = marker.stat().st_mtime_ns
    assert materialize_digits(digits_dir, seed=99) == digits_dir  # non-empty: untouched
    assert marker.stat().st_mtime_ns == mtime
    assert not list(digits_dir.parent.glob(".*"))  # no temp dirs left behind


def test_target_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="file"):
        materialize_digits(tmp_path / "file")

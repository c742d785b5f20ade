"""The generated segmentation set (#19): layout on disk, determinism, masks that match the
drawn shapes, and `vflow data init --task segmentation`."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BIN, run
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.data.segmentation_masks import read_classes, voc_colour
from visionflow.data.segmentation_synth import SHAPE_CLASSES, materialize_shapes, render_shapes


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_sizes_and_masks(tmp_path):
    out = materialize_shapes(tmp_path / "shapes", n_images=30, seed=3)
    assert read_classes(out / "classes.txt") == list(SHAPE_CLASSES)
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == sorted(p.name for p in (out / "masks").iterdir())
    assert len(images) == 30
    sizes, seen = set(), set()
    for name in images:
        img, mask = Image.open(out / "images" / name), Image.open(out / "masks" / name)
        assert img.mode == "RGB" and mask.mode == "P" and img.size == mask.size
        assert mask.getpalette()[3:6] == list(voc_colour(1))
        assert all(48 <= side <= 96 for side in img.size)
        values = np.unique(np.asarray(mask))
        assert set(values.tolist()) <= set(range(len(SHAPE_CLASSES)))
        sizes.add(img.size)
        seen |= set(values.tolist())
    assert len(sizes) > 20  # varied sizes
    assert seen == set(range(len(SHAPE_CLASSES)))  # every class appears


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(materialize_shapes(tmp_path / "a", n_images=5, seed=1))
    b = _files(materialize_shapes(tmp_path / "b", n_images=5, seed=1))
    c = _files(materialize_shapes(tmp_path / "c", n_images=5, seed=2))
    assert a == b
    assert a["images/shape_0000.png"] != c["images/shape_0000.png"]


def test_objects_differ_from_background_where_the_mask_says():
    """The mask marks the painted shapes: object pixels are more saturated than the grey
    background (a mask drawn elsewhere than the paint fails this)."""
    for i in range(10):
        image, mask = render_shapes(seed=0, index=i)
        rgb = image.astype(np.float32)
        sat = rgb.max(axis=2) - rgb.min(axis=2)
        assert sat[mask > 0].mean() > sat[mask == 0].mean() + 40


def test_existing_target_kept_and_bad_args(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert materialize_shapes(tmp_path / "full", n_images=2) == tmp_path / "full"
    assert _files(tmp_path / "full") == {"keep.txt": b"x"}
    with pytest.raises(DataError, match="min_side"):
        materialize_shapes(tmp_path / "bad", min_side=100, max_side=50)


@pytest.mark.slow
def test_cli_data_init_task_segmentation(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    run(["git", "init", "-q", "-b", "main"], root)
    vflow = str(BIN / "vflow")
    proc = run([vflow, "data", "init", "--task", "segmentation"], root)
    assert "data ready" in proc.stdout and (root / "data.dvc").is_file()
    assert len(list((root / "data" / "masks").glob("*.png"))) == 600
    assert (root / "data" / "classes.txt").is_file()
    bad = run([vflow, "data", "init", "--task", "detection"], root, check=False)
    assert bad.returncode != 0 and "unknown task 'detection'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    plain = tmp_path / "plain"  # the default stays the digits
    plain.mkdir()
    run(["git", "init", "-q", "-b", "main"], plain)
    run([vflow, "data", "init"], plain)
    assert sorted(p.name for p in (plain / "data").iterdir()) == ["test", "train", "val"]

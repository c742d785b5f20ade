"""Scanning segmentation datasets (#19): both layouts, each bad pair quarantined with its
reason (nothing deleted), RGB masks in VOC colours, content-addressed splits."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageOps

from visionflow.core.errors import DataError
from visionflow.data.segmentation_layout import (
    LAYOUT_MASKS,
    LAYOUT_VOC,
    load_pair,
    read_mask,
    scan_segmentation,
)
from visionflow.data.segmentation_masks import IGNORE_INDEX, index_png_bytes, voc_colour
from visionflow.data.segmentation_shards import encode_pair


def _image(path, w=12, h=10, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path, values, mode="P"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(values, dtype=np.uint8)
    if mode == "P":
        path.write_bytes(index_png_bytes(arr))
    elif mode == "RGB":
        rgb = np.zeros((*arr.shape, 3), np.uint8)
        for v in np.unique(arr):
            rgb[arr == v] = voc_colour(int(v))
        Image.fromarray(rgb, "RGB").save(path)
    else:
        Image.fromarray(arr, mode).save(path)


def _grid(h=10, w=12, value=1):
    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:9] = value
    return m


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture
def masks_dataset(tmp_path):
    root = tmp_path / "ds"
    (root).mkdir()
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    for i in range(3):  # good pairs: palette, grey "L", RGB in VOC colours
        _image(root / "images" / f"ok{i}.jpg", seed=i)
    _mask(root / "masks" / "ok0.png", _grid(value=2))
    border = _grid(value=1)
    border[0, :] = IGNORE_INDEX  # the ignore index is allowed
    _mask(root / "masks" / "ok1.png", border, mode="L")
    _mask(root / "masks" / "ok2.png", _grid(value=2), mode="RGB")
    _image(root / "images" / "lonely.png", seed=5)  # image without mask
    _mask(root / "masks" / "orphan.png", _grid())  # mask without image
    _image(root / "images" / "size.png", w=14)
    _mask(root / "masks" / "size.png", _grid())
    _image(root / "images" / "rgbbad.png")
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[1, 1] = (1, 2, 3)
    Image.fromarray(rgb, "RGB").save(root / "masks" / "rgbbad.png")
    _image(root / "images" / "outside.png")
    _mask(root / "masks" / "outside.png", _grid(value=3))  # 3 classes: 0..2
    _image(root / "images" / "negative.png")
    Image.fromarray(np.full((10, 12), -1, np.int32), "I").save(root / "masks" / "negative.tif")
    _image(root / "images" / "la.png")
    Image.fromarray(np.zeros((10, 12, 2), np.uint8), "LA").save(root / "masks" / "la.png")
    _image(root / "images" / "alpha.png")
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(root / "masks" / "alpha.png")
    _image(root / "images" / "broken.png")
    (root / "masks" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_images_masks_layout_quarantines_each_bad_pair(masks_dataset):
    before = _snapshot(masks_dataset)
    scan = scan_segmentation(masks_dataset)
    assert scan.layout == LAYOUT_MASKS
    assert scan.classes == ["background", "cat", "dog"] and scan.classes_declared
    assert [p.stem for p in scan.pairs] == ["ok0", "ok1", "ok2"]
    reasons = {q.stem: q.reason for q in scan.quarantined}
    assert reasons == {
        "lonely": "image_without_mask", "orphan": "mask_without_image",
        "size": "size_mismatch", "rgbbad": "rgb_colour_not_in_palette",
        "outside": "value_outside_classes", "negative": "value_outside_classes",
        "la": "multi_channel_mask",
        "alpha": "multi_channel_mask", "broken": "unreadable_mask",
    }
    details = {q.stem: q.detail for q in scan.quarantined}
    assert "(1, 2, 3)" in details["rgbbad"] and "14x10" in details["size"]
    assert "index 3 >= 3" in details["outside"]
    assert _snapshot(masks_dataset) == before  # nothing deleted or changed


def test_mask_modes_read_as_the_same_indices(masks_dataset):
    want = _grid(value=2).astype(np.int64)
    assert (read_mask(masks_dataset / "masks" / "ok0.png") == want).all()  # palette
    assert (read_mask(masks_dataset / "masks" / "ok2.png") == want).all()  # RGB VOC colours
    assert read_mask(masks_dataset / "masks" / "ok1.png")[0, 0] == IGNORE_INDEX


def test_classes_inferred_without_class_file(masks_dataset):
    (masks_dataset / "classes.txt").unlink()
    scan = scan_segmentation(masks_dataset)
    assert scan.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert not scan.classes_declared
    assert "outside" in {p.stem for p in scan.pairs}


def test_splits_follow_the_pair_bytes(tmp_path):
    root = tmp_path / "many"
    for i in range(60):
        _image(root / "images" / f"p{i:02d}.png", seed=i)
        _mask(root / "masks" / f"p{i:02d}.png", _grid(value=1 + i % 2))
    first = {p.stem: p.split for p in scan_segmentation(root, 0.2, 0.2, seed=0).pairs}
    assert set(first.values()) == {"train", "val", "test"}
    # a renamed pair keeps its split; removing a pair moves no other
    (root / "images" / "p07.png").rename(root / "images" / "renamed.png")
    (root / "masks" / "p07.png").rename(root / "masks" / "renamed.png")
    (root / "images" / "p08.png").unlink()
    (root / "masks" / "p08.png").unlink()
    second = {p.stem: p.split for p in scan_segmentation(root, 0.2, 0.2, seed=0).pairs}
    assert second.pop("renamed") == first.pop("p07")
    first.pop("p08")
    assert second == first
    # the mask's bytes count too: a changed mask may move, and another seed is another split
    other = {p.stem: p.split for p in scan_segmentation(root, 0.2, 0.2, seed=1).pairs}
    assert other != second
    for mask in (root / "masks").iterdir():  # same images, other masks: other pairs
        _mask(mask, _grid(value=3))
    remasked = {p.stem: p.split for p in scan_segmentation(root, 0.2, 0.2, seed=0).pairs}
    remasked.pop("renamed")
    assert remasked.keys() == second.keys() and remasked != second


def test_voc_layout_lists_and_unlisted(tmp_path):
    root = tmp_path / "VOC2012"
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    train = [f"2007_{i:06d}" for i in range(20)]
    val = [f"2008_{i:06d}" for i in range(5)]
    for k, stem in enumerate(train + val):
        _image(root / "JPEGImages" / f"{stem}.jpg", seed=k)
        m = _grid(value=1 + k % 20)
        m[1, :] = IGNORE_INDEX
        _mask(root / "SegmentationClass" / f"{stem}.png", m)
    _image(root / "JPEGImages" / "2009_detonly.jpg")  # detection-only image: not listed
    _mask(root / "SegmentationClass" / "2009_extra.png", _grid())  # a mask in no list
    _image(root / "JPEGImages" / "2009_nomask.jpg")
    (sets / "train.txt").write_text("\n".join(train + ["2009_nomask"]) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n")
    scan = scan_segmentation(root, val_fraction=0.1, test_fraction=0.25)
    assert scan.layout == LAYOUT_VOC and len(scan.classes) == 21
    assert len(scan.pairs) == 25
    splits = {p.stem: p.split for p in scan.pairs}
    assert all(splits[s] == "val" for s in val)  # the dataset's own val list is kept
    assert {splits[s] for s in train} == {"train", "test"}  # test carved from train only
    assert [(q.stem, q.reason) for q in scan.quarantined] == [("2009_nomask",
                                                               "image_without_mask")]
    assert scan.unlisted == ["SegmentationClass/2009_extra.png"]
    assert scan.scheme["carved"] == ["test"] and scan.scheme["split_seed"] == 0
    (sets / "train.txt").write_text("\n".join(train[5:]) + "\n")  # every split from a list
    (sets / "test.txt").write_text("\n".join(train[:5]) + "\n")
    scheme = scan_segmentation(root, val_fraction=0.1, test_fraction=0.25).scheme
    assert scheme["method"] == "given: the dataset's lists, ImageSets/Segmentation/*.txt"


def test_not_a_segmentation_dataset(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not a segmentation dataset"):
        scan_segmentation(tmp_path)


def _turned_photo(path, seed=0):
    """A phone's portrait photo: 40 x 30 pixels stored, EXIF orientation 6 (shown 30 x 40)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
        path, quality=95, exif=exif.tobytes())


def test_a_photo_turned_by_exif_pairs_with_a_mask_of_its_upright_size(tmp_path):
    """A browser-based annotation tool shows the photo upright and draws a 30 x 40 mask; the
    pair is usable, read upright (as the served model reads it) in the tensors and stored
    upright in shards. A mask that fits the stored pixels is quarantined saying so."""
    root = tmp_path / "set"
    for stem in ("upright", "stored"):
        _turned_photo(root / "images" / f"{stem}.jpg")
    _mask(root / "masks" / "upright.png", _grid(h=40, w=30))
    _mask(root / "masks" / "stored.png", _grid(h=30, w=40))
    for i in range(4):  # plain pairs beside them
        _image(root / "images" / f"plain{i}.png", seed=i)
        _mask(root / "masks" / f"plain{i}.png", _grid())
    scan = scan_segmentation(root, val_fraction=0.0, test_fraction=0.0)
    (bad,) = scan.quarantined
    assert (bad.stem, bad.reason) == ("stored", "size_mismatch")
    assert "mask 40x30, image 30x40 as shown (its EXIF orientation turns the 40x30" in bad.detail
    pair = next(p for p in scan.pairs if p.stem == "upright")
    image, mask = load_pair(root, pair)
    with Image.open(root / pair.image) as img:
        shown = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert image.shape == (40, 30, 3) and mask.shape == (40, 30)
    assert np.array_equal(image, shown)
    stored, _, again = encode_pair(root / pair.image, mask, max_side=512)
    assert again  # not kept byte for byte: torchvision's decoders ignore EXIF
    with Image.open(BytesIO(stored)) as img:
        assert img.size == (30, 40)

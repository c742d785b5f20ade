"""Scanning a segmentation dataset: image/mask pairs, their checks and their splits.

Two layouts are recognised at the dataset root:

* `images/` + `masks/`: a mask has its image's stem (`images/a/b.jpg` <-> `masks/a/b.png`);
  an optional `classes.txt` names the classes (line i = index i, 0 = background), else the
  classes are `class_0..class_N` up to the largest index found;
* Pascal VOC: `JPEGImages/`, `SegmentationClass/`, `ImageSets/Segmentation/{train,val}.txt`
  (and `test.txt` when present). The listed stems are the dataset (VOC's detection-only
  images have no mask and are not listed); masks in no list are reported as `unlisted`.
  Without list files every mask in `SegmentationClass/` is a pair. Classes: VOC's 21, or
  `classes.txt` at the root.

A mask is single-channel class indices: a palette ("P") or grey ("L", "I;16") PNG, whose
values are the indices, or an RGB(A, opaque) image in VOC colours, mapped to indices through
the VOC palette. 255 is the ignore index. Bad pairs are quarantined with a reason, never
deleted: `mask_without_image`, `image_without_mask`, `listed_without_files`,
`duplicate_stem`, `unreadable_image`, `unreadable_mask`, `size_mismatch`,
`rgb_colour_not_in_palette`, `multi_channel_mask`, `value_outside_classes`.

Images are decoded as the served model decodes them (`data.images.load_image`: upright by
their EXIF orientation, alpha on black, 16 bits to 8), so a mask has the image's size as
shown: what an annotation tool in a browser draws on a phone's portrait photo.

Splits come from the dataset (VOC lists) where it brings them; the rest are carved by the
pair's content, `data/splits.py`'s keyed hash of sha256(image sha256 + mask sha256).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.core.files import sha256_file
from visionflow.data.images import IMAGE_SUFFIXES, load_image
from visionflow.data.scan import FileEntry
from visionflow.data.segmentation_masks import (
    CLASSES_FILE,
    IGNORE_INDEX,
    VOC_CLASSES,
    read_classes,
    voc_colour,
)
from visionflow.data.splits import assign_splits, split_scheme

LAYOUT_MASKS = "images+masks"
LAYOUT_VOC = "voc"
_VOC_SPLITS = ("train", "val", "test")
# packed 0xRRGGBB -> class index, for RGB masks in VOC colours (a bijection over 0..255)
_COLOUR_INDEX = {(r << 16) | (g << 8) | b: i for i in range(256) for r, g, b in [voc_colour(i)]}


@dataclass(frozen=True, slots=True)
class Pair:
    stem: str
    image: str  # posix relpath under the dataset root
    mask: str
    split: str  # train | val | test


@dataclass(frozen=True, slots=True)
class Quarantined:
    stem: str
    path: str  # the file at fault (relpath)
    reason: str
    detail: str


@dataclass
class SegmentationScan:
    root: Path
    layout: str
    classes: list[str]
    classes_declared: bool  # from classes.txt or VOC, not inferred from the masks
    pairs: list[Pair]
    quarantined: list[Quarantined] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # VOC masks in no split list
    scheme: dict = field(default_factory=dict)  # what decides the splits (`splits.split_scheme`)


class MaskProblem(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def detect_layout(root: Path) -> str:
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return LAYOUT_VOC
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return LAYOUT_MASKS
    raise DataError(f"{root}: not a segmentation dataset (expected images/ + masks/, or "
                    f"Pascal VOC's JPEGImages/ + SegmentationClass/)")


def _by_stem(root: Path, folder: str, bad: list[Quarantined]) -> dict[str, str]:
    """stem (relpath under `folder` without suffix) -> relpath under root, images only."""
    found: dict[str, str] = {}
    base = root / folder
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if name.startswith(".") or suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            key = Path(dirpath, stem).relative_to(base).as_posix()
            if key in found:
                bad.append(Quarantined(key, rel, "duplicate_stem",
                                       f"{found[key]} has the same stem"))
                continue
            found[key] = rel
    return found


def _voc_lists(root: Path) -> dict[str, str] | None:
    """stem -> split from ImageSets/Segmentation/{train,val,test}.txt; None without lists."""
    folder = root / "ImageSets" / "Segmentation"
    lists = [s for s in _VOC_SPLITS if (folder / f"{s}.txt").is_file()]
    if not lists:
        return None
    if "train" not in lists:
        raise DataError(f"{folder}: split lists {', '.join(lists)} but no train.txt")
    given: dict[str, str] = {}
    for split in lists:
        for line in (folder / f"{split}.txt").read_text().splitlines():
            if line.split():
                given.setdefault(line.split()[0], split)  # listed twice: the first list wins
    return given


def read_mask(path: Path) -> np.ndarray:
    """The class indices of a mask file (H x W, int64); MaskProblem when it is not one."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, bands = img.mode, img.getbands()
            if mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(img).astype(np.int64)
            if mode == "RGBA" and np.asarray(img.getchannel("A")).min() == 255:
                img, mode = img.convert("RGB"), "RGB"
            if mode != "RGB":
                raise MaskProblem("multi_channel_mask",
                                  f"mode {mode} ({len(bands)} channels); a mask is "
                                  "single-channel indices or an RGB image in VOC colours")
            rgb = np.asarray(img).astype(np.int64)
    except MaskProblem:
        raise
    except Exception as err:  # not an image, truncated
        raise MaskProblem("unreadable_mask", " ".join(str(err).split())[:200]) from None
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours, inverse = np.unique(packed, return_inverse=True)
    index = np.array([_COLOUR_INDEX.get(int(c), -1) for c in colours])
    missing = colours[index < 0]
    if len(missing):
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in missing[:3])
        raise MaskProblem("rgb_colour_not_in_palette",
                          f"{len(missing)} colour(s) not in the VOC palette: {shown}")
    return index[inverse].reshape(packed.shape)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) as shown: its EXIF orientation applied."""
    try:
        return load_image(path).size
    except Exception as err:
        raise MaskProblem("unreadable_image", " ".join(str(err).split())[:200]) from None


def _pair_hash(root: Path, image: str, mask: str) -> str:
    both = sha256_file(root / image) + sha256_file(root / mask)
    return hashlib.sha256(both.encode()).hexdigest()


def _check(root: Path, stem: str, image: str, mask: str
           ) -> tuple[int, Quarantined | None]:
    """(largest class index in the mask, or the quarantine record)."""
    try:
        size = _image_size(root / image)
    except MaskProblem as p:
        return -1, Quarantined(stem, image, p.reason, p.detail)
    try:
        values = read_mask(root / mask)
    except MaskProblem as p:
        return -1, Quarantined(stem, mask, p.reason, p.detail)
    h, w = values.shape
    if (w, h) != size:
        with Image.open(root / image) as img:
            stored = img.size
        turned = (f" as shown (its EXIF orientation turns the {stored[0]}x{stored[1]} stored "
                  f"pixels: the mask fits those)" if stored == (w, h) else "")
        return -1, Quarantined(stem, mask, "size_mismatch",
                               f"mask {w}x{h}, image {size[0]}x{size[1]}{turned}")
    labels = values[values != IGNORE_INDEX]
    if labels.size and labels.min() < 0:  # 32-bit "I" masks can hold them
        return -1, Quarantined(stem, mask, "value_outside_classes",
                               f"negative index {int(labels.min())}")
    return (int(labels.max()) if labels.size else 0), None


def scan_segmentation(root: Path, val_fraction: float = 0.1, test_fraction: float = 0.2,
                      seed: int = 0) -> SegmentationScan:
    """Pairs with their splits, and the quarantined pairs with a reason each."""
    root = Path(root)
    layout = detect_layout(root)
    bad: list[Quarantined] = []
    if layout == LAYOUT_VOC:
        images, masks = _by_stem(root, "JPEGImages", bad), _by_stem(root, "SegmentationClass", bad)
        given = _voc_lists(root)
    else:
        images, masks = _by_stem(root, "images", bad), _by_stem(root, "masks", bad)
        given = None
    unlisted: list[str] = []
    if given is None:
        stems = sorted(masks) if layout == LAYOUT_VOC else sorted(set(images) | set(masks))
    else:
        stems = sorted(given)
        unlisted = sorted(masks[s] for s in masks if s not in given)
    duplicates = {q.stem for q in bad}
    candidates: list[tuple[str, str, str, int]] = []  # stem, image, mask, max index
    for stem in stems:
        if stem in duplicates:
            continue
        image, mask = images.get(stem), masks.get(stem)
        if image is None or mask is None:
            reason = ("image_without_mask" if mask is None and image else
                      "mask_without_image" if mask else "listed_without_files")
            detail = {"image_without_mask": "no mask with this stem",
                      "mask_without_image": "no image with this stem",
                      "listed_without_files": "in a split list, no image and no mask"}[reason]
            bad.append(Quarantined(stem, image or mask or stem, reason, detail))
            continue
        top, problem = _check(root, stem, image, mask)
        if problem:
            bad.append(problem)
        else:
            candidates.append((stem, image, mask, top))
    classes, declared = _classes(root, layout, max((c[3] for c in candidates), default=0))
    good = []
    for stem, image, mask, top in candidates:
        if top >= len(classes):
            bad.append(Quarantined(stem, mask, "value_outside_classes",
                                   f"index {top} >= {len(classes)} declared classes "
                                   f"(255 = ignore allowed)"))
        else:
            good.append((stem, image, mask))
    pairs, scheme = _splits(root, good, given, val_fraction, test_fraction, seed)
    return SegmentationScan(root, layout, classes, declared, pairs,
                            sorted(bad, key=lambda q: (q.stem, q.reason)), unlisted, scheme)


def _classes(root: Path, layout: str, top: int) -> tuple[list[str], bool]:
    if (root / CLASSES_FILE).is_file():
        return read_classes(root / CLASSES_FILE), True
    if layout == LAYOUT_VOC:
        return list(VOC_CLASSES), True
    return [f"class_{i}" for i in range(max(top, 1) + 1)], False


def _splits(root: Path, good: list[tuple[str, str, str]], given: dict[str, str] | None,
            val_fraction: float, test_fraction: float, seed: int) -> tuple[list[Pair], dict]:
    if not good:
        return [], {}
    entries = [FileEntry(root / image, image, given.get(stem) if given else None, "")
               for stem, image, _ in good]
    hashes = {image: _pair_hash(root, image, mask) for _, image, mask in good}
    split_of = {e.relpath: e.split for e in
                assign_splits(entries, val_fraction, test_fraction, seed, hashes=hashes)}
    return ([Pair(stem, image, mask, split_of[image]) for stem, image, mask in good],
            split_scheme(entries, val_fraction, test_fraction, seed,
                         "the dataset's lists, ImageSets/Segmentation/*.txt"))


def load_pair(root: Path, pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """A checked pair's pixels: (H x W x 3 uint8 RGB image, H x W uint8 class indices)."""
    rgb = np.asarray(load_image(Path(root) / pair.image, 3))
    return rgb, read_mask(Path(root) / pair.mask).astype(np.uint8)

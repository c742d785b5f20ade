"""Ingest: defective-input catalogue, ImageFolder scanning, splits, safe archives."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from visionflow.data import images, inspect, scan, source, splits
from visionflow.data.archive import EXTRACT_MARKER
from visionflow.data.scan import FileEntry
from visionflow.errors import DataError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------
# helpers


def _noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny file whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` (links not followed) with size, mtime and hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_dir() and not p.is_symlink():  # a dir's mtime changes with temp entries
                out[p.relative_to(folder).as_posix()] = (st.st_mode,)
                continue
            digest = "" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            out[p.relative_to(folder).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


# ---------------------------------------------------------------------------
# defective / unusual image catalogue


def _catalogue(d: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {}
    files["zero.jpg"] = b""
    files["text.jpg"] = b"this is not an image\n" * 10
    files["random.png"] = RNG.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    jpeg = _encode(_noise(64, 64), "JPEG", quality=90)
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["truncated_header.jpg"] = jpeg[:100]
    png = _encode(_noise(64, 64), "PNG")
    files["truncated.png"] = png[: len(png) // 2]
    broken = bytearray(_encode(_noise(32, 32), "PNG"))
    broken[broken.index(b"IDAT") + 20] ^= 0xFF
    files["broken_stream.png"] = bytes(broken)
    files["small.png"] = _encode(_noise(4, 4), "PNG")
    files["bomb.png"] = _bomb_png()
    files["ok.png"] = _encode(_noise(40, 30), "PNG")
    files["ok.ppm"] = _encode(_noise(16, 16), "PPM")  # decodable by Pillow, not accepted
    files["cmyk.jpg"] = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 255, 0] + [255, 255, 255] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    files["palette.png"] = _encode(pal, "PNG", transparency=0)
    sixteen = np.array([[0, 32896, 65535, 65535]] * 4, dtype=np.uint16)
    files["sixteen.png"] = _encode(Image.fromarray(sixteen), "PNG")
    files["la.png"] = _encode(Image.new("LA", (8, 8), (200, 128)), "PNG")
    files["rgba.png"] = _encode(Image.new("RGBA", (8, 8), (200, 100, 50, 128)), "PNG")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["anim.gif"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    files["rotated.jpg"] = _encode(Image.new("RGB", (40, 20), (10, 200, 10)), "JPEG", exif=exif)
    files["image.bmp"] = _encode(_noise(12, 10), "BMP")
    files["image.tiff"] = _encode(_noise(12, 10), "TIFF")
    if features.check("webp"):
        files["image.webp"] = _encode(_noise(12, 10), "WEBP", lossless=True)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict[str, Path]:
    return _catalogue(tmp_path_factory.mktemp("catalogue"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero.jpg", "zero_byte"),
        ("text.jpg", "not_an_image"),
        ("random.png", "not_an_image"),
        ("ok.ppm", "not_an_image"),
        ("truncated.jpg", "truncated"),
        ("truncated_header.jpg", "truncated"),
        ("truncated.png", "truncated"),
        ("broken_stream.png", "undecodable"),
        ("bomb.png", "decompression_bomb"),
    ],
)
def test_defective_files_get_a_reason(catalogue, name, reason):
    info = inspect.inspect_image(catalogue[name], 3, min_width=8, min_height=8)
    assert info.reason == reason
    assert not info.decodable
    assert info.error and "\n" not in info.error
    assert info.bytes == catalogue[name].stat().st_size
    with pytest.raises(DataError, match=name):
        images.load_image(catalogue[name])


def test_too_small_is_decodable_but_flagged(catalogue):
    info = inspect.inspect_image(catalogue["small.png"], 3, min_width=8, min_height=8)
    assert (info.decodable, info.reason, info.width, info.height) == (True, "too_small", 4, 4)
    assert inspect.inspect_image(catalogue["small.png"]).reason is None  # default limits


def test_max_pixels_limit(catalogue):
    info = inspect.inspect_image(catalogue["ok.png"], max_pixels=100)
    assert info.reason == "decompression_bomb"
    assert "40x30" in info.error or "1200" in info.error
    assert inspect.inspect_image(catalogue["ok.png"]).reason is None


def test_good_file_info(catalogue):
    info = inspect.inspect_image(catalogue["ok.png"])
    data = catalogue["ok.png"].read_bytes()
    assert info.ok and info.decodable
    assert (info.width, info.height, info.mode, info.format) == (40, 30, "RGB", "PNG")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    arr = np.asarray(Image.open(catalogue["ok.png"]), dtype=np.float64) / 255
    assert np.allclose(info.mean, arr.reshape(-1, 3).mean(0), atol=1e-5)
    assert np.allclose(info.std, arr.reshape(-1, 3).std(0), atol=1e-5)
    gray = inspect.inspect_image(catalogue["ok.png"], channels=1)
    assert len(gray.mean) == 1 and len(gray.std) == 1


def test_cmyk_jpeg_to_rgb(catalogue):
    info = inspect.inspect_image(catalogue["cmyk.jpg"])
    assert info.ok and info.mode == "CMYK"
    img = images.load_image(catalogue["cmyk.jpg"])
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_palette_transparency_composited_on_black(catalogue):
    assert inspect.inspect_image(catalogue["palette.png"]).mode == "P"
    img = images.load_image(catalogue["palette.png"])
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 0)  # transparent -> black
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_scaled_not_clipped(catalogue):
    info = inspect.inspect_image(catalogue["sixteen.png"])
    assert info.ok and info.mode.startswith("I")
    arr = np.asarray(images.load_image(catalogue["sixteen.png"], channels=1))
    assert arr.dtype == np.uint8
    assert arr[0].tolist() == [0, 128, 255, 255]


def test_alpha_composited_on_black(catalogue):
    (la,) = set(images.load_image(catalogue["la.png"], channels=1).getdata())
    assert abs(la - 200 * 128 / 255) <= 1.5
    r, g, b = images.load_image(catalogue["rgba.png"]).getpixel((3, 3))
    assert abs(r - 100) <= 1.5 and abs(g - 50) <= 1.5 and abs(b - 25) <= 1.5


def test_animated_gif_first_frame(catalogue):
    info = inspect.inspect_image(catalogue["anim.gif"])
    assert info.ok and info.format == "GIF" and info.frames == 2
    r, g, b = images.load_image(catalogue["anim.gif"]).getpixel((4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_applied(catalogue):
    assert Image.open(catalogue["rotated.jpg"]).size == (40, 20)
    assert images.load_image(catalogue["rotated.jpg"]).size == (20, 40)
    info = inspect.inspect_image(catalogue["rotated.jpg"])
    assert (info.width, info.height) == (20, 40)
    assert images.decode_resized(catalogue["rotated.jpg"], 16, 3).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("name", "fmt"), [("image.bmp", "BMP"), ("image.tiff", "TIFF"), ("image.webp", "WEBP")]
)
def test_other_formats(catalogue, name, fmt):
    if name not in catalogue:
        pytest.skip("Pillow built without WebP")
    info = inspect.inspect_image(catalogue[name])
    assert info.ok and info.format == fmt and (info.width, info.height) == (12, 10)
    expected = np.asarray(Image.open(catalogue[name]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(
        np.asarray(images.load_image(catalogue[name])).transpose(2, 0, 1), expected
    )
    assert images.decode_resized(catalogue[name], 12, 3).shape == (3, 12, 12)  # stretched


def test_decode_resized_shapes(catalogue):
    arr = images.decode_resized(catalogue["ok.png"], 32, 3)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8 and arr.flags.c_contiguous
    assert images.decode_resized(catalogue["ok.png"], 8, 1).shape == (1, 8, 8)
    same = images.decode_resized(catalogue["small.png"], 4, 3)  # no resize needed
    assert np.array_equal(same, np.asarray(Image.open(catalogue["small.png"])).transpose(2, 0, 1))
    with pytest.raises(DataError, match="channels"):
        images.decode_resized(catalogue["ok.png"], 8, 2)


def test_decode_from_bytes_and_streams(catalogue):
    data = catalogue["rotated.jpg"].read_bytes()
    from_file = images.decode_resized(catalogue["rotated.jpg"], 16, 3)
    assert np.array_equal(images.decode_resized(data, 16, 3), from_file)
    assert np.array_equal(images.decode_resized(io.BytesIO(data), 16, 3), from_file)
    assert images.load_image(io.BytesIO(data)).size == (20, 40)
    with pytest.raises(DataError, match="zero_byte"):
        images.decode_resized(io.BytesIO(b""), 16, 3)
    with pytest.raises(DataError, match="not_an_image"):
        images.decode_resized(b"hello", 16, 3)


def test_inputs_never_modified(tmp_path):
    files = _catalogue(tmp_path / "in")
    before = _snapshot(tmp_path)
    paths = sorted(files.values())
    infos = inspect.inspect_many(paths, 3, workers=1, min_width=8, min_height=8)
    for p in paths:
        try:
            images.load_image(p)
            images.decode_resized(p, 16, 1)
        except DataError:
            pass
    assert _snapshot(tmp_path) == before
    assert [i.path for i in infos] == [str(p) for p in paths]


def test_inspect_many_pool_keeps_order(tmp_path):
    png = _encode(Image.new("L", (9, 9), 7), "PNG")
    paths = []
    for i in range(520):  # above the in-process threshold
        p = tmp_path / f"{i:04d}.png"
        p.write_bytes(png if i % 100 else b"")
        paths.append(p)
    paths.reverse()
    infos = inspect.inspect_many(paths, 1, workers=2, min_width=8, min_height=8)
    assert [i.path for i in infos] == [str(p) for p in paths]
    assert Counter(i.reason for i in infos) == {None: 514, "zero_byte": 6}


# ---------------------------------------------------------------------------
# scanning


def _touch_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))


def test_scan_flat_layout(tmp_path):
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    _touch_png(outside / "secret.png")
    (outside / "dir").mkdir()
    _touch_png(outside / "dir" / "x.png")
    for rel in ("cat/a.png", "cat/nested/deep/b.png", "dog/c.png", "dog/sub/d.png"):
        _touch_png(root / rel)
    for rel in ("cat/.DS_Store", "cat/Thumbs.db", "dog/desktop.ini", "cat/.hidden/e.png"):
        _touch_png(root / rel)
    _touch_png(root / "__MACOSX" / "cat" / "._a.png")
    _touch_png(root / ".git" / "x.png")
    (root / "bird").mkdir()
    (root / "fish" / ".thumbs").mkdir(parents=True)  # only hidden content: empty
    (root / "cat" / "link_out.png").symlink_to(outside / "secret.png")
    (root / "dog" / "dir_out").symlink_to(outside / "dir")
    (root / "dog" / "link_in.png").symlink_to(root / "cat" / "a.png")
    (root / "README.txt").write_text("hello")
    before = _snapshot(tmp_path)

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
    assert _snapshot(tmp_path) == before


def test_scan_split_layout(tmp_path):
    root = tmp_path / "data"
    for rel in ("train/a/1.png", "train/b/2.png", "test/a/3.png", "test/b/4.png"):
        _touch_png(root / rel)
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
    _touch_png(root / "extra" / "x" / "1.png")
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


# ---------------------------------------------------------------------------
# archives


def _dataset(root: Path) -> Path:
    for rel in ("train/cat/1.png", "train/cat/sub/2.png", "train/dog/3.png", "test/dog/4.png"):
        _touch_png(root / rel)
    return root


def _tar(path: Path, src: Path, arcroot: str = "", mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=posix_join(arcroot, p.relative_to(src).as_posix()), recursive=False)
    return path


def posix_join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def _zip(path: Path, src: Path, arcroot: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, posix_join(arcroot, p.relative_to(src).as_posix()))
    return path


@pytest.mark.parametrize(
    ("name", "maker", "arcroot"),
    [
        ("data.tar.gz", _tar, ""),
        ("data.tgz", _tar, "mydata"),
        ("data.tar", lambda p, s, a: _tar(p, s, a, "w"), ""),
        ("data.zip", _zip, ""),
        ("nested.zip", _zip, "mydata"),
        ("readme.tgz", _tar, "withreadme"),
    ],
)
def test_good_archives_extract_and_are_reused(tmp_path, monkeypatch, name, maker, arcroot):
    src = _dataset(tmp_path / "src")
    if arcroot == "withreadme":  # a wrapper folder that also holds a README
        (src / "README.md").write_text("cifar-like")
    archive = maker(tmp_path / name, src, arcroot)
    cache = tmp_path / "cache"
    root = source.resolve_source(archive, cache)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    expected = cache / digest / arcroot if arcroot else cache / digest
    assert root == expected.resolve()
    visible = sorted(n for n in os.listdir(root) if not n.startswith("."))
    assert visible == (["README.md"] if "README.md" in visible else []) + ["test", "train"]
    found = scan.scan_imagefolder(root)
    assert [e.relpath for e in found.entries] == [
        "test/dog/4.png",
        "train/cat/1.png",
        "train/cat/sub/2.png",
        "train/dog/3.png",
    ]
    assert (root / "train/cat/1.png").read_bytes() == (src / "train/cat/1.png").read_bytes()
    assert sorted(os.listdir(cache)) == [digest]  # no temp dirs left
    marker = cache / digest / EXTRACT_MARKER
    assert marker.is_file()

    def boom(*a, **k):
        raise AssertionError("extracted again")

    monkeypatch.setattr(source, "extract_atomic", boom)
    assert source.resolve_source(archive, cache) == root


def test_incomplete_extraction_is_redone(tmp_path):
    archive = _tar(tmp_path / "d.tar.gz", _dataset(tmp_path / "src"))
    cache = tmp_path / "cache"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    (cache / digest / "train").mkdir(parents=True)  # crash leftover: no marker
    (cache / digest / "train" / "partial.png").write_bytes(b"\x89PNG")
    root = source.resolve_source(archive, cache)
    assert not (root / "train" / "partial.png").exists()
    assert (root / "train" / "dog" / "3.png").is_file()


def test_directory_source_and_bad_sources(tmp_path):
    src = _dataset(tmp_path / "src")
    assert source.resolve_source(src, tmp_path / "cache") == src.resolve()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt"):
        source.resolve_source(tmp_path / "notes.txt", tmp_path / "cache")
    with pytest.raises(DataError, match="missing.tar"):
        source.resolve_source(tmp_path / "missing.tar", tmp_path / "cache")
    (tmp_path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 20)
    with pytest.raises(DataError, match="corrupt.tar.gz"):
        source.resolve_source(tmp_path / "corrupt.tar.gz", tmp_path / "cache")
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    with pytest.raises(DataError, match="corrupt.zip"):
        source.resolve_source(tmp_path / "corrupt.zip", tmp_path / "cache")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(info, k, v)
    if info.isfile():
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _evil_tar(kind: str):
    def make(path: Path) -> str:
        with tarfile.open(path, "w:gz") as tar:
            _tar_member(tar, "train/cat/ok.png", b"fine")
            if kind == "absolute":
                member = "/tmp/visionflow-evil-abs.txt"
                _tar_member(tar, member)
            elif kind == "dotdot":
                member = "train/../../evil.txt"
                _tar_member(tar, member)
            elif kind == "symlink":
                member = "train/cat/link.png"
                _tar_member(tar, member, type=tarfile.SYMTYPE, linkname="../../../outside.txt")
                _tar_member(tar, "train/cat/link.png/escape.txt")
            elif kind == "symlink_abs":
                member = "train/link"
                _tar_member(tar, member, type=tarfile.SYMTYPE, linkname="/etc")
            elif kind == "hardlink":
                member = "train/cat/hard.png"
                _tar_member(tar, member, type=tarfile.LNKTYPE, linkname="../outside.txt")
            elif kind == "fifo":
                member = "train/cat/pipe"
                _tar_member(tar, member, type=tarfile.FIFOTYPE)
            elif kind == "device":
                member = "train/cat/null"
                _tar_member(tar, member, type=tarfile.CHRTYPE, devmajor=1, devminor=3)
            else:
                raise ValueError(kind)
            _tar_member(tar, "train/cat/after.png", b"after")
        return member

    return make


def _evil_zip(kind: str):
    def make(path: Path) -> str:
        member = {"dotdot": "train/../../evil.txt", "absolute": "/evil.txt"}[kind]
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("train/cat/ok.png", b"fine")
            zi = zipfile.ZipInfo("placeholder")
            zi.filename = member  # ZipInfo() would sanitise it; attackers' tools don't
            zf.writestr(zi, b"evil")
        return member

    return make


@pytest.mark.parametrize(
    ("suffix", "make"),
    [
        (".tar.gz", _evil_tar("absolute")),
        (".tar.gz", _evil_tar("dotdot")),
        (".tar.gz", _evil_tar("symlink")),
        (".tar.gz", _evil_tar("symlink_abs")),
        (".tar.gz", _evil_tar("hardlink")),
        (".tar.gz", _evil_tar("fifo")),
        (".tar.gz", _evil_tar("device")),
        (".zip", _evil_zip("dotdot")),
        (".zip", _evil_zip("absolute")),
    ],
    ids=[
        "tar-absolute",
        "tar-dotdot",
        "tar-symlink-out",
        "tar-symlink-abs",
        "tar-hardlink-out",
        "tar-fifo",
        "tar-device",
        "zip-dotdot",
        "zip-absolute",
    ],
)
def test_archive_attacks_refused(tmp_path, suffix, make):
    archive = tmp_path / "in" / f"evil{suffix}"
    archive.parent.mkdir()
    member = make(archive)
    cache = tmp_path / "work" / "cache"
    cache.mkdir(parents=True)
    before = _snapshot(tmp_path)
    before_tmp = set(os.listdir("/tmp"))
    with pytest.raises(DataError) as err:
        source.resolve_source(archive, cache)
    msg = str(err.value)
    assert member in msg and "evil" in msg and "\n" not in msg
    assert _snapshot(tmp_path) == before  # nothing written anywhere, temp dir removed
    assert not (set(os.listdir("/tmp")) - before_tmp) & {"visionflow-evil-abs.txt", "evil.txt"}


def test_links_inside_archive_are_skipped(tmp_path):
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _tar_member(tar, "cat/a.png", _encode(Image.new("L", (8, 8)), "PNG"))
        _tar_member(tar, "cat/b.png", type=tarfile.SYMTYPE, linkname="a.png")
        _tar_member(tar, "cat/c.png", type=tarfile.LNKTYPE, linkname="cat/a.png")
        _tar_member(tar, "dog/d.png", _encode(Image.new("L", (8, 8)), "PNG"))
    root = source.resolve_source(archive, tmp_path / "cache")
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png")) == [
        "cat/a.png",
        "dog/d.png",
    ]


# ---------------------------------------------------------------------------
# importing a dataset (`vflow data add`)


def test_import_folder_copies_files_and_skips_unsafe_links(tmp_path):
    src = _dataset(tmp_path / "wrap" / "mydata")  # a single wrapper folder: unwrapped
    (tmp_path / "secret.png").write_bytes(b"secret")
    (src / "train" / "cat" / "out.png").symlink_to(tmp_path / "secret.png")
    (src / "train" / "cat" / "in.png").symlink_to(src / "train" / "dog" / "3.png")
    (src / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    before = _snapshot(tmp_path / "wrap")
    report = source.import_dataset(tmp_path / "wrap", tmp_path / "out")
    got = sorted(p.relative_to(tmp_path / "out").as_posix()
                 for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["test/dog/4.png", "train/cat/1.png", "train/cat/in.png",
                   "train/cat/sub/2.png", "train/dog/3.png"]
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))
    assert [(r.relpath, r.reason) for r in report.skipped] == [("train/cat/out.png",
                                                                 "outside_root")]
    assert report.files == 5 and report.kind == "folder"
    assert _snapshot(tmp_path / "wrap") == before
    with pytest.raises(DataError, match="already exists"):
        source.import_dataset(tmp_path / "wrap", tmp_path / "out")


def test_import_archive_refuses_attacks_and_leaves_nothing(tmp_path):
    archive = _tar(tmp_path / "d.tgz", _dataset(tmp_path / "src"), "mydata")
    report = source.import_dataset(archive, tmp_path / "new")
    assert report.kind == "tar" and report.files == 4
    assert (tmp_path / "new" / "train" / "cat" / "sub" / "2.png").is_file()
    evil = tmp_path / "evil.tar.gz"
    member = _evil_tar("hardlink")(evil)
    with pytest.raises(DataError, match=member):
        source.import_dataset(evil, tmp_path / "bad")
    assert sorted(os.listdir(tmp_path)) == ["d.tgz", "evil.tar.gz", "new", "src"]

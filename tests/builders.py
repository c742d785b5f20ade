"""Builders the tests share: images in every defect and format, ImageFolders, safe and
malicious archives, MNIST raw files, folder snapshots. No tests here."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------
# helpers


def noise(w: int, h: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny file whose header claims w x h pixels."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` (links not followed) with size, mtime and hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if p.is_dir() and not p.is_symlink():  # a dir's mtime changes with temp entries
                out[p.relative_to(folder).as_posix()] = (st.st_mode,)
                continue
            regular = stat.S_ISREG(st.st_mode)  # (reading a FIFO would block forever)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if regular else ""
            out[p.relative_to(folder).as_posix()] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def catalogue_files(d: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {}
    files["zero.jpg"] = b""
    files["text.jpg"] = b"this is not an image\n" * 10
    files["random.png"] = RNG.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    jpeg = encode(noise(64, 64), "JPEG", quality=90)
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["truncated_header.jpg"] = jpeg[:100]
    png = encode(noise(64, 64), "PNG")
    files["truncated.png"] = png[: len(png) // 2]
    broken = bytearray(encode(noise(32, 32), "PNG"))
    broken[broken.index(b"IDAT") + 20] ^= 0xFF
    files["broken_stream.png"] = bytes(broken)
    files["small.png"] = encode(noise(4, 4), "PNG")
    files["bomb.png"] = bomb_png()
    files["ok.png"] = encode(noise(40, 30), "PNG")
    files["ok.ppm"] = encode(noise(16, 16), "PPM")  # decodable by Pillow, not accepted
    files["cmyk.jpg"] = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 255, 0] + [255, 255, 255] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    files["palette.png"] = encode(pal, "PNG", transparency=0)
    sixteen = np.array([[0, 32896, 65535, 65535]] * 4, dtype=np.uint16)
    files["sixteen.png"] = encode(Image.fromarray(sixteen), "PNG")
    files["la.png"] = encode(Image.new("LA", (8, 8), (200, 128)), "PNG")
    files["rgba.png"] = encode(Image.new("RGBA", (8, 8), (200, 100, 50, 128)), "PNG")
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    files["anim.gif"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    files["rotated.jpg"] = encode(Image.new("RGB", (40, 20), (10, 200, 10)), "JPEG", exif=exif)
    files["image.bmp"] = encode(noise(12, 10), "BMP")
    files["image.tiff"] = encode(noise(12, 10), "TIFF")
    if features.check("webp"):
        files["image.webp"] = encode(noise(12, 10), "WEBP", lossless=True)
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


def touch_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))




def small_dataset(root: Path) -> Path:
    for rel in ("train/cat/1.png", "train/cat/sub/2.png", "train/dog/3.png", "test/dog/4.png"):
        touch_png(root / rel)
    return root


def tar_of(path: Path, src: Path, arcroot: str = "", mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=posix_join(arcroot, p.relative_to(src).as_posix()), recursive=False)
    return path


def posix_join(a: str, b: str) -> str:
    return f"{a}/{b}" if a else b


def zip_of(path: Path, src: Path, arcroot: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, posix_join(arcroot, p.relative_to(src).as_posix()))
    return path


def tar_member(tar: tarfile.TarFile, name: str, data: bytes = b"x", **attrs) -> None:
    info = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(info, k, v)
    if info.isfile():
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def evil_tar(kind: str):
    def make(path: Path) -> str:
        with tarfile.open(path, "w:gz") as tar:
            tar_member(tar, "train/cat/ok.png", b"fine")
            if kind == "absolute":
                member = "/tmp/visionflow-evil-abs.txt"
                tar_member(tar, member)
            elif kind == "dotdot":
                member = "train/../../evil.txt"
                tar_member(tar, member)
            elif kind == "symlink":
                member = "train/cat/link.png"
                tar_member(tar, member, type=tarfile.SYMTYPE, linkname="../../../outside.txt")
                tar_member(tar, "train/cat/link.png/escape.txt")
            elif kind == "symlink_abs":
                member = "train/link"
                tar_member(tar, member, type=tarfile.SYMTYPE, linkname="/etc")
            elif kind == "hardlink":
                member = "train/cat/hard.png"
                tar_member(tar, member, type=tarfile.LNKTYPE, linkname="../outside.txt")
            elif kind == "fifo":
                member = "train/cat/pipe"
                tar_member(tar, member, type=tarfile.FIFOTYPE)
            elif kind == "device":
                member = "train/cat/null"
                tar_member(tar, member, type=tarfile.CHRTYPE, devmajor=1, devminor=3)
            else:
                raise ValueError(kind)
            tar_member(tar, "train/cat/after.png", b"after")
        return member

    return make


def evil_zip(kind: str):
    def make(path: Path) -> str:
        member = {"dotdot": "train/../../evil.txt", "absolute": "/evil.txt"}[kind]
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("train/cat/ok.png", b"fine")
            zi = zipfile.ZipInfo("placeholder")
            zi.filename = member  # ZipInfo() would sanitise it; attackers' tools don't
            zf.writestr(zi, b"evil")
        return member

    return make



def write_imagefolder(root: Path, counts: dict[str, int], size: int = 16) -> Path:
    """`counts` maps "split/class" (or "class") to a number of distinct RGB PNGs. The pixels
    depend only on the relative path, so contents (and content-addressed splits) are the same
    whichever test runs first."""
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng(zlib.crc32(f"{folder}/{i}".encode()))
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            (root / folder / f"{i:03d}.png").write_bytes(encode(img, "PNG"))
    return root


PHOTO_SIZES = [(500, 375), (375, 500), (320, 240), (640, 480), (260, 260), (1200, 900)]


def write_photo_folder(root: Path, counts: dict[str, int], classes=("ants", "bees")) -> Path:
    """Mixed-size JPEG "photos" (500×375 ... 1200×900): `counts` maps a split to images per
    class. Each class has its own colour, with noise; pixels depend on the path only."""
    for split, n in counts.items():
        for ci, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng(zlib.crc32(f"{split}/{name}/{i}".encode()))
                w, h = PHOTO_SIZES[(i + ci) % len(PHOTO_SIZES)]
                base = rng.integers(0, 60, (4, 4, 3), dtype=np.uint8)
                base[..., ci % 3] += 180
                img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
                (root / split / name / f"{i:03d}.jpg").write_bytes(encode(img, "JPEG"))
    return root


# 16 files with their own val/ and test/ (nothing carved, so the counts are exact)
BASE = {"train/cat": 5, "val/cat": 1, "train/dog": 5, "val/dog": 1, "test/cat": 2, "test/dog": 2}


MNIST_PER_CLASS = {"train": 6, "t10k": 2}  # images per digit in each raw file


def write_mnist_raw(raw: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Real MNIST IDX files (big-endian header, uint8 payload): every digit, a few each."""
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True)
    images = {}
    for prefix, n in MNIST_PER_CLASS.items():
        labels = np.repeat(np.arange(10, dtype=np.uint8), n)
        pixels = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, len(labels), 28, 28) + pixels.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, len(labels)) + labels.tobytes())
        images[prefix] = pixels
    return images


def flat_digits(dst: Path, digits_dir: Path, per_class: int) -> Path:
    """`dst/<digit>/*.png`: the digits without their folders' splits (so splits are carved)."""
    for label in sorted(p.name for p in (digits_dir / "train").iterdir()):
        files = sorted(f for s in ("train", "val", "test")
                       for f in (digits_dir / s / label).iterdir())
        (dst / label).mkdir(parents=True)
        for f in files[:per_class]:
            shutil.copy(f, dst / label / f.name)
    return dst


def wait_for(fn: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    """Poll `fn` until it returns something truthy (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


SHARD_CLASSES = ["ants", "bees"]
SHARD_SIZES = [(500, 375), (375, 500), (320, 240), (640, 480), (260, 260), (90, 120)]


def shard_photos(root: Path, n: int, start: int = 0, seed: int = 0) -> list[dict]:
    """Generated JPEGs of varying sizes in two classes, and their manifest rows."""
    rng = np.random.default_rng(seed + start)
    rows = []
    for i in range(start, start + n):
        label = SHARD_CLASSES[i % 2]
        w, h = SHARD_SIZES[i % len(SHARD_SIZES)]
        base = rng.integers(0, 255, (3, 3, 3), dtype=np.uint8)
        path = root / label / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base).resize((w, h)).save(path, quality=85)
        rows.append({"path": f"{label}/{i:04d}.jpg", "label": label, "format": "JPEG",
                     "mode": "RGB", "width": w, "height": h,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return rows


def pack_shards(rows: list[dict], root: Path, out: Path, **kw: Any):
    """`shard_photos`' rows packed into one split's shards at `out` (small shards)."""
    from visionflow.data.shards import pack_split

    opts = {"max_side": 1024, "channels": 3, "shard_bytes": 1 << 16, "workers": 1} | kw
    return pack_split(rows, root, out, SHARD_CLASSES, **opts)

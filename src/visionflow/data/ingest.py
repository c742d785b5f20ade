"""Ingest: resolve a data source, scan an ImageFolder, assign splits, decode images.

Only the standard library, numpy and (lazily) Pillow are imported here, so the
module loads fast and can be used by worker processes.

Image normalisation (`load_image`, `decode_resized`):
  * EXIF orientation is applied (`ImageOps.exif_transpose`);
  * the first frame of animated images is used;
  * alpha (RGBA, LA, PA, palette transparency) is composited on black,
    i.e. colours are multiplied by alpha and the alpha channel is dropped;
  * 16/32-bit integer images are scaled to 8 bits (65535 -> 255), float images
    in 0..1 are scaled by 255; CMYK, YCbCr, palette, 1-bit ... go to RGB;
  * the result is RGB (channels=3) or L (channels=1, ITU-R 601 luma).
Input files are only ever read, never modified or deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from visionflow.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

MemberHook = Callable[[str, bytes], None]  # (archive member name, its bytes)
SPLITS = ("train", "val", "test")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
# Pillow plugins we open (JPEG also yields "MPO", Pillow's name for many camera JPEGs);
# others (EPS, PSD, ...) are refused as not_an_image.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS
REASONS = (
    "zero_byte",
    "not_an_image",
    "truncated",
    "undecodable",
    "too_small",
    "decompression_bomb",
)
EXTRACT_MARKER = ".visionflow-extracted.json"
_IN_PROCESS_BELOW = 500
_READ_WHOLE_BELOW = 64 << 20  # files smaller than this are read into memory once


# ---------------------------------------------------------------------------
# data classes


class FileEntry:
    """One file of the dataset: absolute path, posix relpath under the dataset root, split
    (train/val/test, None = to be assigned) and label. An immutable value; the `Path` is
    built on first use (a scan makes 10^5 of these and mostly needs the string)."""

    __slots__ = ("_path", "relpath", "split", "label")

    def __init__(self, path: Path | str, relpath: str, split: str | None, label: str) -> None:
        self._path, self.relpath, self.split, self.label = path, relpath, split, label

    @property
    def path(self) -> Path:
        if not isinstance(self._path, Path):
            self._path = Path(self._path)
        return self._path

    @property
    def fspath(self) -> str:
        return self._path if isinstance(self._path, str) else str(self._path)

    def with_split(self, split: str | None) -> FileEntry:
        return FileEntry(self._path, self.relpath, split, self.label)

    def _key(self) -> tuple[str, str, str | None, str]:
        return self.fspath, self.relpath, self.split, self.label

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileEntry) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"FileEntry(path={self.fspath!r}, relpath={self.relpath!r}, "
                f"split={self.split!r}, label={self.label!r})")


@dataclass(frozen=True, slots=True)
class Reject:
    relpath: str
    reason: str  # outside_root, broken_link, not_a_file, no_class
    detail: str


@dataclass(slots=True)
class ScanResult:
    entries: list[FileEntry]
    rejects: list[Reject] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # "cat" or "train/cat"
    layout: str = "flat"  # "split" when the root had train/val/test folders


@dataclass(slots=True)
class ImageInfo:
    path: str
    width: int = 0  # after EXIF orientation
    height: int = 0
    mode: str = ""  # mode as stored in the file
    format: str = ""
    bytes: int = 0
    sha256: str = ""
    decodable: bool = False
    reason: str | None = None  # one of REASONS, None when fine
    error: str | None = None  # one-line detail
    mean: tuple[float, ...] = ()  # per channel, 0..1, after normalisation
    std: tuple[float, ...] = ()
    frames: int = 1

    @property
    def ok(self) -> bool:
        return self.reason is None


# ---------------------------------------------------------------------------
# sources and archives


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(ARCHIVE_SUFFIXES):
        return "tar"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_source(
    source: Path, extract_root: Path, on_member: MemberHook | None = None
) -> Path:
    """Return the dataset root for a directory or a .tar/.tar.gz/.tgz/.zip archive.

    Archives are extracted (safely) into `extract_root/<sha256[:16]>` and reused
    when that folder is complete (its marker file exists). When an extraction happens,
    `on_member(name, data)` gets each regular member's bytes (name relative to that
    folder) after it is written, e.g. to inspect images while the rest is extracted.
    """
    source = Path(source)
    if source.is_dir():
        return source.resolve()
    if not source.exists():
        raise DataError(f"data source not found: {source}")
    kind = _archive_kind(source)
    if kind is None or not source.is_file():
        raise DataError(
            f"data source is neither a directory nor a .tar/.tar.gz/.tgz/.zip archive: {source}"
        )
    digest = sha256_file(source)
    extract_root = Path(extract_root)
    dest = extract_root / digest[:16]
    if not (dest / EXTRACT_MARKER).is_file():
        if on_member is None:  # (keeps the call patchable with the old signature)
            _extract_atomic(source, kind, digest, dest)
        else:
            _extract_atomic(source, kind, digest, dest, on_member)
    return _dataset_root(dest)


def _extract_atomic(
    source: Path, kind: str, digest: str, dest: Path, on_member: MemberHook | None = None
) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        extract = _extract_tar if kind == "tar" else _extract_zip
        count = extract(source, tmp, on_member)
        marker = {"archive": str(source), "sha256": digest, "members": count}
        (tmp / EXTRACT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # last
        if dest.exists():  # a leftover without marker (crash) or a racing extraction
            if (dest / EXTRACT_MARKER).is_file():
                return
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / EXTRACT_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_member_name(name: str, archive: Path) -> str | None:
    """Normalised posix name inside the target, or None for the root itself."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise DataError(f"unsafe archive member {name!r} in {archive.name}: absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"unsafe archive member {name!r} in {archive.name}: '..' in path")
    return "/".join(parts) or None


def _link_inside(member: str, target: str, hard: bool) -> bool:
    """Whether a link `member` -> `target` stays inside the extraction root."""
    target = target.replace("\\", "/")
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        return False
    base = "" if hard else posixpath.dirname(member)
    joined = posixpath.normpath(posixpath.join(base, target))
    return joined != ".." and not joined.startswith("../")


def _unsafe(member: str, archive: Path, why: str) -> DataError:
    return DataError(f"unsafe archive member {member!r} in {archive.name}: {why}")


def _write_member(target: Path, name: str, src: IO[bytes], made: set[str],
                  size: int = -1, on_member: MemberHook | None = None) -> None:
    parent = posixpath.dirname(name)
    if parent not in made:
        (target / parent).mkdir(parents=True, exist_ok=True)
        made.add(parent)
    if on_member is not None and 0 <= size < _READ_WHOLE_BELOW:
        data = src.read()
        with open(target / name, "wb") as dst:
            dst.write(data)
        on_member(name, data)
        return
    with open(target / name, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _extract_tar(archive: Path, target: Path, on_member: MemberHook | None = None) -> int:
    """Single streaming pass with the `filter="data"` rules, checked by us.

    Absolute names, '..' components, links resolving outside the target and
    device/fifo members are refused (the temp target is then discarded). Links
    inside the archive are skipped, so no path written through can be a link;
    files get default permissions (no owner, mode or setuid bits are restored).
    """
    count = 0
    made: set[str] = {""}
    try:
        with tarfile.open(archive, "r|*") as tar:
            for m in tar:
                name = _safe_member_name(m.name, archive)
                if m.issym() or m.islnk():
                    if name is None or not _link_inside(name, m.linkname, m.islnk()):
                        kind = "symlink" if m.issym() else "hardlink"
                        why = f"{kind} to {m.linkname!r} points outside the target"
                        raise _unsafe(m.name, archive, why)
                    continue  # links inside the archive are skipped
                if m.ischr() or m.isblk() or m.isfifo():
                    raise _unsafe(m.name, archive, "device or fifo file")
                if name is None:
                    continue
                if m.isdir():
                    (target / name).mkdir(parents=True, exist_ok=True)
                    made.add(name)
                elif m.isfile():
                    src = tar.extractfile(m)
                    if src is not None:
                        _write_member(target, name, src, made, m.size, on_member)
                else:
                    continue  # other types (e.g. GNU volume headers): nothing to write
                count += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {archive}: {_one_line(e)}") from None
    return count


def _extract_zip(archive: Path, target: Path, on_member: MemberHook | None = None) -> int:
    try:
        with zipfile.ZipFile(archive) as zf:
            keep: list[tuple[zipfile.ZipInfo, str]] = []
            for info in zf.infolist():
                name = _safe_member_name(info.filename, archive)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    link = zf.read(info).decode("utf-8", "replace")
                    if name is None or not _link_inside(name, link, hard=False):
                        why = f"symlink to {link!r} points outside the target"
                        raise _unsafe(info.filename, archive, why)
                    continue
                if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                    raise _unsafe(info.filename, archive, "device or fifo file")
                if name is not None:
                    keep.append((info, name))
            made: set[str] = {""}
            for info, name in keep:
                if info.is_dir():
                    (target / name).mkdir(parents=True, exist_ok=True)
                    made.add(name)
                    continue
                with zf.open(info) as src:
                    _write_member(target, name, src, made, info.file_size, on_member)
            return len(keep)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot read archive {archive}: {_one_line(e)}") from None


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _visible(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not _ignored(e.name)), key=lambda e: e.name)


def _dataset_root(folder: Path) -> Path:
    """Descend through single wrapper folders (e.g. `cifar10/train/...`)."""
    folder = folder.resolve()
    for _ in range(8):
        children = _visible(folder)
        if len(children) != 1 or not children[0].is_dir(follow_symlinks=False):
            break
        child = Path(children[0].path)
        if child.name in SPLITS:
            break
        grand = _visible(child)
        dirs = [g for g in grand if g.is_dir(follow_symlinks=False)]
        # descend when the child holds split folders, or only (class) folders
        if not any(g.name in SPLITS for g in dirs) and (not dirs or len(dirs) < len(grand)):
            break
        folder = child
    return folder


# ---------------------------------------------------------------------------
# importing a dataset into the project (`vflow data add`)


@dataclass(slots=True)
class ImportReport:
    source: str
    kind: str  # "folder", "tar" or "zip"
    files: int = 0
    skipped: list[Reject] = field(default_factory=list)  # not copied, with the reason


def import_dataset(source: Path, target: Path) -> ImportReport:
    """Copy a folder, or safely extract an archive, into `target` (which must not exist).

    Archives get the checks of `resolve_source` (absolute paths, '..', links out of the
    target, device files: refused with an error naming the member; links inside are
    skipped). From a folder, regular files are copied with their mtimes; hidden files and
    OS clutter, links resolving outside the source, broken links and special files are
    skipped and reported. Single wrapper folders (`cifar10/train/...`) are unwrapped.
    The source is only read. On error nothing is left at `target`.
    """
    source, target = Path(source), Path(target)
    if target.exists() or target.is_symlink():
        raise DataError(f"import target already exists: {target}")
    if not source.exists():
        raise DataError(f"data source not found: {source}")
    kind = "folder" if source.is_dir() else _archive_kind(source)
    if kind is None or (kind != "folder" and not source.is_file()):
        raise DataError(
            f"data source is neither a directory nor a .tar/.tar.gz/.tgz/.zip archive: {source}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.import-", dir=target.parent))
    report = ImportReport(str(source), kind)
    try:
        tmp.chmod(0o755)
        if kind == "folder":
            root = _dataset_root(source)
            report.files = _copy_tree(root, tmp / "d", report.skipped)
            if not report.files:
                raise DataError(f"{source}: no files to import")
            (tmp / "d").rename(target)
        else:
            out = tmp / "x"
            out.mkdir()
            n = _extract_tar(source, out) if kind == "tar" else _extract_zip(source, out)
            if not n:
                raise DataError(f"{source}: archive is empty")
            _dataset_root(out).rename(target)
            report.files = sum(len(files) for _, _, files in os.walk(target))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _copy_tree(src_root: Path, dst: Path, skipped: list[Reject]) -> int:
    src_root = Path(src_root).resolve()
    copied = 0
    seen = {str(src_root)}
    stack = [src_root]
    cut = len(os.path.join(str(src_root), ""))
    dst.mkdir()
    while stack:
        folder = stack.pop()
        for e in _visible(folder):
            path, rel = Path(e.path), e.path[cut:].replace(os.sep, "/")
            if e.is_symlink():
                real = os.path.realpath(path)
                if not Path(real).is_relative_to(src_root):
                    skipped.append(_reject(src_root, path, "outside_root"))
                    continue
                if not os.path.exists(real):
                    skipped.append(_reject(src_root, path, "broken_link"))
                    continue
            if e.is_dir():
                real = os.path.realpath(path)
                if real not in seen:
                    seen.add(real)
                    (dst / rel).mkdir(parents=True, exist_ok=True)
                    stack.append(path)
            elif e.is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dst / rel)  # follows an inside link: copies its content
                copied += 1
            else:
                skipped.append(_reject(src_root, path, "not_a_file"))
    return copied


# ---------------------------------------------------------------------------
# scanning


def scan_imagefolder(root: Path) -> ScanResult:
    """Scan `root/<split>/<class>/**/file` or `root/<class>/**/file`.

    Hidden files/dirs and OS clutter are ignored; symlinks resolving outside
    `root` are not followed but reported as rejects (`outside_root`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root is not a directory: {root}")
    root = root.resolve()
    top = _visible(root)
    top_dirs = [e for e in top if e.is_dir()]
    rejects: list[Reject] = []
    entries: list[FileEntry] = []
    empty: list[str] = []

    if any(e.name in SPLITS for e in top_dirs):
        others = [e.name for e in top_dirs if e.name not in SPLITS]
        if others:
            raise DataError(
                f"dataset root {root} mixes split folders (train/val/test) with other "
                f"folders: {', '.join(others)}"
            )
        groups = [(e.name, Path(e.path)) for e in top_dirs]
    else:
        groups = [(None, root)]

    for entry in top:  # loose files next to the class/split folders
        if not entry.is_dir():
            _reject_or_note(root, Path(entry.path), rejects, "no_class")
    for split, split_dir in groups:
        for entry in _visible(split_dir):
            path = Path(entry.path)
            if not entry.is_dir():
                if split is not None:
                    _reject_or_note(root, path, rejects, "no_class")
                continue
            if not _inside(root, path):
                rejects.append(_reject(root, path, "outside_root"))
                continue
            label = entry.name
            found = _walk_class(root, path, split, label, rejects)
            if not found:
                empty.append(f"{split}/{label}" if split else label)
            entries.extend(found)

    entries.sort(key=lambda e: e.relpath)
    rejects.sort(key=lambda r: r.relpath)
    layout = "flat" if groups == [(None, root)] else "split"
    return ScanResult(entries, rejects, sorted(empty), layout)


def _inside(root: Path, path: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(root)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _reject(root: Path, path: Path, reason: str) -> Reject:
    detail = {
        "outside_root": f"symlink resolves outside the dataset root: {os.path.realpath(path)}",
        "broken_link": f"symlink target does not exist: {os.path.realpath(path)}",
        "not_a_file": "not a regular file (fifo, socket or device)",
        "no_class": "file is not inside a class folder",
    }[reason]
    return Reject(_rel(root, path), reason, detail)


def _reject_or_note(root: Path, path: Path, rejects: list[Reject], reason: str) -> None:
    if path.is_symlink() and not _inside(root, path):
        rejects.append(_reject(root, path, "outside_root"))
    else:
        rejects.append(_reject(root, path, reason))


def _walk_class(
    root: Path, class_dir: Path, split: str | None, label: str, rejects: list[Reject]
) -> list[FileEntry]:
    out: list[FileEntry] = []
    seen = {os.path.realpath(class_dir)}
    stack = [class_dir]
    cut = len(os.path.join(str(root), ""))  # paths below start with `root`: slice them
    while stack:
        folder = stack.pop()
        try:
            children = _visible(folder)
        except OSError:
            continue
        for e in children:
            link = e.is_symlink()
            if not link and e.is_file(follow_symlinks=False):  # the common case: fast path
                out.append(FileEntry(e.path, e.path[cut:].replace(os.sep, "/"), split, label))
                continue
            path = Path(e.path)
            if link:
                real = os.path.realpath(path)
                if not Path(real).is_relative_to(root):
                    rejects.append(_reject(root, path, "outside_root"))
                    continue
                if not os.path.exists(real):
                    rejects.append(_reject(root, path, "broken_link"))
                    continue
            if e.is_dir():
                real = os.path.realpath(path)
                if real not in seen:  # guards against symlink loops
                    seen.add(real)
                    stack.append(path)
            elif e.is_file():
                out.append(FileEntry(e.path, e.path[cut:].replace(os.sep, "/"), split, label))
            else:
                rejects.append(_reject(root, path, "not_a_file"))
    return out


# ---------------------------------------------------------------------------
# splits


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


# ---------------------------------------------------------------------------
# decoding


class _ImageProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _one_line(e: BaseException | str) -> str:
    text = str(e) if str(e) else type(e).__name__
    return " ".join(text.split())[:300]


@cache
def _open_formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)  # e.g. WEBP may be missing


@contextmanager
def _pillow_guard(max_pixels: int) -> Iterator[None]:
    """Pillow limits for one decode. Mutates Pillow globals: not thread-safe."""
    from PIL import Image, ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _open_loaded(
    source: Path | io.BytesIO, max_pixels: int, draft: int | None = None
) -> PILImage.Image:
    """Open and fully decode the first frame; raise _ImageProblem on failure."""
    from PIL import Image, UnidentifiedImageError

    with _pillow_guard(max_pixels):
        try:
            img = Image.open(source, formats=_open_formats())
        except UnidentifiedImageError:
            raise _ImageProblem(
                "not_an_image", f"not a supported image ({', '.join(FORMATS)})"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _ImageProblem("decompression_bomb", _one_line(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # a recognised header that ends early is truncated, anything else is not an image
            cut = isinstance(e, EOFError) or "truncat" in str(e).lower()
            raise _ImageProblem("truncated" if cut else "not_an_image", _one_line(e)) from None
        w, h = img.size
        if w * h > max_pixels:
            raise _ImageProblem(
                "decompression_bomb",
                f"image size {w}x{h} ({w * h} pixels) exceeds max_pixels={max_pixels}",
            )
        if w <= 0 or h <= 0:
            raise _ImageProblem("undecodable", f"invalid image size {w}x{h}")
        if draft and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
            img.draft(img.mode, (draft, draft))  # DCT downscale, keeps size >= draft
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _ImageProblem("decompression_bomb", _one_line(e)) from None
        except EOFError as e:
            raise _ImageProblem("truncated", _one_line(e) or "unexpected end of file") from None
        except (OSError, SyntaxError, ValueError, TypeError, IndexError, zlib.error) as e:
            reason = "truncated" if "truncat" in str(e).lower() else "undecodable"
            raise _ImageProblem(reason, _one_line(e)) from None
        except MemoryError:
            raise _ImageProblem("undecodable", "out of memory while decoding") from None
    return img


def _to_8bit(img: PILImage.Image) -> PILImage.Image:
    """High bit-depth single-channel modes (I;16*, I, F) -> L, scaled not clipped."""
    from PIL import Image

    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if np.nanmax(arr, initial=0) <= 1.0 else arr
    elif img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


# where Pillow's getexif() finds an orientation (TIFF keeps it in its own tags)
_ORIENTATION_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")


def _normalise(img: PILImage.Image, channels: int) -> PILImage.Image:
    from PIL import Image, ImageOps

    if img.format == "TIFF" or any(k in img.info for k in _ORIENTATION_KEYS):
        with suppress(Exception):  # broken EXIF: keep the pixels as stored
            img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        img = _to_8bit(img)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
    if img.mode in ("RGBA", "LA"):
        # composite on black: colour * alpha / 255, alpha dropped
        base, alpha = img.convert("RGB" if img.mode == "RGBA" else "L"), img.getchannel("A")
        img = Image.composite(base, Image.new(base.mode, base.size, 0), alpha)
    want = "L" if channels == 1 else "RGB"
    if img.mode != want:
        img = img.convert(want)
    return img


_LEVELS = np.arange(256, dtype=np.float64) / 255.0


def _channel_stats(img: PILImage.Image) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in 0..1 from the (C-computed) histogram."""
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(-1, 256)
    n = hist.sum(axis=1)
    mean = hist @ _LEVELS / n
    var = np.maximum(hist @ (_LEVELS**2) / n - mean**2, 0.0)
    return (
        tuple(round(float(v), 6) for v in mean),
        tuple(round(float(v), 6) for v in np.sqrt(var)),
    )


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3: {channels}")


ImageSource = Path | str | bytes | bytearray | memoryview | IO[bytes]


def _decode(src: ImageSource, channels: int, max_pixels: int, draft: int | None = None) -> Any:
    """Normalised image or DataError naming the file and the reason code."""
    _check_channels(channels)
    name: Any = "<bytes>"
    try:
        if isinstance(src, bytes | bytearray | memoryview):
            data: bytes | None = bytes(src)
        elif isinstance(src, str | os.PathLike):
            src = name = Path(src)
            # read small files at once: no file handle stays open with the image
            size = src.stat().st_size
            data = src.read_bytes() if size < _READ_WHOLE_BELOW else None
        else:  # a binary stream, e.g. an upload
            name = getattr(src, "name", "<stream>")
            data = src.read()
        if data is not None and not data:
            raise _ImageProblem("zero_byte", "file is empty")
        source = io.BytesIO(data) if data is not None else src
        return _normalise(_open_loaded(source, max_pixels, draft), channels)
    except _ImageProblem as p:
        raise DataError(f"cannot load image {name}: {p.reason} ({p.detail})") from None
    except OSError as e:
        raise DataError(f"cannot read image {name}: {_one_line(e)}") from None
    except (ValueError, SyntaxError, TypeError) as e:
        raise DataError(f"cannot load image {name}: undecodable ({_one_line(e)})") from None


def load_image(
    path: ImageSource, channels: int = 3, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PILImage.Image:
    """Decode a file (or bytes / binary stream) to a normalised RGB or L image."""
    return _decode(path, channels, max_pixels)


def decode_resized(
    path: ImageSource, size: int, channels: int = 3, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Normalised image resized to size x size (bilinear, antialiased) as uint8 (C, H, W).

    `path` may also be bytes or a binary stream (serving). Non-square images are
    stretched (aspect ratio not kept), as in the training cache.
    """
    from PIL import Image

    if size <= 0:
        raise DataError(f"image size must be positive: {size}")
    img = _decode(path, channels, max_pixels, draft=size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def inspect_image(
    path: Path,
    channels: int = 3,
    *,
    min_width: int = 1,
    min_height: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """Hash, decode and describe one file. Never raises for bad image data."""
    _check_channels(channels)
    path = Path(path)
    info = ImageInfo(path=str(path))
    try:
        size = path.stat().st_size
        info.bytes = size
        if size == 0:
            info.reason, info.error = "zero_byte", "file is empty"
            return info
        if size < _READ_WHOLE_BELOW:
            data = path.read_bytes()
            info.sha256 = hashlib.sha256(data).hexdigest()
            source: Path | io.BytesIO = io.BytesIO(data)
        else:
            info.sha256 = sha256_file(path)
            source = path
    except OSError as e:
        info.reason, info.error = "undecodable", f"cannot read file: {_one_line(e)}"
        return info
    return _inspect_decoded(info, source, channels, min_width, min_height, max_pixels)


def inspect_bytes(
    data: bytes,
    name: str = "<bytes>",
    channels: int = 3,
    *,
    min_width: int = 1,
    min_height: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageInfo:
    """`inspect_image` for a file's content already in memory (`name` is only reported)."""
    _check_channels(channels)
    info = ImageInfo(path=name, bytes=len(data))
    if not data:
        info.reason, info.error = "zero_byte", "file is empty"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest()
    return _inspect_decoded(info, io.BytesIO(data), channels, min_width, min_height, max_pixels)


def _inspect_decoded(info: ImageInfo, source: Path | io.BytesIO, channels: int,
                     min_width: int, min_height: int, max_pixels: int) -> ImageInfo:
    try:
        img = _open_loaded(source, max_pixels)
        info.format, info.mode = img.format or "", img.mode
        info.frames = int(getattr(img, "n_frames", 1) or 1)
        norm = _normalise(img, channels)
    except _ImageProblem as p:
        info.reason, info.error = p.reason, p.detail
        return info
    except Exception as e:  # any decoder failure is a data problem
        info.reason, info.error = "undecodable", _one_line(e)
        return info
    info.decodable = True
    info.width, info.height = norm.size
    info.mean, info.std = _channel_stats(norm)
    if info.width < min_width or info.height < min_height:
        info.reason = "too_small"
        info.error = f"{info.width}x{info.height} is below the minimum {min_width}x{min_height}"
    return info


def _inspect_chunk(paths: list[str], channels: int, limits: dict[str, Any]) -> list[ImageInfo]:
    return [inspect_image(Path(p), channels, **limits) for p in paths]


def inspect_many(
    paths: Sequence[Path | str], channels: int = 3, workers: int = 0, **limits: Any
) -> list[ImageInfo]:
    """`inspect_image` over many files, in a process pool (workers=0: all cores).

    Results are in the order of `paths`. Fewer than 500 files run in-process.
    `limits` are passed to `inspect_image` (min_width, min_height, max_pixels).
    """
    _check_channels(channels)
    names = [str(p) for p in paths]
    workers = workers or os.cpu_count() or 1
    if len(names) < _IN_PROCESS_BELOW or workers <= 1:
        return _inspect_chunk(names, channels, limits)

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork: no re-import of __main__ (works from unguarded scripts) and fast start;
    # workers only run pure decoding code.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    chunk = max(16, min(256, -(-len(names) // (workers * 4))))
    chunks = [names[i : i + chunk] for i in range(0, len(names), chunk)]
    out: list[ImageInfo] = []
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            futures = [pool.submit(_inspect_chunk, c, channels, limits) for c in chunks]
            for f in futures:
                out.extend(f.result())
    except BrokenProcessPool:  # e.g. a worker killed: finish in-process
        out.extend(_inspect_chunk(names[len(out) :], channels, limits))
    return out


def _inspect_blobs(blobs: list[tuple[str, bytes]], channels: int, max_pixels: int
                   ) -> list[ImageInfo]:
    return [inspect_bytes(data, name, channels, max_pixels=max_pixels) for name, data in blobs]


class BackgroundInspector:
    """Inspect (name, bytes) blobs in a process pool while the caller produces them.

    Used as `resolve_source(..., on_member=inspector.submit)`: images are decoded on all
    cores while the archive is still being extracted. The pool starts on the first blob;
    at most ~2 batches per worker are in flight (bounded memory). `finish()` returns
    {name: ImageInfo}; a broken pool just yields fewer results (the caller inspects the
    rest the ordinary way).
    """

    def __init__(self, channels: int = 3, workers: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_files: int = 256,
                 batch_bytes: int = 16 << 20) -> None:
        _check_channels(channels)
        self.channels, self.max_pixels = channels, max_pixels
        self.workers = workers or os.cpu_count() or 1
        self.batch_files, self.batch_bytes = batch_files, batch_bytes
        self.results: dict[str, ImageInfo] = {}
        self._batch: list[tuple[str, bytes]] = []
        self._size = 0
        self._pool: Any = None
        self._futures: deque[Any] = deque()
        self._broken = False

    def submit(self, name: str, data: bytes) -> None:
        if self._broken:
            return
        self._batch.append((name, data))
        self._size += len(data)
        if len(self._batch) >= self.batch_files or self._size >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        batch, self._batch, self._size = self._batch, [], 0
        if not batch or self._broken:
            return
        if self.workers <= 1:
            for info in _inspect_blobs(batch, self.channels, self.max_pixels):
                self.results[info.path] = info
            return
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method))
        self._futures.append(self._pool.submit(_inspect_blobs, batch, self.channels,
                                               self.max_pixels))
        while len(self._futures) > 2 * self.workers:
            self._collect(self._futures.popleft())

    def _collect(self, future: Any) -> None:
        try:
            for info in future.result():
                self.results[info.path] = info
        except Exception:  # e.g. a killed worker: those files get inspected later
            self._broken = True

    def finish(self) -> dict[str, ImageInfo]:
        self._flush()
        while self._futures:
            self._collect(self._futures.popleft())
        self.close()
        return self.results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()

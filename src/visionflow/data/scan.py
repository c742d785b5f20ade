"""Scanning an ImageFolder: `root/<split>/<class>/**/file` or `root/<class>/**/file`.

Hidden files and folders and OS clutter are ignored; symlinks resolving outside the root
are not followed but reported (`outside_root`); files are only ever read. Folders and
loose files that hold no images (a `logs/` or `__pycache__/` folder, scripts, a README next
to `train/` and `val/`) are ignored and listed (`ScanResult.ignored`); a folder that holds
images but is neither a split nor a class is an error naming the user's path (`shown_as`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from visionflow.core.errors import DataError
from visionflow.data.images import IMAGE_SUFFIXES, NOT_IMAGE_SUFFIXES, looks_like_image

SPLITS = ("train", "val", "test")
IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})


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
    ignored: list[str] = field(default_factory=list)  # no images: "logs/", "run.py"


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def visible(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not _ignored(e.name)), key=lambda e: e.name)


def dataset_root(folder: Path) -> Path:
    """Descend through single wrapper folders (e.g. `cifar10/train/...`)."""
    folder = folder.resolve()
    for _ in range(8):
        children = visible(folder)
        if len(children) != 1 or not children[0].is_dir(follow_symlinks=False):
            break
        child = Path(children[0].path)
        if child.name in SPLITS:
            break
        grand = visible(child)
        dirs = [g for g in grand if g.is_dir(follow_symlinks=False)]
        # descend when the child holds split folders, or only (class) folders
        if not any(g.name in SPLITS for g in dirs) and (not dirs or len(dirs) < len(grand)):
            break
        folder = child
    return folder


def any_image(paths: Iterable[str], sniff: int = 50) -> bool:
    """Whether any of `paths` is an image: by name ending, else by the header of at most
    `sniff` files with an unknown ending."""
    tries = 0
    for path in paths:
        suffix = os.path.splitext(path)[1].lower()
        if suffix in IMAGE_SUFFIXES:
            return True
        if suffix in NOT_IMAGE_SUFFIXES or tries >= sniff:
            continue
        tries += 1
        if looks_like_image(path):
            return True
    return False


def holds_images(folder: Path) -> bool:
    """Whether any visible file below `folder` is an image (links are not followed)."""
    def files() -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not _ignored(d)]
            for name in filenames:
                path = os.path.join(dirpath, name)
                if not _ignored(name) and not os.path.islink(path):
                    yield path

    return any_image(files())


def scan_imagefolder(root: Path, shown_as: str | Path | None = None) -> ScanResult:
    """Scan `root/<split>/<class>/**/file` or `root/<class>/**/file`.

    Hidden files/dirs and OS clutter are ignored; symlinks resolving outside
    `root` are not followed but reported as rejects (`outside_root`). Folders and loose
    files without images are ignored and listed; messages name `shown_as` (the path the
    user gave) instead of `root` when given.
    """
    root = Path(root)
    shown = str(shown_as or root)
    if not root.is_dir():
        raise DataError(f"dataset root is not a directory: {shown}")
    root = root.resolve()
    top = visible(root)
    top_dirs = [e for e in top if e.is_dir()]
    rejects: list[Reject] = []
    entries: list[FileEntry] = []
    empty: list[str] = []
    ignored: list[str] = []

    if layout_of(root) == "split":
        others = [e for e in top_dirs if e.name not in SPLITS]
        bearing = [e.name for e in others if holds_images(Path(e.path))]
        if bearing:
            raise DataError(
                f"{shown}: folders that hold images next to the split folders (train/val/"
                f"test): {', '.join(f'{n}/' for n in bearing)} (move them into a split's "
                f"class folders, or out of the dataset)"
            )
        ignored += [f"{e.name}/" for e in others]
        groups = [(e.name, Path(e.path)) for e in top_dirs if e.name in SPLITS]
    else:
        groups = [(None, root)]

    for entry in top:  # loose files next to the class/split folders
        if not entry.is_dir():
            _loose_file(root, Path(entry.path), rejects, ignored)
    for split, split_dir in groups:
        for entry in visible(split_dir):
            path = Path(entry.path)
            if not entry.is_dir():
                if split is not None:
                    _loose_file(root, path, rejects, ignored)
                continue
            if not _inside(root, path):
                rejects.append(reject(root, path, "outside_root"))
                continue
            label = entry.name
            found = _walk_class(root, path, split, label, rejects)
            if split is None and found and not any_image(e.fspath for e in found):
                ignored.append(f"{label}/")  # a flat layout's clutter folder (logs/ ...)
                continue
            if not found:
                empty.append(f"{split}/{label}" if split else label)
            entries.extend(found)

    entries.sort(key=lambda e: e.relpath)
    rejects.sort(key=lambda r: r.relpath)
    return ScanResult(entries, rejects, sorted(empty), layout_of(root), sorted(ignored))


def layout_of(root: Path) -> str:
    """"split" when `root` has train/, val/ or test/ folders (class folders in each), else
    "flat" (class folders at the top)."""
    return "split" if any(e.is_dir() and e.name in SPLITS for e in visible(root)) else "flat"


def _loose_file(root: Path, path: Path, rejects: list[Reject], ignored: list[str]) -> None:
    """A file outside any class folder: an image is a reject, anything else is ignored."""
    if path.is_symlink() and not _inside(root, path):
        rejects.append(reject(root, path, "outside_root"))
    elif path.is_file() and not looks_like_image(path):
        ignored.append(_rel(root, path))
    else:
        rejects.append(reject(root, path, "no_class"))


def _inside(root: Path, path: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(root)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def reject(root: Path, path: Path, reason: str) -> Reject:
    detail = {
        "outside_root": f"symlink resolves outside the dataset root: {os.path.realpath(path)}",
        "broken_link": f"symlink target does not exist: {os.path.realpath(path)}",
        "not_a_file": "not a regular file (fifo, socket or device)",
        "no_class": "file is not inside a class folder",
    }[reason]
    return Reject(_rel(root, path), reason, detail)


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
            children = visible(folder)
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
                    rejects.append(reject(root, path, "outside_root"))
                    continue
                if not os.path.exists(real):
                    rejects.append(reject(root, path, "broken_link"))
                    continue
            if e.is_dir():
                real = os.path.realpath(path)
                if real not in seen:  # guards against symlink loops
                    seen.add(real)
                    stack.append(path)
            elif e.is_file():
                out.append(FileEntry(e.path, e.path[cut:].replace(os.sep, "/"), split, label))
            else:
                rejects.append(reject(root, path, "not_a_file"))
    return out

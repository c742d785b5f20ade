"""Scanning an ImageFolder: `root/<split>/<class>/**/file` or `root/<class>/**/file`.

Hidden files and folders and OS clutter are ignored; symlinks resolving outside the root
are not followed but reported (`outside_root`); files are only ever read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from visionflow.errors import DataError

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


def scan_imagefolder(root: Path) -> ScanResult:
    """Scan `root/<split>/<class>/**/file` or `root/<class>/**/file`.

    Hidden files/dirs and OS clutter are ignored; symlinks resolving outside
    `root` are not followed but reported as rejects (`outside_root`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root is not a directory: {root}")
    root = root.resolve()
    top = visible(root)
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
        for entry in visible(split_dir):
            path = Path(entry.path)
            if not entry.is_dir():
                if split is not None:
                    _reject_or_note(root, path, rejects, "no_class")
                continue
            if not _inside(root, path):
                rejects.append(reject(root, path, "outside_root"))
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


def reject(root: Path, path: Path, reason: str) -> Reject:
    detail = {
        "outside_root": f"symlink resolves outside the dataset root: {os.path.realpath(path)}",
        "broken_link": f"symlink target does not exist: {os.path.realpath(path)}",
        "not_a_file": "not a regular file (fifo, socket or device)",
        "no_class": "file is not inside a class folder",
    }[reason]
    return Reject(_rel(root, path), reason, detail)


def _reject_or_note(root: Path, path: Path, rejects: list[Reject], reason: str) -> None:
    if path.is_symlink() and not _inside(root, path):
        rejects.append(reject(root, path, "outside_root"))
    else:
        rejects.append(reject(root, path, reason))


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

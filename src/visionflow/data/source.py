"""The one `data.source` resolver: a folder, an archive (extracted safely once, by content
hash), or `torchvision:<NAME>`; and `vflow data add`'s import of a folder or archive."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from visionflow.config import Params, is_torchvision_source
from visionflow.data import torchvision_source
from visionflow.data.archive import (
    EXTRACT_MARKER,
    MemberHook,
    archive_kind,
    extract_atomic,
    extract_tar,
    extract_zip,
)
from visionflow.data.scan import Reject, dataset_root, reject, visible
from visionflow.errors import DataError
from visionflow.files import sha256_file
from visionflow.layout import Layout


def source_path(params: Params, layout: Layout, fetch: bool = False) -> Path:
    """`data.source` on disk (relative to the root; an absolute source replaces it). A
    `torchvision:` dataset: the folder it is written to, downloaded and written first when
    `fetch`."""
    if is_torchvision_source(params.data.source):
        how = torchvision_source.materialize if fetch else torchvision_source.folder
        return how(params.data.source, layout)
    return layout.root / params.data.source


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
    kind = archive_kind(source)
    if kind is None or not source.is_file():
        raise DataError(
            f"data source is neither a directory nor a .tar/.tar.gz/.tgz/.zip archive: {source}"
        )
    digest = sha256_file(source)
    extract_root = Path(extract_root)
    dest = extract_root / digest[:16]
    if not (dest / EXTRACT_MARKER).is_file():
        if on_member is None:  # (keeps the call patchable with the old signature)
            extract_atomic(source, kind, digest, dest)
        else:
            extract_atomic(source, kind, digest, dest, on_member)
    return dataset_root(dest)


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
    kind = "folder" if source.is_dir() else archive_kind(source)
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
            root = dataset_root(source)
            report.files = _copy_tree(root, tmp / "d", report.skipped)
            if not report.files:
                raise DataError(f"{source}: no files to import")
            (tmp / "d").rename(target)
        else:
            out = tmp / "x"
            out.mkdir()
            n = extract_tar(source, out) if kind == "tar" else extract_zip(source, out)
            if not n:
                raise DataError(f"{source}: archive is empty")
            dataset_root(out).rename(target)
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
        for e in visible(folder):
            path, rel = Path(e.path), e.path[cut:].replace(os.sep, "/")
            if e.is_symlink():
                real = os.path.realpath(path)
                if not Path(real).is_relative_to(src_root):
                    skipped.append(reject(src_root, path, "outside_root"))
                    continue
                if not os.path.exists(real):
                    skipped.append(reject(src_root, path, "broken_link"))
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
                skipped.append(reject(src_root, path, "not_a_file"))
    return copied

"""The one `data.source` resolver: a folder, an archive (extracted safely once, by content
hash), or a registered `<scheme>:<name>` (`data.schemes`); and `vflow data add`'s import of
a folder or archive."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.files import sha256_file
from visionflow.core.layout import Layout
from visionflow.data import schemes
from visionflow.data.archive import (
    EXTRACT_MARKER,
    ArchiveLimits,
    MemberHook,
    archive_kind,
    extract_atomic,
    extract_tar,
    extract_zip,
)
from visionflow.data.dvc import dvc_origin, relative
from visionflow.data.scan import (
    Reject,
    dataset_root,
    reject,
    scan_imagefolder,
    visible,
)
from visionflow.data.segmentation_layout import detect_layout
from visionflow.data.segmentation_masks import CLASSES_FILE


def source_path(params: Params, layout: Layout, fetch: bool = False) -> Path:
    """`data.source` on disk (relative to the root; an absolute source replaces it). A
    `<scheme>:<name>` source (`torchvision:CIFAR10`, see `data.schemes`): the folder it is
    written to, downloaded and written first when `fetch`."""
    if (read := schemes.reader(params.data.source)) is not None:
        how = read.materialize if fetch else read.folder
        return how(params.data.source, layout)
    return layout.root / params.data.source


def dvc_tracked(params: Params, layout: Layout) -> Path | None:
    """The `.dvc` file tracking `data.source` (`data.dvc`, or deeper), if it is a DVC-tracked
    path in the project."""
    src = source_path(params, layout).resolve()
    try:
        src.relative_to(layout.root)
    except ValueError:
        return None
    dvc_file = src.with_name(src.name + ".dvc")
    return dvc_file if dvc_file.is_file() else None


def dvc_record(params: Params, layout: Layout) -> dict[str, str]:
    """How DVC versions the data, for validate's record (`validation.json`), which train,
    evaluate and register read: the `.dvc` file from the project root and the URL it
    imports from ('' when none)."""
    dvc_file = dvc_tracked(params, layout)
    if dvc_file is None:
        return {"dvc_file": "", "data_origin": ""}
    return {"dvc_file": relative(layout, dvc_file), "data_origin": dvc_origin(dvc_file)}


def resolve_source(
    source: Path, extract_root: Path, on_member: MemberHook | None = None,
    limits: ArchiveLimits | None = None,
) -> Path:
    """Return the dataset root for a directory or a .tar/.tar.gz/.tgz/.zip archive.

    Archives are extracted (safely) into `extract_root/<sha256[:16]>` and reused
    when that folder is complete (its marker file exists). When an extraction happens,
    `on_member(name, data)` gets each regular member's bytes (name relative to that
    folder) after it is written, e.g. to inspect images while the rest is extracted.
    `limits` caps the bytes and members an extraction may write (default: the params'
    defaults).
    """
    source = Path(source)
    if source.is_dir():
        return source.resolve()
    if not source.exists():
        dvc_file = source.with_name(source.name + ".dvc")
        hint = f" (tracked by {dvc_file.name}: `dvc pull` it)" if dvc_file.is_file() else ""
        raise DataError(f"data source not found: {source}{hint}")
    kind = archive_kind(source)
    if kind is None or not source.is_file():
        raise DataError(
            f"data source is neither a directory nor a .tar/.tar.gz/.tgz/.zip archive: {source}"
        )
    digest = sha256_file(source)
    extract_root = Path(extract_root)
    dest = extract_root / digest[:16]
    if not (dest / EXTRACT_MARKER).is_file():
        extract_atomic(source, kind, digest, dest, on_member, limits)
    return dataset_root(dest)


@dataclass(slots=True)
class ImportReport:
    source: str
    kind: str  # "folder", "tar" or "zip"
    files: int = 0
    skipped: list[Reject] = field(default_factory=list)  # not copied, with the reason
    ignored: list[str] = field(default_factory=list)  # no images, left out: "logs/", ".idea/"


def import_dataset(source: Path, target: Path, limits: ArchiveLimits | None = None,
                   shown_as: str | Path | None = None) -> ImportReport:
    """Copy a folder, or safely extract an archive, into `target` (which must not exist).

    Archives get the checks of `resolve_source` (absolute paths, '..', links out of the
    target, device files: refused with an error naming the member; links inside are
    skipped; `limits` on size and members). From a folder, regular files are copied with
    their mtimes; hidden files and OS clutter, links resolving outside the source, broken
    links and special files are skipped and reported. Single wrapper folders
    (`cifar10/train/...`) are unwrapped. Folders and loose files without images (`logs/`,
    `__pycache__/`, scripts, a README) are left out and listed in `ignored`; a folder with
    images that is neither a split nor a class is an error. Messages name `shown_as` (the
    path the user gave; default `source`). The source is only read. On error nothing is
    left at `target`.
    """
    source, target = Path(source), Path(target)
    shown = str(shown_as or source)
    if target.exists() or target.is_symlink():
        raise DataError(f"import target already exists: {target}")
    if not source.exists():
        raise DataError(f"data source not found: {shown}")
    kind = "folder" if source.is_dir() else archive_kind(source)
    if kind is None or (kind != "folder" and not source.is_file()):
        raise DataError(
            f"data source is neither a directory nor a .tar/.tar.gz/.tgz/.zip archive: {shown}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.import-", dir=target.parent))
    report = ImportReport(str(source), kind)
    try:
        tmp.chmod(0o755)
        if kind == "folder":
            root = dataset_root(source)
            report.ignored = _hidden(root)
            report.files = _copy_tree(root, tmp / "d", report.skipped)
            if not report.files:
                raise DataError(f"{shown}: no files to import")
            built = tmp / "d"
        else:
            out = tmp / "x"
            out.mkdir()
            extract = extract_tar if kind == "tar" else extract_zip
            if not extract(source, out, None, limits):
                raise DataError(f"{shown}: archive is empty")
            built = dataset_root(out)
            report.ignored = _hidden(built)
        report.ignored += _drop_clutter(built, shown)
        report.files = sum(len(files) for _, _, files in os.walk(built))
        built.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def _hidden(root: Path) -> list[str]:
    """Hidden and OS-clutter entries at the top of `root` (never imported)."""
    with os.scandir(root) as it:
        names = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in it]
    shown = {e.name for e in visible(root)}
    return sorted(n for n in names if n.rstrip("/") not in shown)


def _drop_clutter(root: Path, shown: str) -> list[str]:
    """Remove what holds no images from the imported copy; the removed entries. A
    segmentation dataset keeps what its layout reads beside the images: `classes.txt` and
    VOC's split lists (`ImageSets/`)."""
    found = scan_imagefolder(root, shown_as=shown)
    try:
        detect_layout(root)
        keep = {CLASSES_FILE, "ImageSets/"}
    except DataError:  # an ImageFolder
        keep = set()
    found.ignored = [rel for rel in found.ignored if rel not in keep]
    for rel in found.ignored:
        path = root / rel.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found.ignored


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

"""`vflow data init` and `vflow data add`: put a dataset version into `data/` and track it
with DVC (`data.dvc`), so every version stays in the DVC cache and remote. A folder, an
archive or a `torchvision:` dataset is copied in and `dvc add`ed; an `s3://` prefix is
mirrored (`data.s3_sync`) and `dvc add`ed, and a scheduled retrain's refresh syncs it again."""

from __future__ import annotations

import errno
import fcntl
import filecmp
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from visionflow.core.dataconfig import is_url
from visionflow.core.errors import DataError
from visionflow.core.files import load_yaml, walk_files, write_text
from visionflow.core.layout import Layout
from visionflow.data import s3_sync, schemes
from visionflow.data.archive import ArchiveLimits
from visionflow.data.digits import materialize_digits
from visionflow.data.dvc import (
    changed,
    default_remote,
    dvc,
    dvc_md5,
    dvc_origin,
    dvc_out,
    ensure_default_remote,
    ensure_dvc_repo,
    error_line,
    relative,
)
from visionflow.data.images import FORMATS
from visionflow.data.scan import FileEntry, layout_of, scan_imagefolder
from visionflow.data.segmentation_layout import detect_layout
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.data.source import import_dataset

DEFAULT_DATA = {"classification": materialize_digits, "segmentation": materialize_shapes}
MASK_FOLDERS = ("masks", "SegmentationClass", "SegmentationObject")  # a mask set's folders
VOC_LISTS = Path("ImageSets", "Segmentation")  # split lists: --merge joins them


def init_default_data(layout: Layout, target: str = "data", task: str = "classification"
                      ) -> Path:
    """Write the bundled dataset of `task` to `data/` if absent, and `dvc add` it: the
    digits (classification) or the generated shapes with masks (segmentation)."""
    if task not in DEFAULT_DATA:
        raise DataError(f"data init: unknown task {task!r}, choose one of "
                        f"{', '.join(DEFAULT_DATA)}")
    path = layout.root / target
    created = not path.is_dir() or not any(path.iterdir())
    if created:
        DEFAULT_DATA[task](path)
    ensure_dvc_repo(layout)
    dvc_file = layout.dvc_file(target)
    if created or not dvc_file.is_file() or changed(layout, dvc_file):
        dvc(layout, "add", target, "-q")
    return path


def import_data(layout: Layout, source: str | Path, target: str = "data", force: bool = False,
                push: bool = False, limits: ArchiveLimits | None = None,
                merge: bool = False) -> dict[str, Any]:
    """Import a folder, an archive or a `torchvision:` dataset as `target/`, then `dvc add` it.

    The source is only read (archives are checked member by member, see
    `source.import_dataset`). The current `target/` is replaced only when its content is
    recorded in `target.dvc` (so the old version stays in the DVC cache), or with `force`;
    with `merge` the new version is the current one plus the source's files (the same
    layout; a path in both must hold the same bytes, but a VOC split list in both is
    joined). The new content must be an
    ImageFolder with at least one image, or nothing changes.
    Folders and files without images next to the splits (`logs/`, scripts, a README) are
    left out and listed in `ignored`; every message names `source` as the user gave it."""
    root = layout.root
    if is_url(source):
        if merge:
            raise DataError(f"data add --merge: {source}: a prefix is mirrored whole; add "
                            f"the files there and run `vflow data add {source}`")
        return import_url(layout, str(source), target, force, push)
    if (read := schemes.reader(str(source))) is not None:  # downloaded once, then a folder
        source = read.materialize(str(source), layout)
    src = Path(source).expanduser().resolve()
    dest = root / target
    if not src.exists():
        raise DataError(f"data add: {source}: no such file or directory")
    if src == dest or src.is_relative_to(dest) or dest.is_relative_to(src):
        raise DataError(f"data add: {source}: overlaps the target {dest}")
    with one_change_at_a_time(layout, target, "data add"):
        return _import_folder(layout, source, src, target, force, push, limits, merge)


def _import_folder(layout: Layout, source: str | Path, src: Path, target: str, force: bool,
                   push: bool, limits: ArchiveLimits | None, merge: bool) -> dict[str, Any]:
    """`import_data` of a local folder or archive, under the lock on `target/`."""
    dest, dvc_file = layout.root / target, layout.root / f"{target}.dvc"
    _may_replace(layout, target, force)
    if merge and (origin := dvc_origin(dvc_file)):
        raise DataError(f"data add --merge: {dvc_file.name} imports {target}/ from {origin}: "
                        "add the images there (the next sync brings them), or replace the "
                        "import (without --merge)")
    staged = dest.with_name(f".{dest.name}.new-{os.getpid()}")
    shutil.rmtree(staged, ignore_errors=True)
    report = import_dataset(src, staged, limits, shown_as=source)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    before = int(dvc_out(dvc_file).get("nfiles") or 0) if dvc_file.is_file() else 0
    try:
        found = scan_imagefolder(staged, shown_as=source)
        if not _has_an_image(found.entries):
            raise DataError(f"data add: {source}: no images in class folders (expected "
                            "<class>/<image> or train/<class>/<image>)")
        if merge and dest.is_dir():  # the union of two folders laid out alike
            _link_the_rest(dest, staged, source, found.layout)
        if dest.exists() or dest.is_symlink():
            dest.rename(old)
        staged.rename(dest)
    except BaseException:
        if old.exists() and not dest.exists():
            old.rename(dest)
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if dvc_origin(dvc_file):  # an import replaced: `dvc add` would keep its origin
        dvc_file.unlink()
    dvc(layout, "add", target, "-q")
    return _added(layout, target, push, found, str(src), report.kind, report.files, before,
                  merge, [f"{r.relpath} ({r.reason})" for r in report.skipped], report.ignored)


def import_url(layout: Layout, url: str, target: str = "data", force: bool = False,
               push: bool = False) -> dict[str, Any]:
    """The files under an S3 prefix as the new version (`data.s3_sync`: only new or changed
    objects are downloaded), `dvc add`ed, with `target.dvc` recording the prefix so that a
    retrain's refresh syncs again. The same refusals as `import_data`; on any error the
    current version stays as it was (complete downloads are kept for the next try)."""
    dest, dvc_file = layout.root / target, layout.dvc_file(target)
    staged = s3_sync.staging(layout, target)  # kept when the import stops part-way
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    with one_change_at_a_time(layout, target, f"data add: {url}"):
        _may_replace(layout, target, force)
        before = int(dvc_out(dvc_file).get("nfiles") or 0) if dvc_file.is_file() else 0
        try:
            synced, objects = s3_sync.sync(layout, url, target, staged)
            same = not staged.exists()  # data/ holds the prefix as it is: nothing staged
            found = scan_imagefolder(dest if same else staged, shown_as=url)
            if not _has_an_image(found.entries):
                raise DataError(f"data add: {url}: no images in class folders (expected "
                                "<class>/<image> or train/<class>/<image>)")
            if not same:
                if dest.exists() or dest.is_symlink():
                    dest.rename(old)
                _move(staged, dest)
        except BaseException:
            if (old.exists() or old.is_symlink()) and not dest.exists():
                old.rename(dest)
            raise
        s3_sync.finished(staged)
        shutil.rmtree(old, ignore_errors=True)
        if not same or dvc_origin(dvc_file) != url:
            if dvc_file.is_file() and (load_yaml(dvc_file.read_text()) or {}).get("deps"):
                dvc_file.unlink()  # a `dvc import`: `dvc add` would keep its origin
            dvc(layout, "add", target, "-q")
        s3_sync.record(layout, url, target, objects)
    out = _added(layout, target, push, found, url, "s3", synced.listed, before, False, [],
                 found.ignored)
    return {**out, "sync": asdict(synced)}


def _move(staged: Path, dest: Path) -> None:
    """`staged` renamed to `dest` (moved when `.cache/` is on another file system)."""
    dest.parent.mkdir(parents=True, exist_ok=True)  # (`--to new/folder`)
    try:
        staged.rename(dest)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.move(staged, dest)


def checkout_version(layout: Layout, target: str, text: str, force: bool = False
                     ) -> dict[str, Any]:
    """`target.dvc` replaced by `text` (a version recorded elsewhere: a registered version's
    run, a commit) and `target/` made to match it, from the DVC cache or else the default
    remote. Refused like an import when `target/` has unrecorded changes; when the data
    cannot be fetched, `target.dvc` and `target/` stay as they were."""
    with one_change_at_a_time(layout, target, "data checkout"):
        return _checkout(layout, target, text, force)


def _checkout(layout: Layout, target: str, text: str, force: bool) -> dict[str, Any]:
    _may_replace(layout, target, force, "data checkout")
    dvc_file = layout.dvc_file(target)
    rel = relative(layout, dvc_file)
    before = dvc_file.read_text() if dvc_file.is_file() else None
    write_text(dvc_file, text)
    fetched = dvc(layout, "fetch", rel, check=False)  # (exits 0 when files are missing)
    missing = "not in cache" in dvc(layout, "status", "--json", rel, check=False).stdout
    if fetched.returncode != 0 or missing:
        md5 = dvc_md5(dvc_file)
        if before is None:
            dvc_file.unlink()
        else:
            write_text(dvc_file, before)
        why = f": {error_line(fetched.stdout + fetched.stderr)}" if fetched.returncode else ""
        raise DataError(f"data checkout: {rel} md5 {md5}: not in the DVC cache, nor on "
                        f"remote '{default_remote(layout)}'{why}")
    dvc(layout, "checkout", "-q", *(["--force"] if force else []), rel)
    out = dvc_out(dvc_file)
    return {"dvc_file": rel, "dvc_data_md5": dvc_md5(dvc_file),
            "nfiles": int(out.get("nfiles") or 0), "imported_from": dvc_origin(dvc_file),
            "remote": default_remote(layout)}


@contextmanager
def one_change_at_a_time(layout: Layout, target: str, cmd: str) -> Iterator[None]:
    """Held while an import, a sync or a checkout replaces `target/`: a second one (a scheduled
    refresh beside a `vflow data checkout`) stops in one line instead of mixing versions."""
    tag = hashlib.sha256(target.encode()).hexdigest()[:16]
    lock = layout.cache_root / "data-locks" / f"{tag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{cmd}: another import, sync or checkout of {target}/ is "
                            "running") from None
        yield


def _may_replace(layout: Layout, target: str, force: bool, cmd: str = "data add") -> None:
    """Refuse to replace `target/` unless `target.dvc` records it as it is (or `force`)."""
    dest, dvc_file = layout.root / target, layout.dvc_file(target)
    ensure_dvc_repo(layout)
    if not dest.exists() or force:
        return
    if not dvc_file.is_file():
        raise DataError(f"{cmd}: {dest} exists and is not tracked by DVC ({dvc_file.name} "
                        "missing): move it away, or pass --force to replace it")
    if changed(layout, dvc_file):
        raise DataError(f"{cmd}: {dest} has changes not recorded in {dvc_file.name}: "
                        f"run `dvc add {target}` to keep them, or pass --force to replace "
                        "them")


def _added(layout: Layout, target: str, push: bool, found: Any, source: str, kind: str,
           files: int, before: int, merge: bool, skipped: list[str], ignored: list[str]
           ) -> dict[str, Any]:
    """`vflow data add`'s report of a version just recorded (pushed first if asked)."""
    dest, dvc_file = layout.root / target, layout.dvc_file(target)
    remote = ensure_default_remote(layout)
    if push:
        dvc(layout, "push", "-q", relative(layout, dvc_file))
    out = dvc_out(dvc_file)
    masks = _masks(found.entries, dest)
    return {
        "source": source, "kind": kind, "target": str(dest), "files": files,
        "images": len(found.entries) - masks, "masks": masks, "layout": found.layout,
        "merged": merge, "imported_from": dvc_origin(dvc_file),
        "files_before": before, "files_now": int(out.get("nfiles") or 0),
        "skipped": skipped, "ignored": ignored,
        "dvc_file": relative(layout, dvc_file), "dvc_data_md5": str(out.get("md5", "")),
        "remote": remote, "pushed": push,
    }


def _link_the_rest(current: Path, new: Path, source: str | Path, layout: str) -> None:
    """Put `current`'s files into `new` beside the source's (hard links, else copies): the
    merged version. Refuses a source laid out otherwise, or a file in both that differs."""
    have = layout_of(current)
    if have != layout:
        words = {"split": "train/<class>/", "flat": "<class>/"}
        raise DataError(f"data add --merge: {source} is laid out as {words[layout]} but "
                        f"{current.name}/ as {words[have]}: lay it out the same way")
    for path in walk_files(current):
        rel = path.relative_to(current)
        to = new / rel
        if to.exists():
            if rel.parent == VOC_LISTS and rel.suffix == ".txt":
                _join_lists(current, rel, to)
            elif not filecmp.cmp(to, path, shallow=False):
                raise DataError(f"data add --merge: {source}: {rel.as_posix()} is also in "
                                f"{current.name}/ with other bytes: rename it")
            continue
        to.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, to, follow_symlinks=False)
        except OSError:  # a file system without hard links
            shutil.copy2(path, to, follow_symlinks=False)


def _join_lists(current: Path, rel: Path, to: Path) -> None:
    """A Pascal VOC split list in both versions: the current one's lines, then the source's
    stems that no current list names (each pair keeps the split it has). The staged file is
    replaced, not written through: it may be a link to the source's."""
    listed = {line.split()[0] for f in (current / VOC_LISTS).glob("*.txt")
              for line in f.read_text().splitlines() if line.split()}
    extra = [line for line in to.read_text().splitlines()
             if line.split() and line.split()[0] not in listed]
    write_text(to, "".join(f"{line}\n" for line in
                           [*(current / rel).read_text().splitlines(), *extra]))


def _has_an_image(entries: list[Any], tries: int = 200) -> bool:
    """Whether any of the first `tries` files has an image header Pillow reads."""
    for e in entries[:tries]:
        try:
            with Image.open(e.fspath, formats=FORMATS):
                return True
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            continue
    return False


def _masks(entries: list[FileEntry], root: Path) -> int:
    """The masks among a segmentation set's image files (none in an ImageFolder)."""
    try:
        detect_layout(root)
    except DataError:
        return 0
    return sum(1 for e in entries if e.relpath.split("/", 1)[0] in MASK_FOLDERS)

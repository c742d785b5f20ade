"""`vflow data init` and `vflow data add`: put a dataset version into `data/` and track it
with DVC (`data.dvc`), so every version stays in the DVC cache and remote."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from visionflow.core.config import is_torchvision_source
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data import torchvision_source
from visionflow.data.archive import ArchiveLimits
from visionflow.data.digits import materialize_digits
from visionflow.data.dvc import changed, dvc, dvc_out, ensure_default_remote, ensure_dvc_repo
from visionflow.data.images import FORMATS
from visionflow.data.scan import scan_imagefolder
from visionflow.data.segmentation_synth import materialize_shapes
from visionflow.data.source import import_dataset

DEFAULT_DATA = {"classification": materialize_digits, "segmentation": materialize_shapes}


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
                push: bool = False, limits: ArchiveLimits | None = None) -> dict[str, Any]:
    """Import a folder, an archive or a `torchvision:` dataset as `target/`, then `dvc add` it.

    The source is only read (archives are checked member by member, see
    `source.import_dataset`). The current `target/` is replaced only when its content is
    recorded in `target.dvc` (so the old version stays in the DVC cache), or with `force`.
    The new content must be an ImageFolder with at least one image, or nothing changes.
    Folders and files without images next to the splits (`logs/`, scripts, a README) are
    left out and listed in `ignored`; every message names `source` as the user gave it."""
    root = layout.root
    if is_torchvision_source(str(source)):  # downloaded once, then a folder
        source = torchvision_source.materialize(str(source), layout)
    src = Path(source).expanduser().resolve()
    dest = root / target
    if not src.exists():
        raise DataError(f"data add: {source}: no such file or directory")
    if src == dest or src.is_relative_to(dest) or dest.is_relative_to(src):
        raise DataError(f"data add: {source}: overlaps the target {dest}")
    dvc_file = root / f"{target}.dvc"
    ensure_dvc_repo(layout)
    if dest.exists() and not force:
        if not dvc_file.is_file():
            raise DataError(f"data add: {dest} exists and is not tracked by DVC ({dvc_file.name} "
                            "missing): move it away, or pass --force to replace it")
        if changed(layout, dvc_file):
            raise DataError(f"data add: {dest} has changes not recorded in {dvc_file.name}: "
                            f"run `dvc add {target}` to keep them, or pass --force to replace "
                            "them")
    staged = root / f".{target}.new-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    report = import_dataset(src, staged, limits, shown_as=source)
    old = root / f".{target}.old-{os.getpid()}"
    try:
        found = scan_imagefolder(staged, shown_as=source)
        if not _has_an_image(found.entries):
            raise DataError(f"data add: {source}: no images in class folders (expected "
                            "<class>/<image> or train/<class>/<image>)")
        if dest.exists() or dest.is_symlink():
            dest.rename(old)
        staged.rename(dest)
    except BaseException:
        if old.exists() and not dest.exists():
            old.rename(dest)
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    dvc(layout, "add", target, "-q")
    remote = ensure_default_remote(layout)
    if push:
        dvc(layout, "push", "-q", dvc_file.name)
    out = dvc_out(dvc_file)
    return {
        "source": str(src), "kind": report.kind, "target": str(dest), "files": report.files,
        "images": len(found.entries), "layout": found.layout,
        "skipped": [f"{r.relpath} ({r.reason})" for r in report.skipped],
        "ignored": report.ignored,
        "dvc_file": dvc_file.name, "dvc_data_md5": str(out.get("md5", "")),
        "remote": remote, "pushed": push,
    }


def _has_an_image(entries: list[Any], tries: int = 200) -> bool:
    """Whether any of the first `tries` files has an image header Pillow reads."""
    for e in entries[:tries]:
        try:
            with Image.open(e.fspath, formats=FORMATS):
                return True
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            continue
    return False

"""Dataset versioning with DVC: materialise the default dataset, import new versions into
`data/`, report the data version next to the champion's, keep a default DVC remote.

The default remote is `local` -> `<project>/.dvc-storage`, so `dvc push` / `dvc pull` work
out of the box; point it elsewhere with `dvc remote add -d s3 s3://bucket/path`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from visionflow.errors import DataError
from visionflow.layout import Layout

DEFAULT_REMOTE = ("local", ".dvc-storage")


def dvc_bin() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def dvc(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    from visionflow.env import quiet_env

    quiet_env()
    proc = subprocess.run([dvc_bin(), *args], cwd=layout.root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise DataError(f"dvc {' '.join(args)}: {msg[-1] if msg else 'failed'}")
    return proc


def ensure_dvc_repo(layout: Layout) -> None:
    if not layout.dvc_dir.is_dir():
        scm = layout.git_dir.exists()
        dvc(layout, "init", *([] if scm else ["--no-scm"]), "-q")
    ensure_default_remote(layout)


def _dvc_config(layout: Layout) -> tuple[str | None, dict[str, str]]:
    """(default remote name, {remote name: url}) from .dvc/config and config.local, read
    directly (no dvc process); relative local URLs are resolved against .dvc/."""
    name, urls = None, {}
    for cfg in (layout.dvc_dir / "config", layout.dvc_dir / "config.local"):
        if not cfg.is_file():
            continue
        section = ""
        for raw in cfg.read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                m = re.match(r"""\[\s*'?remote\s+"([^"]+)"'?\s*\]""", line)
                section = f"remote:{m.group(1)}" if m else line.strip("[]'\" ").lower()
            elif section == "core" and (m := re.match(r"remote\s*=\s*(\S+)", line)):
                name = m.group(1)
            elif section.startswith("remote:") and (m := re.match(r"url\s*=\s*(\S+)", line)):
                url = m.group(1)
                if "://" not in url and not os.path.isabs(url):
                    url = os.path.normpath(cfg.parent / url)
                urls[section.removeprefix("remote:")] = url
    return name, urls


def default_remote(layout: Layout) -> str | None:
    """Name of the default DVC remote, or None."""
    return _dvc_config(layout)[0]


def ensure_default_remote(layout: Layout) -> str:
    """Add the remote `local` -> `.dvc-storage` (git-ignored) when none is the default."""
    name = default_remote(layout)
    if name:
        return name
    name, url = DEFAULT_REMOTE
    dvc(layout, "remote", "add", "-d", "-f", name, url)
    gitignore = layout.gitignore
    if layout.git_dir.exists():
        lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
        if f"/{url}/" not in lines and f"/{url}" not in lines:
            with gitignore.open("a") as f:
                f.write(("\n" if lines and lines[-1] else "") + f"/{url}/\n")
    return name


def init_default_data(layout: Layout, target: str = "data") -> Path:
    """Write the bundled digits dataset to `data/` if absent, and `dvc add` it."""
    from visionflow.data.digits import materialize_digits

    path = layout.root / target
    created = not path.is_dir() or not any(path.iterdir())
    if created:
        materialize_digits(path)
    ensure_dvc_repo(layout)
    dvc_file = layout.dvc_file(target)
    if created or not dvc_file.is_file() or _dvc_changed(layout, dvc_file):
        dvc(layout, "add", target, "-q")
    return path


def _dvc_changed(layout: Layout, dvc_file: Path) -> bool:
    proc = dvc(layout, "status", "--json", str(dvc_file.name), check=False)
    return proc.returncode != 0 or proc.stdout.strip() not in ("{}", "")


def dvc_out(dvc_file: Path) -> dict[str, Any]:
    """The first `outs` entry of a .dvc file ({} when absent or unreadable)."""
    import yaml

    if not dvc_file.is_file():
        return {}
    try:
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
        return dict(outs[0]) if isinstance(outs[0], dict) else {}
    except (yaml.YAMLError, AttributeError):
        return {}


def workspace_state(layout: Layout, target: str = "data") -> str:
    """in sync | modified | deleted | not tracked | missing (per `dvc status`)."""
    path, dvc_file = layout.root / target, layout.dvc_file(target)
    if not dvc_file.is_file():
        return "not tracked" if path.exists() else "missing"
    proc = dvc(layout, "status", "--json", dvc_file.name, check=False)
    out = proc.stdout.strip()
    if proc.returncode == 0 and out in ("{}", ""):
        return "in sync"
    return "deleted" if '"deleted"' in out else "modified"


def import_data(layout: Layout, source: str | Path, target: str = "data", force: bool = False,
                push: bool = False) -> dict[str, Any]:
    """Import a folder, an archive or a `torchvision:` dataset as `target/`, then `dvc add` it.

    The source is only read (archives are checked member by member, see
    `ingest.import_dataset`). The current `target/` is replaced only when its content is
    recorded in `target.dvc` (so the old version stays in the DVC cache), or with `force`.
    The new content must be an ImageFolder with at least one image, or nothing changes."""
    from visionflow.data import ingest, torchvision_source

    root = layout.root
    if torchvision_source.is_torchvision_source(source):  # downloaded once, then a folder
        source = torchvision_source.materialize(str(source), layout.cache_root)
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
        if _dvc_changed(layout, dvc_file):
            raise DataError(f"data add: {dest} has changes not recorded in {dvc_file.name}: "
                            f"run `dvc add {target}` to keep them, or pass --force to replace "
                            "them")
    staged = root / f".{target}.new-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    report = ingest.import_dataset(src, staged)
    old = root / f".{target}.old-{os.getpid()}"
    try:
        scan = ingest.scan_imagefolder(staged)
        if not _has_an_image(scan.entries):
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
        "images": len(scan.entries), "layout": scan.layout,
        "skipped": [f"{r.relpath} ({r.reason})" for r in report.skipped],
        "dvc_file": dvc_file.name, "dvc_data_md5": str(out.get("md5", "")),
        "remote": remote, "pushed": push,
    }


def _has_an_image(entries: list[Any], tries: int = 200) -> bool:
    """Whether any of the first `tries` files has an image header Pillow reads."""
    from PIL import Image, UnidentifiedImageError

    from visionflow.data.ingest import FORMATS

    for e in entries[:tries]:
        try:
            with Image.open(e.fspath, formats=FORMATS):
                return True
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            continue
    return False


def champion_tags(layout: Layout, model_name: str, alias: str) -> dict[str, Any]:
    """The champion's version and data tags, without importing mlflow when no registry
    can exist."""
    from visionflow.data.drift import champion_version

    info: dict[str, Any] = {"model": model_name, "alias": alias}
    try:
        uri, mv = champion_version(layout, model_name, alias)
        if uri is None:
            return {**info, "status": "no registry"}
        if mv is None:
            return {**info, "status": "no champion"}
        tags = mv.tags or {}
        return {**info, "status": "ok", "version": str(mv.version),
                "data_hash": tags.get("data_hash", ""),
                "dvc_data_md5": tags.get("dvc_data_md5", ""), "run_id": mv.run_id}
    except Exception as e:  # status is a report: never crash on the registry
        return {**info, "status": f"unavailable: {' '.join(str(e).split())[:160]}"}


def data_status(layout: Layout, params: Any, target: str = "data",
                compute_hash: bool = True) -> dict[str, Any]:
    """The current data version next to the champion's (see `vflow data status`)."""
    import json

    dvc_file = layout.dvc_file(target)
    out = dvc_out(dvc_file)
    current: dict[str, Any] = {
        "source": params.data.source,
        "dvc_file": dvc_file.name if dvc_file.is_file() else "",
        "dvc_data_md5": str(out.get("md5", "")),
        "nfiles": out.get("nfiles"), "size": out.get("size"),
        "workspace": workspace_state(layout, target) if layout.dvc_dir.is_dir()
        else "no DVC repo",
        "data_hash": "",
    }
    if compute_hash:
        from visionflow.data.manifest import build_manifest, data_hash

        _, rows, _ = build_manifest(params, layout)
        current["data_hash"] = data_hash(rows)
    validated: dict[str, Any] = {}
    if layout.validation.is_file():
        try:
            v = json.loads(layout.validation.read_text())
            validated = {"data_hash": v.get("data_hash", ""), "success": v.get("success")}
        except ValueError:
            validated = {}
    reg = params.register_
    champ = champion_tags(layout, reg.model_name, reg.alias)
    name, urls = _dvc_config(layout)
    same = None
    if champ.get("status") == "ok":
        def md5(v: str) -> str:  # "<md5>.dir" in .dvc files; tags may drop the suffix
            return v.removesuffix(".dir")

        pairs = [(current["data_hash"], champ["data_hash"]),
                 (md5(current["dvc_data_md5"]), md5(champ["dvc_data_md5"]))]
        known = [a == b for a, b in pairs if a and b]
        same = all(known) if known else None
    return {"current": current, "last_validated": validated, "champion": champ,
            "same_as_champion": same,
            "remote": {"name": name or "", "url": urls.get(name or "", "")}}

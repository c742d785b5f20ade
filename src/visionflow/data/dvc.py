"""DVC from Python: the `dvc` command, the repo and its default remote, `.dvc` files.

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

import yaml

from visionflow.core.env import quiet_env
from visionflow.core.errors import DataError
from visionflow.core.files import load_yaml
from visionflow.core.layout import Layout

DEFAULT_REMOTE = ("local", ".dvc-storage")


def dvc_bin() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else (shutil.which("dvc") or "dvc")


def dvc(layout: Layout, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    quiet_env()
    proc = subprocess.run([dvc_bin(), *args], cwd=layout.root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise DataError(f"dvc {' '.join(args)}: {error_line(proc.stderr or proc.stdout)}")
    return proc


def relative(layout: Layout, path: Path) -> str:
    """`path` as `dvc` takes it from the project root (`data.dvc`, `data/pets.dvc`)."""
    return str(path.relative_to(layout.root)) if path.is_absolute() else str(path)


def error_line(output: str) -> str:
    """DVC's own error from its output: the last `ERROR:` line (DVC ends an unexpected
    error with a "Having any troubles?" line), else the last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")]
    return errors[-1] if errors else (lines[-1] if lines else "failed")


def ensure_dvc_repo(layout: Layout) -> None:
    if not layout.dvc_dir.is_dir():
        scm = layout.git_dir.exists()
        dvc(layout, "init", *([] if scm else ["--no-scm"]), "-q")
    ensure_default_remote(layout)


def remotes(layout: Layout) -> tuple[str | None, dict[str, str]]:
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
    return remotes(layout)[0]


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


def push_version(layout: Layout, dvc_file: Path) -> str:
    """`dvc push` of one `.dvc` file's data to the default remote, as a phrase for a summary
    line ("pushed to remote 'stack'", or why not); never raises."""
    name = default_remote(layout)
    if not name:
        return "not pushed: no DVC remote"
    proc = dvc(layout, "push", "-q", relative(layout, dvc_file), check=False)
    if proc.returncode != 0:
        return f"not pushed to remote '{name}': {error_line(proc.stdout + proc.stderr)}"
    return f"pushed to remote '{name}'"


def dvc_out(dvc_file: Path) -> dict[str, Any]:
    """The first `outs` entry of a .dvc file ({} when absent or unreadable)."""
    if not dvc_file.is_file():
        return {}
    try:
        outs = (load_yaml(dvc_file.read_text()) or {}).get("outs") or [{}]
        return dict(outs[0]) if isinstance(outs[0], dict) else {}
    except (yaml.YAMLError, AttributeError):
        return {}


def workspace_state(layout: Layout, target: str = "data") -> str:
    """in sync | modified | deleted | not tracked | missing (per `dvc status`)."""
    path, dvc_file = layout.root / target, layout.dvc_file(target)
    if not dvc_file.is_file():
        return "not tracked" if path.exists() else "missing"
    proc = dvc(layout, "status", "--json", relative(layout, dvc_file), check=False)
    out = proc.stdout.strip()
    if proc.returncode == 0 and out in ("{}", ""):
        return "in sync"
    return "deleted" if '"deleted"' in out else "modified"


def dvc_origin(dvc_file: Path) -> str:
    """Where a tracked output comes from: the S3 prefix `vflow data add` mirrors
    (`meta.source`), the URL of `dvc import-url`, or `<repo> <path>` of `dvc import`; '' for
    a plain `dvc add`, or no such file."""
    try:
        meta = load_yaml(dvc_file.read_text()) or {}
        outs, deps = meta.get("outs") or [{}], meta.get("deps") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    out = outs[0] if isinstance(outs[0], dict) else {}
    if source := (out.get("meta") or {}).get("source"):
        return str(source)
    dep = deps[0] if deps and isinstance(deps[0], dict) else {}
    repo = dep.get("repo")
    if isinstance(repo, dict):
        return f"{repo.get('url', '')} {dep.get('path', '')}".strip()
    return str(dep.get("path", ""))


def dvc_md5(dvc_file: Path) -> str:
    """The md5 a `.dvc` file records for its output ('' when absent; a directory's `.dir`
    suffix dropped)."""
    return str(dvc_out(dvc_file).get("md5", "")).removesuffix(".dir")


def changed(layout: Layout, dvc_file: Path) -> bool:
    """Whether the workspace differs from what `dvc_file` records (per `dvc status`)."""
    proc = dvc(layout, "status", "--json", relative(layout, dvc_file), check=False)
    return proc.returncode != 0 or proc.stdout.strip() not in ("{}", "")

"""Where a registered version came from: data hash, DVC md5, dvc.lock hash, git commit,
params hash. Every version (the compact one too) carries these as tags."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from visionflow.config import Params
from visionflow.data.dvc import dvc_md5
from visionflow.files import read_json, sha256_file
from visionflow.layout import Layout


def version_tags(params: Params, layout: Layout) -> dict[str, str]:
    """Provenance of what is in the workspace now (the data validate saw, this checkout)."""
    dump = json.dumps(params.dump(), sort_keys=True)
    validation = read_json(layout.validation, {}) or {}
    return {
        "data_hash": validation.get("data_hash", ""),
        "dvc_data_md5": dvc_md5(layout.dvc_file("data")),
        "dvc_lock_hash": sha256_file(layout.dvc_lock)[:16] if layout.dvc_lock.is_file() else "",
        "git_commit": git_commit(layout.root),
        "params_hash": hashlib.sha256(dump.encode()).hexdigest()[:16],
        "params": dump[:5000],
        "model": params.train.model,
    }


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if out.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")

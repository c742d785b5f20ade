"""Where a registered version came from: data hash, DVC md5, dvc.lock hash, git commit,
params hash, split scheme. Every version (the compact one too) carries these as `lineage.*`
tags, the four that identify a build first: data hash, git commit, params hash, dvc.lock
hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.files import read_json, sha256_file
from visionflow.core.layout import Layout
from visionflow.data.dvc import dvc_md5
from visionflow.data.splits import describe_scheme

LINEAGE = "lineage."  # the prefix of every lineage tag; the first four come first
LINEAGE_KEYS = ("data_hash", "git_commit", "params_hash", "dvc_lock_hash", "dvc_data_md5",
                "data_source", "split_scheme", "split_fingerprint", "train_hashes")


def version_tags(params: Params, layout: Layout) -> dict[str, str]:
    """Provenance of what is in the workspace now (the data validate saw, this checkout), as
    flat `lineage.*` tags (no JSON: params are the run's params, the split scheme's full
    record is the run's `data/validation.json`)."""
    dump = json.dumps(params.dump(), sort_keys=True)
    validation = read_json(layout.validation, {}) or {}
    scheme = validation.get("split_scheme") or {}
    tags = {
        "data_hash": validation.get("data_hash", ""),
        "git_commit": git_commit(layout.root),
        "params_hash": hashlib.sha256(dump.encode()).hexdigest()[:16],
        "dvc_lock_hash": sha256_file(layout.dvc_lock)[:16] if layout.dvc_lock.is_file() else "",
        "dvc_data_md5": dvc_md5(layout.root / rel if (rel := validation.get("dvc_file"))
                                else layout.dvc_file("data")),  # (untracked at validate)
        "data_source": str(params.data.source),
        "split_scheme": describe_scheme(scheme) if scheme else "",
        "split_fingerprint": str(scheme.get("fingerprint", "")),
    }
    out = {LINEAGE + k: v for k, v in tags.items() if v}
    out["model"] = params.train.model
    out["task"] = params.task
    return out


def lineage(tags: dict[str, str] | None, key: str) -> str:
    """A lineage tag of a version: `lineage.<key>`, or the bare `<key>` older versions
    carry."""
    tags = tags or {}
    return tags.get(LINEAGE + key) or tags.get(key) or ""


def flat_tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as MLflow should show them: scalar strings, none empty."""
    return {k: str(v)[:5000] for k, v in tags.items()
            if v is not None and str(v) != "" and not isinstance(v, dict | list)}


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

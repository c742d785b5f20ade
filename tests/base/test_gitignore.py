"""Git sees what DVC expects it to: the cached outs of dvc.yaml (weights, the packed data,
shards) are git-ignored, so `git add -A` after a run never commits them; metrics, plots and
the `cache: false` reports are not, so `dvc metrics diff` and `dvc plots diff` compare
commits."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from helpers import REPO


def _outs(stage: dict) -> list[tuple[str, bool]]:
    """(path, cached) for every out, metric and plot file of a stage."""
    found = []
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            found.append((path, kind == "outs" and (opts or {}).get("cache", True)))
    return found


def test_cached_outs_are_git_ignored_and_the_rest_is_not(tmp_path: Path):
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [o for stage in stages.values() for o in _outs(stage)]
    cached = sorted(p for p, c in outs if c)
    committed = sorted(p for p, c in outs if not c)
    assert "outputs/pack/packed.pt" in cached and "outputs/train/model.pt" in cached
    assert "outputs/evaluate/metrics.json" in committed

    def ignored(paths: list[str]) -> set[str]:
        probe = [p + "/x" if not Path(p).suffix else p for p in paths]  # a file inside a dir
        out = subprocess.run(["git", "check-ignore", "--no-index", *probe], cwd=tmp_path,
                             capture_output=True, text=True)
        return {ln.removesuffix("/x") for ln in out.stdout.splitlines()}

    assert set(cached) - ignored(cached) == set(), "add them to .gitignore"
    assert ignored(committed) == set(), "DVC compares these across commits"
    # no line for an out that no longer exists
    lines = [ln for ln in (REPO / ".gitignore").read_text().splitlines()
             if ln.startswith("/outputs/")]
    assert sorted(ln.lstrip("/") for ln in lines) == cached

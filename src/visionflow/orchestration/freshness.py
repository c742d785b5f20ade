"""One notion of "up to date" for both drivers: `dvc.lock`.

`dvc repro` decides from `dvc.lock` which stages to run and records each one it ran. The
Prefect flow asks DVC the same question before each stage (`Repo.status`) and, after the
stage succeeded, records it the same way (`Repo.commit`: the stage's deps, params and outs
hashed into `dvc.lock`, outs saved to the DVC cache). So `make run` then `dvc repro` runs
nothing, and `dvc repro` then the flow runs nothing.

A flow run with overrides (`-s key=value`, or a data source given as a flow parameter)
differs from `params.yaml`: a stage that tracks an overridden key runs, and is not recorded,
so `dvc.lock` always describes what `params.yaml` produces.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from visionflow.core.config import Params
from visionflow.core.files import load_yaml
from visionflow.core.layout import Layout


@dataclass(frozen=True)
class Verdict:
    """Whether a stage must run, why, and whether its result may go into dvc.lock."""

    run: bool
    reason: str
    record: bool


def stage_params(layout: Layout) -> dict[str, list[str]]:
    """The params keys each stage tracks, as `dvc.yaml` declares them ({} without it)."""
    try:
        stages = (load_yaml(layout.dvc_yaml.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, list[str]] = {}
    for name, spec in stages.items():
        keys: list[str] = []
        for entry in (spec or {}).get("params") or []:
            if isinstance(entry, str):
                keys.append(entry)
            elif isinstance(entry, dict):  # {params.yaml: [a, b]}
                for v in entry.values():
                    keys.extend(str(k) for k in (v or []))
        out[name] = keys
    return out


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def overridden(keys: list[str], effective: Params, base: Params) -> list[str]:
    """The tracked keys whose effective value differs from params.yaml's."""
    a, b = effective.dump(), base.dump()
    return [k for k in keys if _lookup(a, k) != _lookup(b, k)]


def _describe(status: list[Any]) -> str:
    """`dvc status` entries of one stage as one short line."""
    parts = []
    for item in status:
        if isinstance(item, str):  # "always changed", "changed checksum"
            parts.append(item)
            continue
        for kind, changes in (item or {}).items():
            if isinstance(changes, dict):
                parts.append(f"{kind}: " + ", ".join(f"{p} ({s})" for p, s in
                                                      list(changes.items())[:4]))
            else:
                parts.append(str(kind))
    return "; ".join(parts)[:300] or "changed"


class DvcState:
    """`dvc.lock` through DVC's own API (`dvc.repo.Repo`), in this process."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.enabled = layout.dvc_dir.is_dir() and layout.dvc_yaml.is_file()
        self.params = stage_params(layout) if self.enabled else {}

    @contextlib.contextmanager
    def _repo(self) -> Iterator[Any]:
        """The project's DVC repo, with the working directory at its root for the call: parts
        of DVC's API (the run cache) resolve paths against it, as its CLI does."""
        from dvc.repo import Repo  # heavy: only when a flow runs

        with contextlib.chdir(self.layout.root), Repo(str(self.layout.root)) as repo:
            yield repo

    def _target(self, stage: str) -> str:
        # DVC's API resolves a bare stage name against the working directory's dvc.yaml
        return f"{self.layout.dvc_yaml}:{stage}"

    def stale(self, stage: str) -> str | None:
        """Why `dvc repro` would run `stage` now (None: up to date per dvc.lock)."""
        with self._repo() as repo:
            status = repo.status(targets=[self._target(stage)])
        if not status:
            return None
        if stage not in self._locked():
            return "not in dvc.lock yet"
        return _describe(next(iter(status.values())))

    def verdict(self, stage: str, effective: Params, base: Params, force: bool) -> Verdict:
        if not self.enabled:
            return Verdict(True, "not a DVC project (no .dvc/ or dvc.yaml): always run", False)
        keys = overridden(self.params.get(stage, []), effective, base)
        if keys:
            return Verdict(True, f"overridden: {', '.join(keys)} (not recorded in dvc.lock)",
                           False)
        if force:
            return Verdict(True, "forced", True)
        why = self.stale(stage)
        return Verdict(why is not None, why or "up to date (dvc.lock)", True)

    def _locked(self) -> set[str]:
        try:
            lock = load_yaml(self.layout.dvc_lock.read_text()) or {}
        except (OSError, yaml.YAMLError):
            return set()
        return set(lock.get("stages") or {})

    def record(self, stage: str) -> None:
        """Record the finished stage in dvc.lock, as `dvc repro` does after running it."""
        with self._repo() as repo:
            dvc_log = logging.getLogger("dvc")  # its "Updating lock file" lines, twice each
            level = dvc_log.level  # (read here: opening the first Repo sets DVC's logging up)
            dvc_log.setLevel(logging.WARNING)
            try:
                repo.commit(self._target(stage), force=True)
            finally:
                dvc_log.setLevel(level)



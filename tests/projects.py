"""Shared, built-once projects for the registry, serving and predict tests (no tests here).

`trained_project` runs validate -> pack -> train -> evaluate once per test session on a
small digits subset; `registered_project` adds one register run (v1 @champion) on a copy.
Tests that change the registry take a `fresh_copy` with an empty store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from visionflow.layout import Layout

OVERRIDES = {
    "data.limit_per_class": 20,
    "train.model": "alexnet",
    "train.epochs": 1,
    "evaluate.topk": [1, 3],
}
_BUILT: dict[str, Path] = {}


def _stages(layout: Layout, names: tuple[str, ...]) -> None:
    from visionflow.configfile import load_params
    from visionflow.pipeline.stages import run_stage

    params = load_params(layout.params)
    for name in names:
        run_stage(name, params, layout)


def trained_project(tmp_path_factory, digits_dir: Path) -> Layout:
    if "trained" not in _BUILT:
        from conftest import make_project

        root = make_project(tmp_path_factory.mktemp("vf-trained") / "proj", digits_dir,
                            OVERRIDES)
        _stages(Layout.at(root), ("validate", "pack", "train", "evaluate"))
        _BUILT["trained"] = root
    return Layout.at(_BUILT["trained"])


def fresh_copy(src: Layout, dst: Path, keep_run: bool = False) -> Layout:
    """The project without its MLflow store (and, unless keep_run, without the run id)."""
    shutil.copytree(src.root, dst, ignore=shutil.ignore_patterns("mlruns", ".cache"))
    (dst / "mlruns").mkdir()
    layout = Layout.at(dst)
    if not keep_run:
        layout.run_info.unlink(missing_ok=True)
    return layout


def registered_project(tmp_path_factory, digits_dir: Path) -> Layout:
    if "registered" not in _BUILT:
        src = trained_project(tmp_path_factory, digits_dir)
        layout = fresh_copy(src, tmp_path_factory.mktemp("vf-registered") / "proj")
        _stages(layout, ("register",))
        _BUILT["registered"] = layout.root
    return Layout.at(_BUILT["registered"])


def split_images(layout: Layout, limit: int | None = None) -> list[Path]:
    """The test split's image files, in the evaluate stage's order."""
    import torch

    root = Path(json.loads(layout.validation.read_text())["dataset_root"])
    paths = torch.load(layout.cache, weights_only=True)["test_paths"]
    return [root / p for p in paths[:limit]]

"""Shared, built-once projects for the registry, serving and predict tests (no tests here).

`trained_project` runs validate -> pack -> train -> evaluate once per test session on a
small digits subset; `registered_project` adds one register run (v1 @champion) on a copy.
Tests that change the registry take a `fresh_copy` with an empty store.
`assert_stage_recorded` reads dvc.lock as DVC does (YAML), not as text.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import yaml

from visionflow.core.layout import Layout

OVERRIDES = {
    "data.limit_per_class": 20,
    "train.model": "alexnet",
    "train.epochs": 1,
    "evaluate.topk": [1, 3],
    "register.beat_majority": False,  # 1 epoch of AlexNet on 200 images: about chance
}
_BUILT: dict[str, Path] = {}


def _stages(layout: Layout, names: tuple[str, ...]) -> None:
    from visionflow.core.configfile import load_params
    from visionflow.orchestration.stage_runner import run_stage

    params = load_params(layout.params)
    for name in names:
        run_stage(name, params, layout)


def trained_project(tmp_path_factory, digits_dir: Path) -> Layout:
    if "trained" not in _BUILT:
        from helpers import make_project

        root = make_project(tmp_path_factory.mktemp("vf-trained") / "proj", digits_dir,
                            OVERRIDES)
        _stages(Layout.at(root), ("validate", "pack", "train", "evaluate"))
        _BUILT["trained"] = root
    return Layout.at(_BUILT["trained"])


def fresh_copy(src: Layout, dst: Path, keep_run: bool = False) -> Layout:
    """The project with an empty MLflow store (and, unless keep_run, without the run id)."""
    from mlflow_store import seed_store

    shutil.copytree(src.root, dst, ignore=shutil.ignore_patterns("mlruns", ".cache"))
    seed_store(dst / "mlruns")
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
    paths = torch.load(layout.packed, weights_only=True)["test_paths"]
    return [root / p for p in paths[:limit]]


def assert_stage_recorded(root: Path, stage: str) -> None:
    """dvc.lock records `stage` itself (not merely a later stage's dep naming its outputs):
    its deps and outs are the ones dvc.yaml lists, each file's md5 is the file's md5 now, each
    folder's entry counts the files it holds, and its params are params.yaml's values."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert stage in (lock.get("stages") or {}), f"{stage} not in dvc.lock's stages"
    entry = lock["stages"][stage]
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    params = yaml.safe_load((root / "params.yaml").read_text())

    def lookup(key: str) -> object:
        here = params
        for part in key.split("."):
            here = here[part]
        return here

    def names(items: list) -> set[str]:  # `${data.source}`: dvc.yaml's templating
        return {re.sub(r"\$\{([^}]+)\}", lambda m: str(lookup(m[1])),
                       next(iter(i)) if isinstance(i, dict) else i) for i in items}

    outs = names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))
    assert {d["path"] for d in entry["deps"]} == names(spec["deps"])
    assert {o["path"] for o in entry["outs"]} == outs
    for item in entry["deps"] + entry["outs"]:
        path = root / item["path"]
        if item["md5"].endswith(".dir"):
            files = [p for p in path.rglob("*") if p.is_file()  # (.dvcignore's patterns)
                     and "__pycache__" not in p.parts and p.suffix != ".pyc"]
            assert item["nfiles"] == len(files), item
            assert item["size"] == sum(p.stat().st_size for p in files), item
        else:
            assert item["md5"] == hashlib.md5(path.read_bytes()).hexdigest(), item["path"]
    tracked = entry.get("params", {}).get("params.yaml", {})
    assert set(tracked) == set(spec.get("params", [])), (set(tracked), spec.get("params"))
    for key, value in tracked.items():
        assert value == lookup(key), key


# --- `vflow tune` tests: the repository's params.yaml with a small seeded study -------------
TUNE_STUDY = "tune-test"
TUNE = f"""\
tune:                     # `vflow tune` (the tests' study)
  study: {TUNE_STUDY}
  trials: 6
  parallel: 2
  timeout_s: null
  sampler: random         # seeded: trial n gets the same params on every run
  startup_trials: 2
  pruner: median
  min_epochs: 2           # epoch 1 says little on 300 images
  baseline: true
  storage: null
  space:
    train.lr: {{low: 1.0e-5, high: 0.2, log: true}}   # below ~3e-3 nothing is learnt
    train.weight_decay: {{low: 1.0e-5, high: 1.0e-3, log: true}}
"""
TUNE_PRESET = """\
data:
  limit_per_class: 30
train:
  epochs: 3
  batch_size: 32
  warmup_epochs: 0.0
  schedule: constant
  label_smoothing: 0.0
  threads: 1
  deterministic: true
  progress: false
"""


def tune_params_text() -> str:
    """The repository's params.yaml, comments and all, with the tests' preset and study."""
    from helpers import REPO

    text = (REPO / "params.yaml").read_text()
    head = text[:text.index("\ntune:")]
    assert "\n  lr: 0.5 " in head and "\npreset: null " in head
    head = head.replace("\n  lr: 0.5 ", "\n  lr: 0.05 ", 1)  # the baseline: a good one
    head = head.replace("\npreset: null ", "\npreset: tune-test ")
    return head + "\n" + TUNE


def tune_project(dst: Path, digits_dir: Path) -> Path:
    """A project on the digits with the tests' study and preset, validated and packed, its
    MLflow store created: what each `vflow tune` test copies."""
    from helpers import make_project

    from visionflow.core.configfile import load_params
    from visionflow.mlops.tracking import setup
    from visionflow.orchestration.stage_runner import run_stage

    root = make_project(dst, digits_dir)
    (root / "presets" / "tune-test.yaml").write_text(TUNE_PRESET)
    (root / "params.yaml").write_text(tune_params_text())
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack"):
        run_stage(stage, params, layout)
    setup(layout)  # MLflow's store, created once (its migrations take seconds)
    return root

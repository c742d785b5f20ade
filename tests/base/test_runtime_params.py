"""Settings that change how a stage runs (progress bar, threads, workers: `RUNTIME_KEYS`)
are not tracked by dvc.yaml: changing one leaves every stage up to date, while a setting
that shapes a result makes its stage stale."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from builders import flat_digits
from helpers import BIN, REPO, make_project, run

from visionflow.core.config import RUNTIME_KEYS, STAGE_NAMES, Params

# sections a stage tracks key by key because they hold runtime keys: all the others
WHOLE_BUT_RUNTIME = {"validate": ("data", "validate"), "train": ("train",)}
DVC = str(BIN / "dvc")


def _tracked(stage: str) -> set[str]:
    """The params keys a dvc.yaml stage tracks, a whole section expanded to its keys."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    dump = Params().dump()
    keys: set[str] = set()
    for entry in spec.get("params", []):
        value = dump.get(entry)
        keys |= {f"{entry}.{k}" for k in value} if isinstance(value, dict) else {entry}
    return keys


def test_no_stage_tracks_a_runtime_key_and_no_result_key_is_left_out():
    dump = Params().dump()
    for stage in STAGE_NAMES:
        tracked = _tracked(stage)
        assert not tracked & set(RUNTIME_KEYS), (stage, sorted(tracked & set(RUNTIME_KEYS)))
        for section in WHOLE_BUT_RUNTIME.get(stage, ()):
            every = {f"{section}.{k}" for k in dump[section]} - set(RUNTIME_KEYS)
            assert every <= tracked, (stage, sorted(every - tracked))


def _set(root: Path, **changes: object) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        raw[section][name] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_a_runtime_setting_leaves_the_stages_up_to_date(tmp_path: Path, digits_dir: Path):
    from visionflow.core.configfile import load_params
    from visionflow.core.layout import Layout
    from visionflow.orchestration.stage_runner import run_stage

    data = flat_digits(tmp_path / "digits", digits_dir, 12)  # 120 files to hash, not 779
    root = make_project(tmp_path / "proj", data, {"data.limit_per_class": 5,
                                                  "train.epochs": 1}, git=True)
    # the three stages here (no process start-ups), recorded in dvc.lock as `dvc repro`
    # and the flow record them (`dvc commit`: deps, params and outs hashed)
    layout = Layout.at(root)
    params = load_params(layout.params)
    for stage in ("validate", "pack", "train"):
        run_stage(stage, params, layout)
    run([DVC, "commit", "-f", "-q", "validate", "pack", "train"], root)
    assert json.loads(run([DVC, "status", "--json", "train"], root).stdout) == {}
    _set(root, train__progress=False, train__threads=1, train__checkpoint_steps=7,
         data__workers=0, validate__workers=1, validate__cache=False)
    assert json.loads(run([DVC, "status", "--json", "train"], root).stdout) == {}
    _set(root, train__label_smoothing=0.1)  # a result setting: train is stale, validate not
    stale = json.loads(run([DVC, "status", "--json", "train"], root).stdout)
    assert set(stale) == {"train"}, stale
    assert "train.label_smoothing" in json.dumps(stale["train"])

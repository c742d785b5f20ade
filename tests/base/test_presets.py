"""Presets: `preset: NAME` (or `-s preset=NAME`) merges presets/NAME.yaml over params.yaml,
command-line overrides win, an unknown name is one line naming the choices."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, run

from visionflow.core.configfile import load_params, parse_params
from visionflow.core.errors import ConfigError
from visionflow.core.presets import available, deep_merge, load_raw

PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["source"] = "."
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    return tmp_path


def test_the_shipped_presets_exist_and_validate():
    assert {"cifar10-fast", "cifar10-muon", "cifar10-resnet18"} <= set(PRESETS)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert base["preset"] is None
    for name in PRESETS:
        params = parse_params(load_raw(REPO / "params.yaml", name))
        assert params.preset == name
        if params.task == "classification":  # the CIFAR-10 presets
            assert params.data.image_size == 32
        else:  # shapes-unet: the generated segmentation set
            assert params.segmentation.image_size == 64


def test_preset_from_the_command_line_then_overrides(proj: Path):
    params = load_params(proj / "params.yaml", ["preset=cifar10-fast", "train.epochs=2"])
    assert params.preset == "cifar10-fast"
    assert params.train.batch_size == 1024 and params.train.lookahead  # from the preset
    assert params.train.epochs == 2  # the override wins
    assert params.augment.alternate_flip and params.evaluate.tta == 1
    assert params.validate_.min_images_per_class == 5  # untouched sections stay


def test_preset_in_params_yaml_and_cancelled_by_an_override(proj: Path):
    p = proj / "params.yaml"
    raw = yaml.safe_load(p.read_text())
    p.write_text(yaml.safe_dump({**raw, "preset": "cifar10-resnet18"}, sort_keys=False))
    assert load_params(p).train.model == "resnet18"
    assert load_params(p, ["preset=null"]).train.model == "fast"


def test_unknown_preset_is_one_line_naming_the_choices(proj: Path):
    with pytest.raises(ConfigError) as err:
        load_params(proj / "params.yaml", ["preset=cifar100-fast"])
    msg = str(err.value)
    assert "preset='cifar100-fast'" in msg and "cifar10-fast, cifar10-muon, cifar10-resnet18" in msg
    assert "\n" not in msg


def test_cli_stage_with_unknown_preset_exits_2(proj: Path):
    proc = run([str(BIN / "vflow"), "stage", "train", "-s", "preset=nope"], proj, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "preset='nope'" in lines[0], proc.stderr


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert deep_merge(base, {"a": {"c": [3]}, "e": 2}) == {"a": {"b": 1, "c": [3]}, "d": 1,
                                                          "e": 2}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    assert available(Path("/nonexistent/params.yaml")) == []

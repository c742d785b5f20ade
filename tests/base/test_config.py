"""params.yaml errors stop with one line naming the key and value, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import BIN, REPO, run

from visionflow.core.configfile import load_params, parse_params
from visionflow.core.errors import ConfigError


def test_repo_params_are_valid():
    params = (
        load_params(REPO / "params.yaml", root=REPO)
        if (REPO / "data").exists()
        else parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    )
    assert params.train.epochs > 0
    assert params.register_.alias == "champion"


def _differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k, "<missing>"), b.get(k, "<missing>"),
                                      f"{path}.{k}" if path else str(k))]
    return [] if a == b else [f"{path}: params.yaml {a!r} != config.py {b!r}"]


def test_params_yaml_is_the_typed_config_dump():
    """Each default is defined once: params.yaml holds exactly what `Params()` dumps (the
    typed config is the source); a value changed in either place fails here."""
    from visionflow.core.config import Params
    from visionflow.core.tuneconfig import Dimension

    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    space = on_disk["tune"]["space"]  # a dimension's unset fields (log, step) as it reads them
    on_disk["tune"]["space"] = {k: Dimension(**v).model_dump(mode="json")
                                for k, v in space.items()}
    assert _differences(on_disk, Params().dump()) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lr": -0.1}}, "train.lr=-0.1"),
        ({"train": {"epochs": 0}}, "train.epochs=0"),
        ({"train": {"model": "vgg99"}}, "train.model='vgg99': unknown model"),
        ({"train": {"epochs": "many"}}, "train.epochs='many'"),
        ({"train": {"learning_rate": 0.1}}, "unknown key 'train.learning_rate'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"data": {"image_size": -4}}, "data.image_size=-4"),
        ({"evaluate": {"topk": [0]}}, "evaluate.topk=[0]"),
        ({"data": {"storage": "zip"}}, "data.storage='zip'"),
        ({"data": {"storage_budget_bytes": 0}}, "data.storage_budget_bytes=0"),
        ({"data": {"image_size": 224, "max_side": 100}},
         "data.max_side=100: must be >= data.image_size (224)"),
        ({"data": {"image_size": 224, "resize_size": 200}}, "data.resize_size=200"),
        ({"data": {"crop_scale": [0.9, 0.1]}}, "data.crop_scale=[0.9, 0.1]"),
    ],
)
def test_bad_values_name_key_and_value(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    msg = str(err.value)
    assert expected in msg
    assert "\n" not in msg


def test_an_s3_cache_too_small_for_its_readers_is_refused():
    """LitData holds two shards per loader worker in each training process's folder whatever
    the budget: a cap below that would not hold (two ranks at 16 MiB overshot it by 2.2 MiB)."""
    MiB = 2**20
    data = {"shards_url": "s3://b/p", "shard_cache_bytes": 16 * MiB, "shard_bytes": 2 * MiB,
            "workers": 2}
    with pytest.raises(ConfigError) as err:
        parse_params({"data": data, "train": {"procs_per_node": 2}})
    msg = str(err.value)
    assert "data.shard_cache_bytes=16777216: below 19737902" in msg and "\n" not in msg
    parse_params({"data": data})  # one process: 9.4 MiB of the 16
    parse_params({"data": {**data, "shards_url": None}, "train": {"procs_per_node": 2}})


def test_missing_dataset_path(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data": {"source": "nowhere/images"}}))
    with pytest.raises(ConfigError, match="data.source='nowhere/images': path does not exist"):
        load_params(p)
    # tracked by DVC but not pulled yet (a fresh clone): loads; reading it says what to do
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "images.dvc").write_text("outs:\n- path: images\n")
    assert load_params(p).data.source == "nowhere/images"
    from visionflow.core.errors import DataError
    from visionflow.data.source import resolve_source

    with pytest.raises(DataError, match=r"tracked by images\.dvc: `dvc pull` it"):
        resolve_source(tmp_path / "nowhere" / "images", tmp_path / "cache")


def test_overrides_are_validated(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"data": {"source": "."}}))
    assert load_params(p, ["train.epochs=3"]).train.epochs == 3
    with pytest.raises(ConfigError, match="train.epochs=0"):
        load_params(p, ["train.epochs=0"])


def test_cli_exits_nonzero_with_one_line(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    proc = run([str(BIN / "vflow"), "stage", "train"], tmp_path, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: params.yaml: train.lr=-1: Input should be greater than 0"] or (
        len(lines) == 1 and "train.lr=-1" in lines[0]
    ), proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_help_is_light():
    """`vflow --help` must not import torch, mlflow, GX, Prefect or Optuna."""
    code = (
        "import sys, runpy; sys.argv=['vflow','--help']\n"
        "from visionflow.cli import main as cli\n"
        "try:\n    cli.app()\nexcept SystemExit:\n    pass\n"
        "heavy=[m for m in ('torch','mlflow','great_expectations','prefect','optuna')\n"
        "       if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    proc = run([str(BIN / "python"), "-c", code], REPO)
    assert "HEAVY []" in proc.stdout


def test_params_parse_like_yaml_safe_load_and_bad_yaml_names_the_line(tmp_path: Path):
    """`read_params_file` parses with libyaml (`core.files.load_yaml`): the same values as
    PyYAML's own safe loader; a syntax error is one line naming the file and the line."""
    from visionflow.core.configfile import read_params_file

    text = (REPO / "params.yaml").read_text()
    assert read_params_file(REPO / "params.yaml") == yaml.safe_load(text)
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [0.1,\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: line 4 invalid YAML$"):
        read_params_file(bad)

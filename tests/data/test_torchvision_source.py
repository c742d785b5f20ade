"""`data.source: torchvision:<NAME>`: torchvision's own dataset classes, written out once as
an ImageFolder. No test downloads: MNIST's raw IDX files are written here (torchvision
downloads only what is missing), and the CIFAR-10 download is pointed at a closed port."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import write_mnist_raw
from helpers import make_project
from PIL import Image

from visionflow.core.configfile import load_params
from visionflow.core.errors import ConfigError, DataError
from visionflow.core.layout import Layout
from visionflow.data import torchvision_source
from visionflow.orchestration.stage_runner import run_stage


def test_mnist_becomes_an_imagefolder_once(tmp_path: Path):
    cache = Layout.at(tmp_path)
    pixels = write_mnist_raw(cache.torchvision_cache / "MNIST" / "raw")
    root = torchvision_source.materialize("torchvision:MNIST", cache)
    assert root == torchvision_source.folder("torchvision:MNIST", cache)
    train = sorted((root / "train").iterdir())
    assert [d.name for d in train][:2] == ["0 - zero", "1 - one"] and len(train) == 10
    assert all(len(list(d.iterdir())) == 6 for d in train)
    assert sum(1 for _ in (root / "test").rglob("*.png")) == 20
    # pixel for pixel what torchvision read; the first test image is a "0"
    first = np.asarray(Image.open(sorted((root / "test" / "0 - zero").iterdir())[0]))
    assert np.array_equal(first, pixels["t10k"][0])
    stamp = (root / "train" / "0 - zero" / "00.png").stat().st_mtime_ns
    assert torchvision_source.materialize("torchvision:MNIST", cache) == root
    assert (root / "train" / "0 - zero" / "00.png").stat().st_mtime_ns == stamp  # reused


def test_validate_reads_a_torchvision_source(tmp_path: Path):
    project = make_project(tmp_path / "proj", tmp_path / "unused",
                           {"data.source": "torchvision:MNIST", "data.limit_per_class": None})
    layout = Layout.at(project)
    write_mnist_raw(layout.cache_root / "torchvision" / "MNIST" / "raw")
    params = load_params(layout.params, ["validate.min_images_per_class=1"])
    run_stage("validate", params, layout)
    import pandas as pd

    manifest = pd.read_csv(layout.manifest)
    assert len(manifest) == 80 and manifest["decodable"].all()
    assert set(manifest["split"]) == {"train", "val", "test"}  # val carved from train
    assert manifest["label"].nunique() == 10


def test_offline_download_is_one_line_and_leaves_no_folder(tmp_path: Path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setattr(datasets.CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError) as err:
        torchvision_source.materialize("torchvision:CIFAR10", Layout.at(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("data.source=torchvision:CIFAR10: could not download CIFAR10")
    assert "offline?" in message
    assert not (tmp_path / "sources").exists() or not any((tmp_path / "sources").iterdir())


def test_unknown_torchvision_dataset_is_a_config_error(tmp_path: Path):
    project = make_project(tmp_path / "proj", tmp_path / "unused",
                           {"data.source": "torchvision:ImageNet"})
    with pytest.raises(ConfigError, match=r"data.source.*'ImageNet'.*choose from CIFAR10"):
        load_params(project / "params.yaml")

"""Each stage on tiny data, in-process, in order; then the gate's behaviour on re-runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from visionflow.core.configfile import load_params
from visionflow.core.errors import ValidationFailed
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage


@pytest.fixture(scope="module")
def done(tmp_path_factory, digits_dir) -> tuple[Layout, dict]:
    """Run all six stages once; tests below inspect what they wrote. Compression: the two
    methods checked here (every method and combination: tests/stages/test_compress_stage.py)."""
    from helpers import make_project

    root = make_project(tmp_path_factory.mktemp("stages") / "proj", digits_dir,
                        {"data.limit_per_class": 60, "compress.methods": ["int8", "prune"]})
    layout = Layout.at(root)
    params = load_params(layout.params)
    results = {
        name: run_stage(name, params, layout)
        for name in ("validate", "pack", "train", "evaluate", "compress", "register")
    }
    return layout, results


def test_validate_writes_manifest_and_docs(done):
    layout, results = done
    summary = json.loads(layout.validation.read_text())
    assert summary["success"] is True
    assert summary["classes"] == [str(d) for d in range(10)]
    assert all(e["success"] for e in summary["expectations"])
    assert len(summary["expectations"]) >= 10
    with layout.manifest.open() as f:
        rows = list(csv.DictReader(f))
    assert {"path", "split", "label", "width", "height", "mode", "bytes", "sha256"} <= set(rows[0])
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert (layout.data_docs / "index.html").is_file()


def test_pack_cache_is_uint8_and_safe_to_load(done):
    layout, _ = done
    cache = torch.load(layout.packed, weights_only=True)
    assert cache["train_x"].dtype == torch.uint8
    assert cache["train_x"].shape[1:] == (3, 16, 16)
    assert len(cache["test_x"]) == len(cache["test_y"]) > 0
    policy = json.loads(layout.policy.read_text())["policy"]
    assert {"hflip", "translate", "cutout"} <= set(policy)
    # tensor mode: the shards output holds the note that says so, not nothing (DVC warns)
    assert [p.name for p in layout.shards.iterdir()] == ["tensor_mode.json"]


def test_train_writes_loadable_weights(done):
    from visionflow.model.classifier import load_classifier

    layout, results = done
    model, arch = load_classifier(layout.model)
    assert arch.name == "fast" and arch.num_classes == 10
    assert results["train"].epochs_run == 2
    history = list(csv.DictReader(layout.history.open()))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert not layout.checkpoint.exists()
    from visionflow.model.calibration import T_RANGE

    assert T_RANGE[0] < arch.temperature < T_RANGE[1] and arch.temperature != 1.0  # fitted


def test_evaluate_metrics_match_predictions(done):
    layout, _ = done
    metrics = json.loads(layout.metrics.read_text())
    for key in ("top1", "top3", "top5", "f1_macro", "miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["top1"] <= metrics["top3"] <= metrics["top5"]
    preds = list(csv.DictReader(layout.predictions.open()))
    acc = sum(r["actual"] == r["predicted"] for r in preds) / len(preds)
    assert acc == pytest.approx(metrics["top1"], abs=1e-6)
    assert metrics["top1"] > 0.3  # two epochs on digits: far above 10% chance
    assert layout.confusion_png.read_bytes()[:4] == b"\x89PNG"


def test_compress_reports_variants(done):
    layout, _ = done
    report = json.loads(layout.compress_report.read_text())
    int8 = report["variants"]["int8"]
    assert int8["size_ratio"] < 0.5
    assert int8["top1_agreement_with_fp32"] >= 0.9
    assert 0.4 <= report["variants"]["prune"]["sparsity"] <= 0.6
    assert (layout.compress_models / "model_int8.onnx").is_file()


def test_register_promotes_first_then_keeps_on_tie(done):
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    layout, results = done
    first = results["register"]
    assert first.alias == "champion" and first.decision.promote
    assert first.decision.reason == "no champion yet"
    test_y = torch.load(layout.packed, weights_only=True)["test_y"]  # 10 classes: about 0.1
    share = float(torch.bincount(test_y).max()) / len(test_y)
    majority = {c.name: c for c in first.decision.checks}["majority"]
    assert majority.required and majority.passed and f"> {share:.4f}, what" in majority.detail

    params = load_params(layout.params)
    second = run_stage("register", params, layout)  # same model: a tie is not a win
    assert not second.decision.promote
    assert second.decision.champion_top1 == pytest.approx(first.decision.challenger_top1)

    tracking.setup(layout)
    client = MlflowClient()
    champ = client.get_model_version_by_alias(first.model_name, "champion")
    assert str(champ.version) == first.version
    tags = client.get_model_version(first.model_name, second.version).tags
    assert tags["gate_decision"] == "rejected"
    assert len(tags["lineage.data_hash"]) == 32 and "lineage.params_hash" in tags
    assert all(v for v in tags.values()), tags  # (no git here: no empty git_commit tag)


def test_corrupt_image_fails_validate_with_its_name(tmp_path: Path, digits_dir: Path):
    from helpers import make_project

    root = make_project(tmp_path / "p", digits_dir)
    bad = root / "data" / "train" / "3" / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    layout = Layout.at(root)
    with pytest.raises(ValidationFailed, match="corrupt.png"):
        run_stage("validate", load_params(layout.params), layout)
    assert bad.exists()  # quarantined, never deleted
    quarantine = layout.quarantine.read_text()
    assert "train/3/corrupt.png" in quarantine
    assert json.loads(layout.validation.read_text())["success"] is False


def test_failed_validate_blocks_pack(tmp_path: Path, digits_dir: Path):
    from helpers import make_project

    from visionflow.core.errors import DataError

    root = make_project(tmp_path / "p", digits_dir)
    shutil.rmtree(root / "data" / "train" / "7")  # test class missing from train
    layout = Layout.at(root)
    params = load_params(layout.params)
    with pytest.raises(ValidationFailed, match="every val/test class also appears in train"):
        run_stage("validate", params, layout)
    with pytest.raises(DataError, match="data gate failed"):
        run_stage("pack", params, layout)

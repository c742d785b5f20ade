"""The champion gate compares on test images neither model trained on: every version
records the sha256 of its training and val images (an artifact its `train_hashes` tag
points at); after a new split the champion's training images are excluded from the scored
set, the report says how many and why, and with too few left the gate refuses and nothing
moves. Real stages, a real MLflow store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from builders import flat_digits
from helpers import make_project

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage

pytestmark = pytest.mark.slow

MODEL = "visionflow-classifier"
FAST = {"train.epochs": 1, "train.threads": 1, "compress.methods": [], "register.compact": False,
        "validate.drift": "off", "register.beat_majority": False}  # 1 epoch: about chance


def _pipeline(layout: Layout, overrides: list[str], stages=("validate", "pack", "train",
                                                             "evaluate", "register")):
    params = load_params(layout.params, overrides)
    for name in stages:
        out = run_stage(name, params, layout)
    return out


def _recorded(client, version: str) -> dict[str, list[str]]:
    import mlflow

    uri = client.get_model_version(MODEL, version).tags["lineage.train_hashes"]
    assert uri.startswith("runs:/") and uri.endswith(f"train_hashes-v{version}.json")
    return json.loads(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)).read_text())


def test_gate_scores_only_images_neither_model_trained_on(tmp_path: Path, digits_dir: Path):
    from visionflow.mlops import registry

    data = flat_digits(tmp_path / "src", digits_dir, 40)
    layout = Layout.at(make_project(tmp_path / "proj", data, FAST))

    first = _pipeline(layout, [])
    assert (first.version, first.alias) == ("1", "champion")
    cache = torch.load(layout.packed, weights_only=True)
    client = registry.client_for(layout)
    v1 = _recorded(client, "1")
    champion_set = set(v1["train"]) | set(v1["val"])
    assert champion_set == set(cache["train_sha256"]) | set(cache["val_sha256"])
    n_test = len(cache["test_sha256"])
    assert f"{n_test} of {n_test} test images scored, 0 excluded" in layout.gate_report.read_text()

    # A new split (another seed): most new test images were the champion's training images.
    second = _pipeline(layout, ["data.split_seed=1"])
    validation = json.loads(layout.validation.read_text())
    assert validation["split"]["status"] == "new_split"
    cache = torch.load(layout.packed, weights_only=True)
    test = cache["test_sha256"]
    overlap = sum(h in champion_set for h in test)
    assert overlap > len(test) // 2
    reg = json.loads(layout.registration.read_text())
    scored = reg["decision"]["scored"]
    assert (scored["total"], scored["excluded"], scored["champion_trained"]) == \
        (len(test), overlap, overlap)
    assert scored["scored"] == len(test) - overlap < 30  # too few left to judge
    assert second.alias is None and not reg["decision"]["promote"]
    assert reg["decision"]["reason"].startswith("refused: too few test images to judge: ")
    assert f"after excluding {overlap} that the champion" in reg["decision"]["reason"]
    assert "register.min_test_images=30" in reg["decision"]["reason"]
    assert "\n" not in reg["decision"]["reason"]
    assert registry.alias_map(client, MODEL) == {"champion": "1"}  # nothing moved
    report = layout.gate_report.read_text()
    assert f"{len(test) - overlap} of {len(test)} test images scored, {overlap} excluded " \
           f"({overlap} the champion trained or validated on, 0 the challenger did)" in report
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["gate_decision"] == "rejected" and f"{overlap} excluded" in tags[
        "gate_test_images"]
    assert "split_seed=1" in tags["lineage.split_scheme"]

    # With a lower minimum the gate compares both models on exactly the remaining images.
    third = _pipeline(layout, ["data.split_seed=1", "register.min_test_images=5"],
                      ("register",))
    reg = json.loads(layout.registration.read_text())
    d = reg["decision"]
    assert d["n"] == d["scored"]["scored"] == len(test) - overlap
    assert d["champion_version"] == "1" and d["champion_top1"] is not None
    assert d["mcnemar_p"] is not None and {c["name"] for c in d["checks"]} == {
        "floor", "majority", "delta", "mcnemar"}
    # what the gate scored is exactly the test images outside the champion's sets: the
    # challenger's top-1 there (from evaluate's per-image predictions) is the gate's
    with layout.predictions.open(newline="") as f:
        hits = {r["path"]: r["actual"] == r["predicted"] for r in csv.DictReader(f)}
    outside = [hits[p] for p, h in zip(cache["test_paths"], test, strict=True)
               if h not in champion_set]
    assert d["challenger_top1"] == pytest.approx(sum(outside) / len(outside))
    assert third.version == "3"
    v3 = _recorded(client, "3")
    assert set(v3["train"]) == set(cache["train_sha256"])
    assert set(v3["val"]) == set(cache["val_sha256"])


def test_a_class_added_since_the_champion_is_left_out_of_the_comparison(tmp_path: Path,
                                                                        digits_dir: Path):
    """The champion knows nine digits, the challenger ten: the gate compares them on the
    test images of the nine (the champion is not skipped as "trained on other classes"), and
    the report names the class left out and how many images it held."""
    data = flat_digits(tmp_path / "src", digits_dir, 40)
    nine = tmp_path / "nine"
    (data / "9").rename(nine)
    layout = Layout.at(make_project(tmp_path / "proj", data, FAST))
    assert _pipeline(layout, []).alias == "champion"

    nine.rename(layout.root / "data" / "9")
    _pipeline(layout, [])
    cache = torch.load(layout.packed, weights_only=True)
    of_nine = int((cache["test_y"] == cache["classes"].index("9")).sum())
    assert of_nine > 0
    d = json.loads(layout.registration.read_text())["decision"]
    assert d["champion_version"] == "1" and d["champion_top1"] is not None, d["reason"]
    n_test = len(cache["test_y"])
    assert (d["scored"]["other_classes"], d["scored"]["new_classes"], d["n"]) == \
        (of_nine, ["9"], n_test - of_nine)
    assert f"{n_test - of_nine} of {n_test} test images scored, {of_nine} excluded (0 the " \
           f"champion trained or validated on, 0 the challenger did, {of_nine} of the 1 " \
           "classes the champion was not trained on: 9)" in layout.gate_report.read_text()
    with layout.predictions.open(newline="") as f:  # the challenger scored on the nine alone
        hits = [r["actual"] == r["predicted"] for r in csv.DictReader(f) if r["actual"] != "9"]
    assert d["challenger_top1"] == pytest.approx(sum(hits) / len(hits))

"""The register stage on a tiny trained model: model card, provenance tags, signature and
input example; the pyfunc from image bytes equals the evaluate stage; evaluation artifacts;
two concurrent registrations (2 processes) leave exactly one champion."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO
from projects import fresh_copy, registered_project, split_images, trained_project

from visionflow.core.layout import Layout
from visionflow.mlops import registry

NAME = "visionflow-classifier"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, digits_dir) -> Layout:
    return registered_project(tmp_path_factory, digits_dir)


def _client(layout: Layout):
    from visionflow.mlops import registry

    return registry.client_for(layout.root)


def test_evaluate_writes_every_artifact(tmp_path_factory, digits_dir):
    from visionflow.stages import evaluate

    trained = trained_project(tmp_path_factory, digits_dir)
    files = evaluate.artifact_files(trained)
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f
        if f.suffix == ".png":
            assert f.read_bytes()[:4] == b"\x89PNG", f
    metrics = json.loads(trained.metrics.read_text())
    assert {"top1", "top3", "f1_macro", "f1_micro", "f1_weighted", "miou", "ece", "n_test",
            "iou_per_class"} <= set(metrics)
    with (trained.evaluate_dir / "per_class.csv").open() as f:  # a class's numbers: the plot
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["class", "precision", "recall", "f1", "iou", "support"]
    assert {r["class"]: float(r["iou"]) for r in rows} == pytest.approx(metrics["iou_per_class"])
    assert sum(int(r["support"]) for r in rows) == metrics["n_test"]
    with (trained.evaluate_dir / "reliability.csv").open() as f:
        bins = list(csv.DictReader(f))
    assert sum(int(b["count"]) for b in bins) == metrics["n_test"]
    # the same files were logged to the pipeline's MLflow run
    run_id = json.loads(trained.run_info.read_text())["run_id"]
    logged = {Path(a.path).name for a in _client(trained).list_artifacts(run_id, "evaluate")}
    assert {f.name for f in files} <= logged


def test_version_has_card_tags_signature_and_example(registered: Layout):
    import mlflow

    reg = json.loads(registered.registration.read_text())
    assert reg["version"] == "1" and reg["alias"] == "champion"
    client = _client(registered)
    mv = client.get_model_version(NAME, "1")
    card = mv.description
    for needle in ("# visionflow-classifier v1: alexnet", "## Data", "data hash", "## Test metrics",
                   "| top1 |", "| ece |", "training time", "## Lineage", reg["run_id"],
                   "classes | 10: 0, 1, 2", "## Champion gate: PROMOTED", "hardware",
                   "```yaml"):
        assert needle in card, needle
    params_block = card.split("```yaml")[1].split("```")[0]  # a key a line, as params.yaml
    assert "\naugment:\n  hflip: " in params_block and "{" not in params_block, params_block
    tags = mv.tags
    for key in ("lineage.data_hash", "lineage.params_hash", "gate_decision", "gate_reason",
                "gate_checks"):  # (no git, no dvc.lock here: no empty tags for them)
        assert key in tags, key
    assert len(tags["lineage.data_hash"]) == 32 and tags["gate_decision"] == "promoted"
    assert all(v and not v.startswith(("{", "[")) for v in tags.values()), tags  # flat
    own = {m.key: m.value for m in client.get_logged_model(
        registry.model_id_of(mv)).metrics}
    assert own["test/top1"] == pytest.approx(
        json.loads(registered.metrics.read_text())["top1"], abs=1e-6)
    assert all(k.startswith("test/") for k in own), own  # its own: nothing of the run's
    # the data it trained and was evaluated on: datasets whose digest is the data hash
    inputs = client.get_run(mv.run_id).inputs.dataset_inputs
    contexts: dict[str, set[str]] = {}
    for i in inputs:
        contexts.setdefault(i.dataset.digest, set()).update(t.value for t in i.tags)
    assert "training" in contexts.get(tags["lineage.data_hash"], set()), contexts
    assert "evaluation" in contexts.get(tags["lineage.data_hash"], set()), contexts
    profile = json.loads(next(i.dataset.profile for i in inputs
                              if i.dataset.digest == tags["lineage.data_hash"]))
    assert profile["classes"] == 10 and profile["images"] > 0
    assert "expect label" in card and "cat.png" not in card
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.inputs.inputs[0].type.name == "binary"
    assert [c.name for c in info.signature.outputs.inputs] == ["label", "score", "topk"]
    assert info.saved_input_example_info is not None
    assert client.get_registered_model(NAME).description
    report = (registered.register_dir / "gate_report.md").read_text()
    assert report.startswith("## Champion gate: PROMOTED")
    assert "register/gate_report.md" in {a.path for a in
                                         client.list_artifacts(reg["run_id"], "register")}


def test_provenance_tags_hold_the_values_they_name(tmp_path_factory, digits_dir, tmp_path):
    """In a git + DVC checkout whose stages are recorded in dvc.lock and committed: the
    version's tags equal what they claim, each found here independently (not only present)."""
    import hashlib

    import yaml
    from helpers import BIN, REPO, run

    from visionflow.core.configfile import load_params
    from visionflow.orchestration.freshness import DvcState
    from visionflow.orchestration.stage_runner import run_stage

    layout = fresh_copy(trained_project(tmp_path_factory, digits_dir), tmp_path / "proj",
                        keep_run=True)  # run.json: an out of train in dvc.lock
    root = layout.root
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    run(["git", "init", "-q", "-b", "main"], root)
    run([str(BIN / "dvc"), "init", "-q"], root)
    run([str(BIN / "dvc"), "add", "-q", "data"], root)
    state = DvcState(layout)
    for stage in ("validate", "pack", "train", "evaluate"):
        state.record(stage)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "trained"], root)
    head = run(["git", "rev-parse", "HEAD"], root).stdout.strip()
    lock_sha = hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()
    data_md5 = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    validated = json.loads(layout.validation.read_text())["data_hash"]
    params = load_params(layout.params)
    dump = json.dumps(params.dump(), sort_keys=True)

    run_stage("register", params, layout)
    reg = json.loads(layout.registration.read_text())
    tags = _client(layout).get_model_version(NAME, reg["version"]).tags
    lineage = {k.removeprefix("lineage."): v for k, v in tags.items()
               if k.startswith("lineage.")}
    assert lineage["git_commit"] == head  # the commit (not "-dirty": all was committed)
    assert lineage["dvc_lock_hash"] == lock_sha[:16]
    assert lineage["dvc_data_md5"] == data_md5.removesuffix(".dir")
    assert lineage["data_hash"] == validated and len(validated) == 32
    assert lineage["params_hash"] == hashlib.sha256(dump.encode()).hexdigest()[:16]
    assert lineage["split_fingerprint"] == json.loads(
        layout.validation.read_text())["split_scheme"]["fingerprint"]
    assert not any(v.lstrip().startswith(("{", "[")) for v in tags.values())  # no JSON


def test_pyfunc_from_bytes_equals_evaluate(registered: Layout):
    import mlflow
    import pandas as pd
    import torch

    _client(registered)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    files = split_images(registered)
    with registered.predictions.open() as f:
        expected = list(csv.DictReader(f))
    assert len(expected) == len(files)
    out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in files]}))
    assert list(out.columns) == ["label", "score", "topk"]
    assert out["label"].tolist() == [r["predicted"] for r in expected]
    for score, row in zip(out["score"], expected, strict=True):
        assert score == pytest.approx(float(row["confidence"]), abs=5.1e-5)
    top = json.loads(out["topk"][0])
    assert len(top) == 3 and top[0]["label"] == out["label"][0]  # evaluate.topk [1, 3]
    assert sum(t["probability"] for t in top) <= 1.0 + 1e-6
    # arrays (the uint8 test tensor, C×H×W) give the same answer as the encoded files
    cache = torch.load(registered.packed, weights_only=True)
    arrays = model.predict(pd.DataFrame({"image": list(cache["test_x"][:20].numpy())}))
    assert arrays["label"].tolist() == out["label"][:20].tolist()
    assert arrays["score"].to_numpy() == pytest.approx(out["score"][:20].to_numpy(), abs=1e-6)
    # per-call top-k
    two = model.predict(pd.DataFrame({"image": [files[0].read_bytes()]}), params={"topk": 2})
    assert len(json.loads(two["topk"][0])) == 2


_REGISTER = """
import sys, time
from pathlib import Path
from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.orchestration.stage_runner import run_stage
layout = Layout.at(sys.argv[1])
params = load_params(layout.params)
go = Path(sys.argv[2])
while not go.exists():  # start both registrations at the same moment
    time.sleep(0.05)
reg = run_stage("register", params, layout)
print("RESULT", reg.version, reg.decision.label)
"""


def test_two_concurrent_registrations_leave_one_champion(tmp_path: Path, tmp_path_factory,
                                                         digits_dir):
    from visionflow.mlops import registry, tracking

    src = trained_project(tmp_path_factory, digits_dir)
    store = tmp_path / "store"
    (store / "mlruns").mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlruns' / 'mlflow.db'}"
    a, b = fresh_copy(src, tmp_path / "a"), fresh_copy(src, tmp_path / "b")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"}
    env |= {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        tracking.setup(a)  # create the store once, before the race
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _REGISTER, str(p.root), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p in (a, b)]
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = sorted(line.split()[1:] for out, _ in outs for line in out.splitlines()
                     if line.startswith("RESULT"))
    # same model twice: the first is promoted (no champion yet), the second sees it and ties
    assert results == [["1", "promoted"], ["2", "rejected"]]

    client = registry.client_for(store)
    assert registry.alias_map(client, NAME) == {"champion": "1"}
    versions = registry.list_versions(client, NAME)
    assert [v.gate for v in versions] == ["rejected", "promoted"]
    assert versions[0].tags["gate_champion_version"] == "1"
    assert registry.lock_path(uri).name == ".mlflow.db.register.lock"


def test_the_pipeline_run_names_dvc_yamls_stages():
    from visionflow.core.configfile import parse_params
    from visionflow.mlops import tracking

    tags = tracking.pipeline_run_tags(parse_params({}), "ab" * 16, "cpu", 1)
    stages = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert tags["stages"] == " > ".join(stages), tags["stages"]
    assert f"visionflow pipeline run: {' > '.join(stages)}." in tags[tracking.NOTE]


def test_models_show_prints_the_cards_key_value_tables_as_lists(registered: Layout):
    """In a terminal, a header-less card table would be an empty header row and a rule."""
    from typer.testing import CliRunner

    from visionflow.cli.main import app

    res = CliRunner().invoke(app, ["models", "show", "1", "--root", str(registered.root)],
                             env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    card = res.output[res.output.index("visionflow-classifier v1: alexnet"):]
    assert "• architecture: alexnet" in card and "• data hash (dataset digest): " in card, card
    assert "| |" not in card and "|---" not in card, card
    assert "metric" in card and "0.9" in card  # the metrics table keeps its header


def test_the_model_name_comes_from_params_with_its_preset(tmp_path):
    """`vflow models` / `vflow predict`'s default name: register.model_name after the preset
    merge (`preset: shapes-unet` names the segmenter), else the default."""
    shutil.copytree(REPO / "presets", tmp_path / "presets")
    params = tmp_path / "params.yaml"
    assert registry.model_name_for(tmp_path) == NAME  # no params.yaml
    params.write_text("task: classification\n")
    assert registry.model_name_for(tmp_path) == NAME
    params.write_text("preset: shapes-unet\n")
    assert registry.model_name_for(tmp_path) == "visionflow-segmenter"
    params.write_text("preset: shapes-unet\nregister: {model_name: mine}\n")
    assert registry.model_name_for(tmp_path) == "visionflow-segmenter"  # the preset wins


def test_a_card_over_the_registry_limit_loses_its_params_then_lines():
    from visionflow.mlops.card import fit_description

    card = "# m v1\n\n## Model\nsmall\n\n## Params\n```yaml\n" + "a: 1\n" * 100 + "```\n"
    assert fit_description(card, "W", limit=10_000) == card  # it fits: as it is
    fitted = fit_description(card, "W", limit=200)
    assert fitted.startswith("# m v1\n\n## Model\nsmall\n") and "## Params" not in fitted
    assert fitted.endswith("the whole card is W.*\n") and len(fitted) <= 200
    seg = ("# s v1\n\n## Model\nsmall\n\n## Per-class IoU\n" + "| c | 0.5 | 0.6 |\n" * 100
           + "\n## Champion gate: PROMOTED\nok\n")  # a segmenter's card: no params section
    fitted = fit_description(seg, "W", limit=300)
    assert "## Per-class IoU" not in fitted and "## Champion gate: PROMOTED\nok\n" in fitted
    long = "# m v1\n" + "".join(f"row {i}\n" for i in range(100))
    cut = fit_description(long, "W", limit=300)
    assert len(cut) <= 300 and cut.startswith("# m v1\nrow 0\n")
    body = cut.split("\n*The card")[0]
    assert body.endswith("\n") and all(line.startswith(("# m", "row ")) or not line
                                       for line in body.splitlines())  # whole lines only

"""Drift against the champion: summaries, PSI / chi-square / pixel shift, and the champion's
summary fetched from MLflow by validate."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
from contextlib import suppress

import pytest
from builders import write_imagefolder
from helpers import make_project

from visionflow.core.configfile import load_params, parse_params
from visionflow.core.errors import ValidationFailed
from visionflow.core.layout import Layout
from visionflow.data import drift
from visionflow.mlops import lineage
from visionflow.orchestration.stage_runner import run_stage
from visionflow.stages.validate import print_report

CFG = parse_params({}).validate_


def _rows(counts: dict[str, int], mean: float = 0.45, std: float = 0.25, size: int = 32,
          seed: int = 0) -> list[dict]:
    """Manifest-like train rows with per-image channel means spread around `mean`."""
    rnd = random.Random(seed)
    rows = []
    for label, n in counts.items():
        for i in range(n):
            m = min(1.0, max(0.0, rnd.gauss(mean, 0.08)))
            s = max(0.0, rnd.gauss(std, 0.03))
            rows.append({"path": f"train/{label}/{i}.png", "split": "train", "label": label,
                         "quarantine_reason": "", "width": size, "height": size,
                         "mean": " ".join(f"{m:.4f}" for _ in range(3)),
                         "std": " ".join(f"{s:.4f}" for _ in range(3))})
    return rows


BALANCED = {c: 500 for c in "abcdefghij"}


def test_summary_contents():
    rows = _rows({"a": 3, "b": 1}, size=32) + [
        {"path": "test/a/x.png", "split": "test", "label": "a", "quarantine_reason": "",
         "width": 32, "height": 32, "mean": "0 0 0", "std": "0 0 0"},
        {"path": "train/a/bad.png", "split": "train", "label": "a",
         "quarantine_reason": "truncated", "width": "", "height": "", "mean": "", "std": ""},
    ]
    s = drift.summarize(rows)
    assert s["images"] == 4 and s["classes"] == {"a": 3, "b": 1}
    assert s["class_fractions"] == {"a": 0.75, "b": 0.25}
    assert s["pixel"]["channels"] == 3 and len(s["pixel"]["std"]) == 3
    assert s["size"]["buckets"] == {"32x32": 4} and s["size"]["width"]["median"] == 32
    json.dumps(s)  # JSON-able


def test_resample_of_the_same_data_is_not_drift():
    rows = _rows(BALANCED)
    reference = drift.summarize(rows)
    rnd = random.Random(1)
    for _ in range(5):
        resample = [rnd.choice(rows) for _ in range(len(rows))]  # bootstrap
        report = drift.compare(drift.summarize(resample), reference, CFG)
        assert report["status"] == "ok", report
        assert report["checks"]["class_mix"]["psi"] < 0.02
    half = drift.summarize(rnd.sample(rows, len(rows) // 2))  # a subsample: also the same
    assert drift.compare(half, reference, CFG)["status"] == "ok"


def test_shifted_class_mix_is_drift():
    reference = drift.summarize(_rows(BALANCED))
    shifted = {c: (100 if c in "abcde" else 500) for c in BALANCED}  # 80% fewer of half
    report = drift.compare(drift.summarize(_rows(shifted, seed=3)), reference, CFG)
    assert report["status"] == "drift" and report["drifted"] == ["class_mix"]
    mix = report["checks"]["class_mix"]
    assert mix["psi"] > CFG.drift_class_psi and mix["p_value"] < 1e-6
    assert "class-mix PSI" in drift.describe(report)
    missing = {c: n for c, n in BALANCED.items() if c != "j"}  # a class disappeared
    report = drift.compare(drift.summarize(_rows(missing)), reference, CFG)
    assert report["checks"]["class_mix"]["removed"] == ["j"] and report["status"] == "drift"


def test_pixel_and_size_shifts_are_drift():
    reference = drift.summarize(_rows(BALANCED))
    darker = drift.compare(drift.summarize(_rows(BALANCED, mean=0.30, seed=5)), reference, CFG)
    assert darker["drifted"] == ["pixel"] and darker["checks"]["pixel"]["max_shift"] > 0.1
    bigger = drift.compare(drift.summarize(_rows(BALANCED, size=64)), reference, CFG)
    assert bigger["drifted"] == ["size"]
    gray = drift.summarize(_rows(BALANCED))
    gray["pixel"] = {"channels": 1, "mean": [0.4], "std": [0.2]}
    assert drift.compare(gray, reference, CFG)["checks"]["pixel"]["drift"] is True
    loose = drift.compare(drift.summarize(_rows(BALANCED, mean=0.30, seed=5)), reference,
                          {"drift_pixel_shift": 0.5})
    assert loose["status"] == "ok"


def test_no_registry_means_no_mlflow_import(tmp_path):
    code = (
        "import sys\n"
        "from visionflow.mlops.lineage import champion_summary\n"
        "from visionflow.core.layout import Layout\n"
        f"print(champion_summary(Layout.at({str(tmp_path)!r}), 'm')[1]['status'],"
        " 'mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["no_registry", "False"]


# ---------------------------------------------------------------------------
# validate against a registered champion


def _register_champion(layout: Layout, summary: dict, name: str = "visionflow-classifier"):
    """A champion version whose run carries `summary` as data/data_summary.json."""
    import mlflow
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    tracking.setup(layout)
    with mlflow.start_run() as run:
        mlflow.log_dict(summary, "data/data_summary.json")
    client = MlflowClient()
    with suppress(Exception):  # already there
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model",
                                     run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", mv.version)
    return str(mv.version)


@pytest.fixture(scope="module")
def champion_project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift")
    data = write_imagefolder(tmp / "src", {"train/a": 30, "train/b": 30, "train/c": 30,
                                           "test/a": 3, "test/b": 3, "test/c": 3})
    project = make_project(tmp / "proj", data, {"data.val_fraction": 0.0}, mlflow_store=False)
    layout = Layout.at(project)
    result = run_stage("validate", load_params(layout.params), layout)
    assert result.summary["drift"]["status"] == "no_reference"
    assert result.summary["drift"]["champion"]["status"] == "no_registry"
    return layout, json.loads(layout.data_summary.read_text())


def test_drift_against_champion_warns_or_fails(champion_project):
    layout, summary = champion_project
    assert summary["images"] == 90 and summary["classes"] == {"a": 30, "b": 30, "c": 30}
    assert summary["data_hash"] == json.loads(layout.validation.read_text())["data_hash"]
    skewed = {**summary, "classes": {"a": 80, "b": 5, "c": 5}}  # the champion saw other data
    version = _register_champion(layout, skewed)

    warn = run_stage("validate", load_params(layout.params), layout).summary["drift"]
    assert warn["status"] == "drift" and warn["drifted"] == ["class_mix"]
    assert warn["champion"]["version"] == version
    assert warn["champion"]["artifact"] == "data/data_summary.json"
    stored = json.loads(layout.validation.read_text())["drift"]
    assert stored["checks"]["class_mix"]["psi"] > 0.2

    with pytest.raises(ValidationFailed) as err:
        run_stage("validate", load_params(layout.params, ["validate.drift=fail"]), layout)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"data drift against visionflow-classifier v{version} @champion: class-mix PSI" in msg

    # a class added since the champion, one it had that is gone: named in the table's row
    other = _register_champion(layout, {**summary, "classes": {"a": 30, "b": 30, "d": 30}})
    added = run_stage("validate", load_params(layout.params), layout).summary
    assert added["drift"]["champion"]["version"] == other
    table = io.StringIO()
    print_report(added, table)
    cells = " ".join(line.split("│")[1].strip() for line in table.getvalue().splitlines()
                     if line.count("│") > 2)  # the expectation column, rows unwrapped
    assert "class_mix (threshold 0.2); classes new since: c; gone: d" in cells, cells

    same = _register_champion(layout, summary)  # a champion trained on this very data
    ok = run_stage("validate", load_params(layout.params, ["validate.drift=fail"]), layout)
    assert ok.summary["drift"]["status"] == "ok" and ok.summary["drift"]["champion"][
        "version"] == same
    off = run_stage("validate", load_params(layout.params, ["validate.drift=off"]), layout)
    assert off.summary["drift"] == {"mode": "off", "status": "off"}


def test_champion_summary_falls_back_to_validation_json(champion_project):
    """Champions registered before data_summary.json existed carry validation.json."""
    import mlflow

    layout, summary = champion_project
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    tracking.setup(layout)
    with mlflow.start_run() as run:
        mlflow.log_dict({"success": True, "data_summary": summary}, "data/validation.json")
    client = MlflowClient()
    mv = client.create_model_version("visionflow-classifier",
                                     source=f"runs:/{run.info.run_id}/model",
                                     run_id=run.info.run_id)
    client.set_registered_model_alias("visionflow-classifier", "champion", mv.version)
    found, info = lineage.champion_summary(layout, "visionflow-classifier")
    assert info["status"] == "ok" and info["artifact"] == "data/validation.json"
    assert found["classes"] == summary["classes"]
    assert lineage.champion_summary(layout, "no-such-model")[1]["status"] == "no_champion"


def test_validation_artifacts_go_to_the_active_run(champion_project):
    import mlflow
    from mlflow import MlflowClient

    layout, _ = champion_project
    from visionflow.mlops import tracking

    tracking.setup(layout)
    with mlflow.start_run() as run:
        run_stage("validate", load_params(layout.params), layout)
    names = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "data")}
    assert {"data/validation.json", "data/data_summary.json", "data/quarantine.csv",
            "data/data_docs"} <= names
    docs = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "data/data_docs")}
    assert "data/data_docs/index.html" in docs
    assert [p for p, _ in layout.validation_artifacts()][-1] == layout.data_docs


def test_validate_says_in_words_why_drift_has_nothing_to_compare_with(tmp_path, capsys):
    """No registry, then a registry without a champion: each reason in words, no status code."""
    from mlflow_store import seed_store

    data = write_imagefolder(tmp_path / "src", {"train/a": 8, "train/b": 8, "test/a": 2,
                                                       "test/b": 2})
    layout = Layout.at(make_project(tmp_path / "proj", data, {"data.val_fraction": 0.0},
                                    mlflow_store=False))
    run_stage("validate", load_params(layout.params), layout)
    assert "drift: nothing to compare with (no model registry here yet: the first registered " \
           "model becomes it)" in capsys.readouterr().err
    seed_store(layout.root / "mlruns")
    run_stage("validate", load_params(layout.params), layout)
    err = capsys.readouterr().err
    assert "drift: nothing to compare with (no visionflow-classifier@champion yet)" in err, err

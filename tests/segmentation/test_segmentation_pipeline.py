"""`task: segmentation` through the six stages (#19), on the generated shapes set, by both
drivers: `dvc repro` in one git+DVC project, the Prefect flow in another, the same metrics;
the gate report, model card and `vflow models show` show mIoU; a worse second run (through
the flow, in this process) is refused by the gate; a champion of another task is a one-line
error. One trained project per driver, shared by the module's tests."""

from __future__ import annotations

import json
import runpy
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import BIN, make_project, prefect_settings, run
from seg_projects import MIN_MIOU, SEG, shapes

STAGES = ("validate", "pack", "train", "evaluate", "compress", "register")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drivers(tmp_path_factory, prefect_server) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("seg-pipeline")
    data = shapes(base / "shapes")
    dvc_root = make_project(base / "dvc", data, SEG, git=True)
    out = run([str(BIN / "dvc"), "repro"], dvc_root)
    ran = [s for s in STAGES if f"Running stage '{s}'" in out.stdout]
    assert ran == list(STAGES), out.stdout
    assert "WARNING" not in out.stderr, out.stderr  # e.g. an empty outputs/pack/shards

    flow_root = make_project(base / "flow", data, SEG, git=True)
    flow = runpy.run_path(str(flow_root / "flows" / "retrain.py"))
    with prefect_settings(prefect_server):
        result = flow["retrain"](root=str(flow_root))
    assert result["stages"] == dict.fromkeys(STAGES, "ran"), result
    return {"dvc": dvc_root, "flow": flow_root}


def _layout(root: Path):
    from visionflow.core.layout import Layout

    return Layout.at(root)


def _json(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def test_both_drivers_train_the_same_segmenter(drivers):
    dvc, flow = (_json(drivers[d], "outputs/evaluate/metrics.json") for d in ("dvc", "flow"))
    assert dvc["miou"] >= MIN_MIOU, dvc
    for key in ("miou", "pixel_accuracy", "mean_dice", "ece"):
        assert flow[key] == pytest.approx(dvc[key], abs=1e-6), key
    assert set(dvc["iou"]) == {"background", "circle", "rectangle", "triangle", "ellipse"}
    validation = _json(drivers["dvc"], "outputs/validate/validation.json")
    assert validation["task"] == "segmentation" and validation["success"]
    assert validation["layout"] == "images+masks" and validation["usable"] == 160
    assert any(e["expectation"] == "expect_column_values_to_be_in_set"
               and "same_size" not in e["description"] for e in validation["expectations"])
    summary = _json(drivers["dvc"], "outputs/validate/data_summary.json")
    assert summary["pixels"]["background"] > summary["pixels"]["circle"] > 0
    for name in ("per_class.png", "mistakes.png", "confusion.png", "reliability.png"):
        assert (drivers["dvc"] / "outputs/evaluate" / name).stat().st_size > 1000, name
    with (drivers["dvc"] / "outputs/evaluate/predictions.csv").open() as f:
        assert next(f).strip() == "path,mask,iou"
    for root in drivers.values():
        reg = _json(root, "outputs/register/registration.json")
        assert reg["version"] == "1" and reg["alias"] == "champion", reg
        assert reg["decision"]["metric"] == "mIoU", reg
        compress = _json(root, "outputs/compress/compress.json")
        assert compress["task"] == "segmentation" and compress["selected"]["name"] == "int8"
        assert compress["variants"]["int8"]["miou_drop_points"] <= 2.0, compress
        shown = _json(root, "outputs/compress/metrics.json")  # the DVC metric
        assert shown["recommended"]["name"] == "int8" and "miou" in shown["original"]
        assert reg["compact"]["variant"] == "int8" and reg["compact"]["alias"] == "compact"


def test_gate_report_card_and_models_show_give_miou(drivers):
    root = drivers["dvc"]
    report = (root / "outputs/register/gate_report.md").read_text()
    assert "mIoU" in report and "top-1" not in report
    assert "| majority | yes | pass | mIoU " in report  # above the commonest class everywhere
    card = (root / "outputs/register/model_card.md").read_text()
    assert "| miou |" in card and "Per-class IoU" in card and "segmentation" in card
    assert "| split scheme | by content hash, split_seed=0: test [0, 0.2), val [0.2, 0.3) |" in card
    shown = run([str(BIN / "vflow"), "models", "show", "1", "--name", "visionflow-segmenter",
                 "--root", str(root), "--no-card"], root).stdout
    assert "miou" in shown and "pixel_accuracy" in shown
    listed = run([str(BIN / "vflow"), "models", "list", "--name", "visionflow-segmenter",
                  "--root", str(root)], root).stdout
    assert "miou" in listed and "mean_dice" in listed and "top1" not in listed, listed
    as_json = json.loads(run([str(BIN / "vflow"), "models", "show", "1", "--name",
                              "visionflow-segmenter", "--root", str(root), "--json"],
                             root).stdout)
    assert as_json["tags"]["task"] == "segmentation" and as_json["metrics"]["miou"] >= MIN_MIOU
    from mlflow import MlflowClient  # the registered model's page says what its aliases mean

    from visionflow.mlops import tracking

    tracking.setup(_layout(root))
    about = MlflowClient().get_registered_model("visionflow-segmenter").description or ""
    assert about.startswith("Semantic segmenter") and "`compress.max_miou_drop`" in about, about


def test_the_run_page_names_the_segmenter_and_samples_the_machine(drivers):
    """The pipeline run opened by train: the task's model (not `train.model`, which
    segmentation ignores) in its tags and description, and MLflow's system metrics."""
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    layout = _layout(drivers["dvc"])
    tracking.setup(layout)
    run = MlflowClient().get_run(_json(drivers["dvc"], "outputs/train/run.json")["run_id"])
    tags = run.data.tags
    assert tags["task"] == "segmentation" and tags["model"] == "unet", tags
    assert run.info.run_name.startswith("unet-")
    assert "Trains `unet` (30 epochs)" in tags[tracking.NOTE], tags[tracking.NOTE]
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert run.data.params["segmentation.model"] == "unet"


def test_a_worse_second_run_is_refused(drivers, prefect_server):
    """One epoch instead of thirty, through the flow (in this process: no stage start-ups)."""
    root = drivers["flow"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["segmentation"]["epochs"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    flow = runpy.run_path(str(root / "flows" / "retrain.py"))
    with prefect_settings(prefect_server):
        result = flow["retrain"](root=str(root))
    # pack depends on the segmentation keys it reads, not on training's: nothing repacked
    assert result["stages"] == {"validate": "cached", "pack": "cached", "train": "ran",
                                "evaluate": "ran", "compress": "ran", "register": "ran"}, result
    reg = _json(root, "outputs/register/registration.json")
    assert reg["version"] == "3" and reg["alias"] is None, reg  # v2: v1's compact copy
    assert result["version"] == "3" and result["alias"] is None, result
    assert reg["decision"]["promote"] is False
    assert "kept champion v1" in reg["decision"]["reason"] and "mIoU" in reg["decision"]["reason"]
    report = (root / "outputs/register/gate_report.md").read_text()
    assert "REJECTED" in report and "wilcoxon" in report


def test_a_champion_of_another_task_is_a_one_line_error(drivers):
    root = drivers["flow"]
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    tracking.setup(_layout(root))
    MlflowClient().set_model_version_tag("visionflow-segmenter", "1", "task", "classification")
    proc = subprocess.run([str(BIN / "python"), "-m", "visionflow.stages.register"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: visionflow-segmenter v1 is a classification model; this "
                           "project's task is segmentation"), proc.stderr[-2000:]

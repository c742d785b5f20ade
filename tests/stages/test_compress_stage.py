"""The compress stage (#6) on a small trained model: every variant runs, reloads from disk
(`weights_only=True` or ONNX) and is scored; the choice respects the budget; the chosen
variant registers as the `compact` version (real MLflow sqlite store), and nothing is
registered when no variant fits.

Library-level properties are tested in `tests/test_compression.py` and not repeated here:
low-rank reconstruction error falling as rank rises (`test_lowrank_error_falls_with_rank`),
MAC / parameter counting, ONNX dynamic batch, the project's resnet18 structured-pruned
and reloaded by `load_pruned`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from visionflow.core.configfile import load_params
from visionflow.core.layout import Layout
from visionflow.mlops import registry
from visionflow.orchestration.stage_runner import run_stage

# A 'fast' model that learns digits in ~15 s on one core (~0.9 top-1), so agreement and
# accuracy checks mean something; the search is the wide one, kept cheap.
MODEL = {
    "train.epochs": 3,
    "train.threads": 1,
    "train.label_smoothing": 0.0,
    "augment.cutout": 0,
    "augment.translate": 0,
}
WIDE = {
    "compress.methods": ["int8", "prune", "structured", "lowrank", "distill", "pt2e"],
    "compress.max_top1_drop": 100.0,  # everything fits: every combination gets built
    "compress.structured_ratios": [0.3],
    "compress.lowrank_energies": [0.9],
    "compress.student_kwargs": {"widths": [16, 32, 32]},
    "compress.distill_epochs": 2,
    "compress.finetune_images": 256,
    "compress.finetune_lr": 0.002,
    "compress.calibration_images": 64,
    "compress.latency_batches": [1, 8],
    "compress.latency_reps": 3,
    "compress.latency_reps_large": 2,
    "compress.latency_warmup": 1,
    "compress.threads": 1,
}
VARIANTS = {"onnx_fp32", "int8", "prune", "structured30", "structured30+int8", "lowrank90",
            "lowrank90+int8", "student", "student+int8", "pt2e_int8"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dir) -> Layout:
    from helpers import make_project

    root = make_project(tmp_path_factory.mktemp("compress") / "proj", digits_dir, MODEL)
    layout = Layout.at(root)
    params = load_params(layout.params)
    for name in ("validate", "pack", "train"):
        run_stage(name, params, layout)
    return layout


@pytest.fixture(scope="module")
def wide(trained) -> tuple[Layout, dict]:
    params = load_params(trained.params, WIDE)
    return trained, run_stage("compress", params, trained)


def _test_split(layout: Layout):
    from visionflow.data.packed import load_packed

    cache = load_packed(layout.packed)
    return cache["test_x"], cache["test_y"]


def _top1(model, layout: Layout) -> float:
    from visionflow.model.inference import model_logits

    x, y = _test_split(layout)
    return float((model_logits(model, x).argmax(1) == y).float().mean())


def test_every_variant_runs_and_is_scored(wide):
    layout, report = wide
    assert set(report["variants"]) == VARIANTS
    n_test = len(_test_split(layout)[1])
    for name, v in report["variants"].items():
        assert v["n"] == n_test, name
        assert 0.0 <= v["top1"] <= v["top3"] <= 1.0, name
        assert v["top1_drop_points"] == pytest.approx(
            100 * (report["original"]["top1"] - v["top1"]), abs=1e-3)
        lat = v["latency"]["cpu"][v["runtime"]]
        assert set(lat) == {"b1", "b8"} and lat["b1"]["median_ms"] > 0, name
        assert lat["b1"]["threads"] == 1 and lat["b1"]["reps"] == 3
        assert v["cpu_b1_ms"] == lat["b1"]["median_ms"]
        assert "gpu" not in v["latency"] or torch.cuda.is_available()
    assert report["original"]["top1"] >= 0.8  # the model really learned
    assert report["environment"]["threads"] == 1
    assert report["skipped"] == []


def test_torch_variants_reload_with_weights_only(wide):
    from visionflow.compression.prune import load_pruned
    from visionflow.compression.structure import load_structured
    from visionflow.model.classifier import load_classifier

    layout, report = wide
    models = layout.compress_models
    loaders = {"prune": lambda p: load_classifier(p)[0], "structured30": load_pruned,
               "lowrank90": load_structured, "student": load_structured}
    for name, load in loaders.items():
        v = report["variants"][name]
        path = models / v["torch_file"]
        blob = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles
        assert set(blob) >= {"arch", "state_dict"}
        assert v["reload_ok"] is True
        # the reloaded network scores what the report says its torch form scored
        assert _top1(load(path), layout) == pytest.approx(v.get("top1_torch", v["top1"]),
                                                          abs=1e-6), name


def test_deployable_variants_are_onnx_and_agree_with_torch(wide):
    from visionflow.compression.onnx_export import OrtModule

    layout, report = wide
    deployable = {n for n, v in report["variants"].items() if v["deployable"]}
    assert deployable == VARIANTS - {"prune", "pt2e_int8"}
    for name in deployable:
        v = report["variants"][name]
        path = layout.compress_models / v["file"]
        assert path.suffix == ".onnx" and v["runtime"] == "onnx"
        assert _top1(OrtModule(path), layout) == pytest.approx(v["top1"], abs=1e-6), name
        if "onnx_agreement" in v:  # fp32 exports of torch variants: ORT == PyTorch
            assert v["onnx_agreement"] >= 0.99 and v["onnx_ok"], name
    import onnx

    ops = {n.op_type for n in onnx.load(str(layout.compress_models / "model_int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_quantized_variants_agree_with_fp32(wide):
    _, report = wide
    v = report["variants"]
    assert v["int8"]["agreement_with_fp32"] >= 0.95
    assert v["int8"]["size_ratio"] <= 0.3
    assert v["pt2e_int8"]["agreement_with_fp32"] >= 0.95
    for base in ("structured30", "lowrank90", "student"):  # int8 of each fp32 variant
        combo = v[f"{base}+int8"]
        # the student (2 epochs on 256 images) has small margins: a few more flips
        assert combo["agreement_with_base"] >= (0.9 if base == "student" else 0.95), base
        assert combo["recipe"][:-1] == v[base]["recipe"] and combo["recipe"][-1]["method"] == "int8"
        assert combo["size_bytes"] < v[base]["size_bytes"]
    assert v["structured30+int8"]["size_bytes"] < 0.3 * v["structured30"]["size_bytes"]


def test_pt2e_recipe_reloads_and_is_not_deployable(wide):
    from visionflow.compression.pt2e import load_recipe

    layout, report = wide
    v = report["variants"]["pt2e_int8"]
    assert not v["deployable"] and "not deployable" in v["notes"][0]
    graph = load_recipe(layout.compress_models / v["file"])  # weights_only inside
    x, y = _test_split(layout)
    with torch.no_grad():
        top1 = float((graph(x.float() / 255).argmax(1) == y).float().mean())
    assert top1 == pytest.approx(v["top1_reference_graph"], abs=1e-6)


def test_structured_pruning_cuts_macs_by_the_ratio(wide):
    _, report = wide
    v = report["variants"]["structured30"]
    assert v["expected_mac_ratio"] == pytest.approx(0.49)
    assert v["mac_ratio"] == pytest.approx(0.49, abs=0.06)
    assert v["param_ratio"] < 0.6 and v["size_ratio"] < 0.6
    assert [h["epoch"] for h in v["finetune"]] == [1]


def test_magnitude_pruning_reports_sparsity_and_no_gain(wide):
    _, report = wide
    v = report["variants"]["prune"]
    assert v["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert v["size_ratio"] == pytest.approx(1.0, abs=0.01) and v["mac_ratio"] == 1.0
    assert not v["deployable"] and "no speed-up" in " ".join(v["notes"])


def test_distillation_moves_the_student_toward_the_teacher(wide):
    _, report = wide
    v = report["variants"]["student"]
    assert v["kl_to_teacher_after"] < v["kl_to_teacher_before"]
    assert v["distill"][-1]["kl"] < v["distill"][0]["kl"]
    assert v["param_ratio"] < 0.1 and v["mac_ratio"] < 0.2


def test_lowrank_factorises_and_shrinks(wide):
    _, report = wide
    v = report["variants"]["lowrank90"]
    assert v["factorised_layers"] >= 1 and v["param_ratio"] < 1.0


def test_the_dvc_metric_is_the_choice_against_the_original_in_a_dozen_numbers(wide):
    layout, report = wide
    shown = json.loads(layout.compress_metrics.read_text())
    sel, orig = report["selected"], report["original"]
    assert shown["variants"] == len(report["variants"]) == len(VARIANTS)
    assert shown["recommended"] == {"name": sel["name"], **{
        k: sel[k] for k in ("top1", "top1_drop_points", "size_ratio", "mac_ratio", "cpu_b1_ms",
                            "speedup_b1_vs_fp32_eager")}}
    assert shown["original"] == {k: orig[k] for k in ("top1", "size_bytes", "macs",
                                                      "cpu_b1_ms")}


def test_with_no_variant_in_budget_the_metric_recommends_the_original_with_the_same_keys():
    from visionflow.stages.compress import dvc_metrics

    original = {"top1": 0.9, "top1_drop_points": 0.0, "size_ratio": 1.0, "mac_ratio": 1.0,
                "cpu_b1_ms": 5.0, "speedup_b1_vs_fp32_eager": 1.0, "size_bytes": 100,
                "macs": 10}
    int8 = {**original, "top1": 0.5, "top1_drop_points": 40.0, "size_ratio": 0.25}
    shown = dvc_metrics({"recommended": "original", "original": original,
                         "variants": {"int8": int8}}, "top1")
    assert shown["recommended"] == {"name": "original", "top1": 0.9, "top1_drop_points": 0.0,
                                    "size_ratio": 1.0, "mac_ratio": 1.0, "cpu_b1_ms": 5.0,
                                    "speedup_b1_vs_fp32_eager": 1.0}
    assert shown["variants"] == 1 and shown["original"]["size_bytes"] == 100


def test_pareto_table_plot_and_mlflow(wide):
    from mlflow import MlflowClient

    from visionflow.mlops import tracking

    layout, report = wide
    with layout.pareto_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows} == VARIANTS | {"original"}
    assert layout.pareto_png.read_bytes()[:4] == b"\x89PNG"
    assert [r["name"] for r in report["pareto"]] == [r["name"] for r in rows]
    assert any(r["pareto_size"] for r in report["pareto"])
    sel = report["selected"]
    assert sel is not None and sum(r["selected"] == "True" for r in rows) == 1

    tracking.setup(layout)
    run_id = json.loads(layout.run_info.read_text())["run_id"]
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run_id, "compress")}
    assert {"compress/compress.json", "compress/metrics.json", "compress/pareto.csv",
            "compress/pareto.png"} <= names
    run = client.get_run(run_id)
    assert run.data.tags["compress_selected"] == sel["name"]
    assert "variants/int8/top1" in run.data.metrics


def test_choice_respects_the_budget(wide):
    from visionflow.compression.pareto import choose

    _, report = wide
    rows, original = report["pareto"], report["original"]
    chosen = report["variants"][report["selected"]["name"]]
    assert chosen["deployable"] and chosen["candidate"]
    best = min((r for r in rows if r["candidate"] and r["deployable"]),
               key=lambda r: r["size_bytes"])
    assert chosen["size_bytes"] == best["size_bytes"]  # budget 100 points: the smallest wins
    drops = sorted({r["top1_drop_points"] for r in rows if r["candidate"] and r["deployable"]})
    for budget in [max(d, 0.0) for d in drops]:
        for objective in ("size", "macs", "cpu_latency"):
            name, _ = choose(rows, original, objective, budget)
            if name is not None:
                r = next(r for r in rows if r["name"] == name)
                assert r["top1_drop_points"] <= budget + 1e-9 and r["deployable"]
                fits = [x for x in rows if x["candidate"] and x["deployable"]
                        and x["top1_drop_points"] <= budget + 1e-9]
                key = {"size": "size_bytes", "macs": "macs", "cpu_latency": "cpu_b1_ms"}
                assert r[key[objective]] == min(x[key[objective]] for x in fits)
    name, reason = choose(rows, original, "size", min(drops) - 0.5)  # below every drop
    assert name is None and "over budget" in reason


def test_register_compact_registers_the_choice(wide):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from visionflow.mlops import tracking
    from visionflow.mlops.compact import register_compact

    layout, report = wide
    params = load_params(layout.params, WIDE)
    run_stage("evaluate", params, layout)
    parent = run_stage("register", params, layout)  # promoted: it registers the choice too
    assert parent.alias == "champion"
    out = parent.compact
    sel = report["selected"]
    assert out is not None and out["alias"] == "compact" and out["variant"] == sel["name"]
    assert out["version"] != parent.version and out["parent_version"] == parent.version
    assert json.loads(layout.registration.read_text())["compact"]["version"] == out["version"]

    tracking.setup(layout)
    client = MlflowClient()
    name = params.register_.model_name
    mv = client.get_model_version_by_alias(name, "compact")
    assert str(mv.version) == out["version"]
    tags = mv.tags
    assert tags["parent_version"] == parent.version and tags["compact_variant"] == sel["name"]
    assert tags["compact_recipe"] and not tags["compact_recipe"].startswith("[")
    # its own metrics, on its logged model (not its parent's, not a JSON tag)
    own = {m.key: m.value for m in client.get_logged_model(
        registry.model_id_of(mv)).metrics}
    assert own["test/top1"] == pytest.approx(sel["top1"], abs=1e-6)
    assert own["compact/size_bytes"] == sel["size_bytes"]
    assert "metrics" not in tags and "compact_metrics" not in tags
    assert not [k for k in own if k.startswith(("variants/", "curves/", "val/"))], own
    for section in ("## Data", "## Test metrics (this model's own)", "## Lineage", "## Gate",
                    f"{sel['top1']:.4f}", "@compact"):
        assert section in mv.description, section
    parent_mv = client.get_model_version(name, parent.version)
    theirs = {m.key: m.value for m in client.get_logged_model(
        registry.model_id_of(parent_mv)).metrics}
    assert theirs["test/top1"] == pytest.approx(
        json.loads(layout.metrics.read_text())["top1"], abs=1e-6)
    assert all(k.startswith("test/") for k in theirs), theirs  # the parent's own only
    listed = {i.version: i.metrics for i in registry.list_versions(client, name)}
    assert listed[out["version"]]["top1"] == pytest.approx(sel["top1"], abs=1e-6)
    assert listed[parent.version]["top1"] == pytest.approx(theirs["test/top1"])
    champ = client.get_model_version_by_alias(name, "champion")
    assert str(champ.version) == parent.version  # the compact version never takes champion

    model = mlflow.pyfunc.load_model(f"models:/{name}@compact")  # ONNX: nothing unpickled
    x, y = _test_split(layout)
    pred = model.predict(pd.DataFrame({"image": [img.numpy() for img in x]}))
    classes = model.unwrap_python_model().arch.classes
    acc = float((torch.tensor([classes.index(p) for p in pred["label"]]) == y).float().mean())
    assert acc == pytest.approx(sel["top1"], abs=0.01)

    # a parent that is not the champion: registered and tagged, alias left where it was
    other = register_compact(params, layout, "999")
    assert other is not None and other["alias"] is None
    assert str(client.get_model_version_by_alias(name, "compact").version) == out["version"]


def test_nothing_fits_nothing_registered(trained, tmp_path):
    import shutil

    from mlflow import MlflowClient

    from visionflow.mlops import tracking
    from visionflow.mlops.compact import register_compact

    trained = Layout.at(shutil.copytree(trained.root, tmp_path / "copy"))  # keep `wide` intact
    # unstructured pruning alone: never deployable, so no variant can be chosen
    params = load_params(trained.params, {**WIDE, "compress.methods": ["prune"],
                                          "compress.max_top1_drop": 1.0})
    report = run_stage("compress", params, trained)
    assert report["selected"] is None and report["recommended"] == "original"
    assert "no deployable variant" in report["selected_reason"]
    tracking.setup(trained)
    client = MlflowClient()
    name = params.register_.model_name
    before = client.search_model_versions(f"name='{name}'")
    assert register_compact(params, trained, "1") is None
    assert len(client.search_model_versions(f"name='{name}'")) == len(before)


def test_sweep_stops_at_first_miss_and_records_failures(trained, tmp_path, capsys):
    """The library without the stage: a family's stronger strengths are skipped after its
    first miss, and a method that fails is recorded (and printed), not raised."""
    from visionflow.compression.context import Context
    from visionflow.compression.sweep import build_variants
    from visionflow.data.packed import load_packed
    from visionflow.model.classifier import load_classifier

    params = load_params(trained.params, {
        **WIDE, "compress.methods": ["lowrank", "distill"], "compress.max_top1_drop": 0.0,
        "compress.lowrank_energies": [0.5, 0.3], "compress.finetune_epochs": 0,
        "compress.student_kwargs": {"no_such_argument": 1}})
    model, arch = load_classifier(trained.model)
    cache = load_packed(trained.packed)
    ctx = Context(model, arch, cache["train_x"], cache["train_y"], cache["test_x"],
                  cache["test_y"], cfg=params.compress, evaluate=params.evaluate,
                  seed=params.seed, device=torch.device("cpu"), out=tmp_path)
    sweep = build_variants(ctx, trained.model)
    # half the singular-value energy and no fine-tune: far over a budget of 0 points
    assert [v.name for v in sweep.variants] == ["original", "lowrank50"]
    assert sweep.variants[1].entry["top1_drop_points"] > 0
    assert sweep.skipped[0] == {"name": "lowrank@0.3",
                                "reason": "stop_at_first_miss: lowrank50 missed the budget"}
    assert sweep.skipped[1]["name"] == "distill@None"
    assert sweep.skipped[1]["reason"].startswith("failed: TypeError")
    assert "no_such_argument" in sweep.skipped[1]["reason"]
    assert "compress: distill@None failed: TypeError" in capsys.readouterr().out
    assert len(sweep.skipped) == 2
    assert {p.name for p in tmp_path.iterdir()} == {"lowrank50.pt", "lowrank50.onnx"}


def test_params_yaml_matches_the_config_defaults():
    from helpers import REPO

    from visionflow.core.config import CompressConfig
    from visionflow.core.configfile import parse_params, read_params_file

    assert parse_params(read_params_file(REPO / "params.yaml")).compress == CompressConfig()


def test_gpu_timing_code_path_on_cpu():
    """The stage's GPU timing (run only when CUDA is present), exercised with device='cpu'."""
    from visionflow.compression.latency import measure_gpu
    from visionflow.compression.variants import Variant
    from visionflow.core.config import CompressConfig

    cfg = CompressConfig(latency_batches=[1, 4], latency_reps=2, latency_reps_large=2,
                         latency_warmup=1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    variants = [Variant("a", "original", [], {}, model=net),
                Variant("b", "int8", [], {}, model=None)]  # ONNX-only: not timed on a GPU
    measure_gpu(variants, torch.rand(1, 3, 8, 8), cfg, device="cpu")
    gpu = variants[0].entry["latency"]["gpu"]["torch"]
    assert set(gpu) == {"b1", "b4"} and gpu["b1"]["median_ms"] > 0 and gpu["b4"]["reps"] == 2
    assert "latency" not in variants[1].entry


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_latency_is_measured(wide):
    _, report = wide
    for name in ("structured30", "lowrank90", "student"):
        gpu = report["variants"][name]["latency"]["gpu"]["torch"]
        assert gpu["b1"]["median_ms"] > 0 and gpu["b1"]["device"]


def test_register_compact_without_a_report(tmp_path: Path):
    from visionflow.core.config import Params
    from visionflow.mlops.compact import chosen_variant

    entry, why = chosen_variant(Params(), Layout.at(tmp_path))
    assert entry is None and why == "no compress report"

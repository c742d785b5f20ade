"""Register the compress stage's chosen variant as the `compact` version of the model.

`register_compact(params, layout, parent_version)` is called by the register stage after it
has registered the parent (the uncompressed model) as `parent_version`. It reads
`outputs/compress/compress.json`'s choice and, when a variant fits the budget, logs it as an
MLflow pyfunc "from code" (`publish.log_compact`: the variant's ONNX file run by ONNX
Runtime, same input/output contract as the main model, nothing unpickled), registers it as a
new version of the same registered model, tags it (`parent_version`, `compact_variant`,
`compact_recipe`, `compact_format`, `compact_runtime`, ...; its metrics are its logged
model's own) and points the alias `compact` at it.

Nothing is registered when no variant fits (the report selected none, or the budget in
`params` no longer admits the selection). With `require_champion_parent` (the default) the
alias moves only when the parent holds the champion alias, so `compact` is always a compressed
copy of the serving model; the version is still registered and tagged otherwise.

A segmentation model's report (`task: segmentation`, #19) is read the same way with its
metric, mIoU, and budget, `compress.max_miou_drop`; the variant is logged by
`publish_segmentation.log_compact_segmenter` (masks out) and tagged `task`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from visionflow.compression.pareto import recipe_text
from visionflow.core.config import Params
from visionflow.core.files import read_json
from visionflow.core.layout import Layout
from visionflow.mlops import registry, tracking
from visionflow.mlops.card import data_section, lineage_section, metrics_section, usage_section
from visionflow.mlops.provenance import LINEAGE, flat_tags, lineage, version_tags
from visionflow.mlops.publish import log_compact, log_model_metrics
from visionflow.mlops.publish_segmentation import TASK_TAG, log_compact_segmenter
from visionflow.model.classifier import load_classifier
from visionflow.model.segmentation import TASK, load_segmenter

ALIAS = registry.COMPACT


def chosen_variant(params: Params, layout: Layout) -> tuple[dict[str, Any] | None, str]:
    """(the selected variant's report entry, why) or (None, why not)."""
    if not layout.compress_report.is_file():
        return None, "no compress report"
    report = json.loads(layout.compress_report.read_text())
    sel = report.get("selected")
    if not sel:
        return None, report.get("selected_reason") or "no variant selected"
    entry = (report.get("variants") or {}).get(sel["name"])
    if entry is None:
        return None, f"selected variant {sel['name']!r} is missing from the report"
    task = report.get("task", "classification")
    metric, label = ("miou", "mIoU") if task == TASK else ("top1", "top-1")
    budget = getattr(params.compress, f"max_{metric}_drop")
    if not entry.get("deployable"):
        return None, f"{sel['name']} is not deployable"
    if entry[f"{metric}_drop_points"] > budget + 1e-9:
        return None, (f"{sel['name']} drops {entry[f'{metric}_drop_points']:.2f} {label} "
                      f"points, over compress.max_{metric}_drop={budget:g}")
    if not str(entry.get("file", "")).endswith(".onnx"):
        return None, f"{sel['name']} has no ONNX file to serve"
    path = layout.compress_models / entry["file"]
    if not path.is_file():
        return None, f"{path} is missing"
    return {**entry, "task": task, "metric": metric, "objective": report.get("objective"),
            "original": report.get("original") or {}, "path": str(path)}, "selected"


def register_compact(params: Params, layout: Layout, parent_version: str,
                     require_champion_parent: bool = True,
                     sample: tuple[str, str] | None = None) -> dict[str, Any] | None:
    """Register the chosen compressed variant; None (and nothing registered) when none fits.

    Call it outside any active MLflow run and outside `registry.registry_lock` (it opens the
    pipeline run and takes the lock itself). Returns `{model_name, version, alias, variant,
    parent_version, metrics, run_id, reason}`; `alias` is None when it was not moved.
    `sample`: (a test image's path, its class) for the card's usage example.
    """
    entry, why = chosen_variant(params, layout)
    if entry is None:
        print(f"compact: nothing registered ({why})")
        if require_champion_parent:  # the old champion's copy must not go on as @compact
            client = registry.client_for(layout)
            with registry.registry_lock(registry.tracking_uri(client)):
                champion = registry.current_alias(client, params.register_.model_name,
                                                  params.register_.alias)
                moved = champion == str(parent_version) and registry.follow_champion(
                    client, params.register_.model_name, champion, f"gate: {why}")
            if moved:
                print(f"compact: {moved}")
        return None
    name = params.register_.model_name
    segmentation = entry["task"] == TASK
    _, arch = (load_segmenter if segmentation else load_classifier)(layout.model)
    parent_version = str(parent_version)
    with tracking.stage_run(layout):
        version, alias, reason, run_id = _register(params, layout, entry, arch, parent_version,
                                                   require_champion_parent, sample)
        mlflow.set_tags({"compact_version": version, "compact_variant": entry["name"],
                         "compact_run": run_id})
    print(f"compact: {entry['name']} registered as {name} v{version}"
          + (f" @{alias}" if alias else f" ({reason})"))
    return {"model_name": name, "version": version, "alias": alias, "variant": entry["name"],
            "parent_version": parent_version, "metrics": _scalars(entry),
            "run_id": run_id, "reason": reason}


def _register(params: Params, layout: Layout, entry: dict[str, Any], arch: Any,
              parent_version: str, require_champion_parent: bool,
              sample: tuple[str, str] | None) -> tuple[str, str | None, str, str]:
    """In a child run of the pipeline run (so the compact model inherits none of the
    parent's metrics): log, register, tag, describe; move the alias. (version, alias,
    reason, child run id)."""
    name = params.register_.model_name
    validation = read_json(layout.validation, {}) or {}
    with mlflow.start_run(run_name=f"compact-{entry['name']}", nested=True,
                             tags={"kind": "compact", "parent_version": parent_version,
                                   tracking.NOTE: f"The compressed copy `{entry['name']}` of "
                                   f"v{parent_version}, logged in its own run so that its "
                                   "model carries only its own metrics."}) as run:
        uri = mlflow.get_tracking_uri()
        with registry.registry_lock(uri) as lock:
            client = registry.client_for(layout)
            log = log_compact_segmenter if entry.get("task") == TASK else log_compact
            info = log(Path(entry["path"]), arch, name, params)
            version = str(info.registered_model_version)
            log_model_metrics(_headline(entry), info.model_id, params, layout,
                              {f"compact/{k}": v for k, v in _scalars(entry).items()})
            try:
                parent_tags = client.get_model_version(name, parent_version).tags or {}
            except MlflowException:  # a parent unknown to this store: nothing to point at
                parent_tags = {}
            tags = {**version_tags(params, layout),
                    # the images it learnt from are its parent's: the same record
                    LINEAGE + "train_hashes": lineage(parent_tags, "train_hashes"),
                    **compact_tags(entry, parent_version, params)}
            champion = registry.current_alias(client, name, params.register_.alias)
            alias, reason = None, f"{entry['name']} fits the budget"
            if require_champion_parent and champion != parent_version:
                reason = (f"alias '{ALIAS}' not moved: parent v{parent_version} is not the "
                          f"'{params.register_.alias}' (v{champion or '-'})")
                tags["compact_alias"] = reason
            else:
                tags["compact_alias"] = f"set: {reason}"
            for k, v in flat_tags(tags).items():
                client.set_model_version_tag(name, version, k, v)
            client.update_model_version(name, version, description=compact_card(
                name, version, entry, tags, validation, params.data.source, run,
                parent_tags, sample))
            lock.check()
            if tags["compact_alias"].startswith("set:"):
                client.set_registered_model_alias(name, ALIAS, version)
                alias = ALIAS
    return version, alias, reason, run.info.run_id


SCALARS = ("top1", "top1_drop_points", "miou", "miou_drop_points", "size_bytes", "size_ratio",
           "params", "param_ratio",
           "macs", "mac_ratio", "cpu_b1_ms", "cpu_b32_ms", "speedup_b1_vs_fp32_eager",
           "gpu_b1_ms", "agreement_with_fp32", "pixel_agreement_with_fp32", "onnx_agreement")
HEADLINE = ("top1", "top3", "top5", "f1_macro", "f1_micro", "f1_weighted", "precision_macro",
            "recall_macro", "miou", "ece", "pixel_accuracy", "mean_dice")


def _headline(entry: dict[str, Any]) -> dict[str, float]:
    """The variant's own test metrics (the compress stage scored it on the test split)."""
    return {k: round(float(entry[k]), 6) for k in HEADLINE
            if isinstance(entry.get(k), int | float)}


def _scalars(entry: dict[str, Any]) -> dict[str, float]:
    return {k: entry[k] for k in SCALARS if isinstance(entry.get(k), int | float)}


def compact_tags(entry: dict[str, Any], parent_version: str, params: Params) -> dict[str, str]:
    """Flat, readable tags (its metrics are its logged model's; its recipe as text)."""
    original = entry.get("original") or {}
    metric = entry.get("metric", "top1")
    return {
        TASK_TAG: str(entry.get("task", "classification")),
        "parent_version": parent_version,
        "compact_variant": entry["name"],
        "compact_recipe": recipe_text(entry.get("recipe") or [])[:5000],
        "compact_format": str(entry.get("format", "")),
        "compact_runtime": str(entry.get("runtime", "")),
        "compact_objective": str(entry.get("objective", params.compress.objective)),
        f"compact_max_{metric}_drop": f"{getattr(params.compress, f'max_{metric}_drop'):g}",
        f"parent_{metric}": f"{float(original.get(metric, 0.0)):.6f}",
        "model": f"{params.train.model} ({entry['name']})",
    }


def compact_card(name: str, version: str, entry: dict[str, Any], tags: dict[str, str],
                 validation: dict[str, Any], source: str, run: Any,
                 parent_tags: dict[str, str], sample: tuple[str, str] | None) -> str:
    """The compact version's model card: the same sections as its parent's (data, test
    metrics, lineage, gate), plus the comparison with the parent."""
    o = entry.get("original") or {}
    metric = entry.get("metric", "top1")
    label = "mIoU" if metric == "miou" else "top-1"
    agreement = "pixel_agreement_with_fp32" if metric == "miou" else "agreement_with_fp32"

    def row(label: str, key: str, fmt: str = "{}") -> str:
        a, b = o.get(key), entry.get(key)
        show = [fmt.format(v) if isinstance(v, int | float) else "-" for v in (a, b)]
        return f"| {label} | {show[0]} | {show[1]} |"

    parent = tags["parent_version"]
    n_test = validation.get("counts", {}).get("test")
    n_test = sum(n_test.values()) if isinstance(n_test, dict) else "-"
    gate = parent_tags.get("gate_decision", "-")
    return "\n".join([
        f"# {name} v{version}: compact variant `{entry['name']}` of v{parent}",
        "",
        f"Recipe: `{recipe_text(entry.get('recipe') or [])}`; served as {entry.get('format')} "
        f"by {entry.get('runtime')} (ONNX Runtime, CPU).",
        f"Chosen by objective `{tags['compact_objective']}` within "
        f"{tags[f'compact_max_{metric}_drop']} {label} point(s) of the parent.",
        "",
        *data_section(tags, validation, source),
        *metrics_section(_headline(entry), n_test, "Test metrics (this model's own)",
                         [(f"{label} drop vs parent (points)",
                           f"{float(entry.get(f'{metric}_drop_points', 0)):+.2f}"),
                          ("agreement with the parent",
                           f"{float(entry.get(agreement, 0)):.2%}")]),
        "## Compared with the parent", "",
        f"| | parent v{parent} | compact v{version} |", "|---|---|---|",
        row(label, metric, "{:.4f}"),
        row("file bytes", "size_bytes", "{:,}"),
        row("parameters", "params", "{:,}"),
        row("MACs / image", "macs", "{:,}"),
        row("CPU ms, batch 1 (own runtime)", "cpu_b1_ms", "{:.3f}"),
        row("CPU ms, batch 32 (own runtime)", "cpu_b32_ms", "{:.3f}"),
        "",
        *lineage_section(tags, run.info.run_id, run.info.experiment_id),
        "## Gate",
        "",
        f"The compact copy is not gated itself: it follows its parent. Parent v{parent}: "
        f"**{gate}** ({parent_tags.get('gate_reason', 'no gate record')}).",
        "",
        f"Alias `{ALIAS}`: {tags.get('compact_alias', '-')}.",
        "",
        *usage_section(name, f"@{ALIAS}", sample),
    ]) + "\n"

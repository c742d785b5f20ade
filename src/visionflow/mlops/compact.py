"""Register the compress stage's chosen variant as the `compact` version of the model.

`register_compact(params, layout, parent_version)` is called by the register stage after it
has registered the parent (the uncompressed model) as `parent_version`. It reads
`outputs/compress/compress.json`'s choice and, when a variant fits the budget, logs it as an
MLflow pyfunc "from code" (`publish.log_compact`: the variant's ONNX file run by ONNX
Runtime, same input/output contract as the main model, nothing unpickled), registers it as a
new version of the same registered model, tags it (`parent_version`, `compact_variant`,
`compact_recipe`, `metrics`, `compact_metrics`, ...) and points the alias `compact` at it.

Nothing is registered when no variant fits (the report selected none, or the budget in
`params` no longer admits the selection). With `require_champion_parent` (the default) the
alias moves only when the parent holds the champion alias, so `compact` is always a compressed
copy of the serving model; the version is still registered and tagged otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from visionflow.compression.pareto import recipe_text
from visionflow.config import Params
from visionflow.layout import Layout
from visionflow.mlops import registry, tracking
from visionflow.mlops.provenance import version_tags
from visionflow.mlops.publish import log_compact
from visionflow.model.classifier import load_classifier

ALIAS = "compact"


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
    budget = params.compress.max_top1_drop
    if not entry.get("deployable"):
        return None, f"{sel['name']} is not deployable"
    if entry["top1_drop_points"] > budget + 1e-9:
        return None, (f"{sel['name']} drops {entry['top1_drop_points']:.2f} top-1 points, over "
                      f"compress.max_top1_drop={budget:g}")
    if not str(entry.get("file", "")).endswith(".onnx"):
        return None, f"{sel['name']} has no ONNX file to serve"
    path = layout.compress_models / entry["file"]
    if not path.is_file():
        return None, f"{path} is missing"
    return {**entry, "objective": report.get("objective"),
            "original": report.get("original") or {}, "path": str(path)}, "selected"


def register_compact(params: Params, layout: Layout, parent_version: str,
                     require_champion_parent: bool = True) -> dict[str, Any] | None:
    """Register the chosen compressed variant; None (and nothing registered) when none fits.

    Call it outside any active MLflow run and outside `registry.registry_lock` (it opens the
    pipeline run and takes the lock itself). Returns `{model_name, version, alias, variant,
    parent_version, metrics, reason}`; `alias` is None when it was not moved.
    """
    entry, why = chosen_variant(params, layout)
    if entry is None:
        print(f"compact: nothing registered ({why})")
        return None
    name = params.register_.model_name
    _, arch = load_classifier(layout.model)
    parent_version = str(parent_version)
    with tracking.stage_run(layout):
        uri = mlflow.get_tracking_uri()
        with registry.registry_lock(uri) as lock:
            client = registry.client_for(layout)
            info = log_compact(Path(entry["path"]), arch, name, params)
            version = str(info.registered_model_version)
            try:
                parent_tags = client.get_model_version(name, parent_version).tags or {}
            except MlflowException:  # a parent unknown to this store: nothing to point at
                parent_tags = {}
            tags = {**version_tags(params, layout), **compact_tags(entry, parent_version, params),
                    # the images it learnt from are its parent's: the same record
                    "train_hashes": parent_tags.get("train_hashes", "")}
            for k, v in tags.items():
                client.set_model_version_tag(name, version, k, v)
            client.update_model_version(name, version,
                                        description=compact_card(name, version, entry, tags))
            lock.check()
            champion = registry.current_alias(client, name, params.register_.alias)
            alias, reason = None, f"{entry['name']} fits the budget"
            if require_champion_parent and champion != parent_version:
                reason = (f"alias '{ALIAS}' not moved: parent v{parent_version} is not the "
                          f"'{params.register_.alias}' (v{champion or '-'})")
                client.set_model_version_tag(name, version, "compact_alias", reason)
            else:
                client.set_registered_model_alias(name, ALIAS, version)
                alias = ALIAS
                client.set_model_version_tag(name, version, "compact_alias", f"set: {reason}")
        mlflow.set_tags({"compact_version": version, "compact_variant": entry["name"]})
    print(f"compact: {entry['name']} registered as {name} v{version}"
          + (f" @{alias}" if alias else f" ({reason})"))
    return {"model_name": name, "version": version, "alias": alias, "variant": entry["name"],
            "parent_version": parent_version, "metrics": json.loads(tags["compact_metrics"]),
            "reason": reason}


SCALARS = ("top1", "top1_drop_points", "size_bytes", "size_ratio", "params", "param_ratio",
           "macs", "mac_ratio", "cpu_b1_ms", "cpu_b32_ms", "speedup_b1_vs_fp32_eager",
           "gpu_b1_ms", "agreement_with_fp32", "onnx_agreement")


def compact_tags(entry: dict[str, Any], parent_version: str, params: Params) -> dict[str, str]:
    headline = {k: round(float(v), 6) for k, v in entry.items()
                if k in ("top1", "top3", "top5", "f1_macro", "f1_micro", "f1_weighted",
                         "precision_macro", "recall_macro", "miou", "ece")
                and isinstance(v, int | float)}
    compact = {k: entry[k] for k in SCALARS if isinstance(entry.get(k), int | float)}
    original = entry.get("original") or {}
    return {
        "parent_version": parent_version,
        "compact_variant": entry["name"],
        "compact_recipe": json.dumps(entry.get("recipe") or [])[:5000],
        "compact_format": str(entry.get("format", "")),
        "compact_runtime": str(entry.get("runtime", "")),
        "compact_objective": str(entry.get("objective", params.compress.objective)),
        "compact_max_top1_drop": f"{params.compress.max_top1_drop:g}",
        "compact_metrics": json.dumps(compact),
        "metrics": json.dumps(headline),  # what `vflow models list/show` reads
        "top1": f"{entry['top1']:.6f}",
        "parent_top1": f"{float(original.get('top1', 0.0)):.6f}",
        "model": f"{params.train.model} ({entry['name']})",
    }


def compact_card(name: str, version: str, entry: dict[str, Any], tags: dict[str, str]) -> str:
    o = entry.get("original") or {}

    def row(label: str, key: str, fmt: str = "{}") -> str:
        a, b = o.get(key), entry.get(key)
        show = [fmt.format(v) if isinstance(v, int | float) else "-" for v in (a, b)]
        return f"| {label} | {show[0]} | {show[1]} |"

    return "\n".join([
        f"# {name} v{version}: compact variant `{entry['name']}` of v{tags['parent_version']}",
        "",
        f"Recipe: `{recipe_text(entry.get('recipe') or [])}`; served as {entry.get('format')} "
        f"by {entry.get('runtime')} (ONNX Runtime, CPU).",
        f"Chosen by objective `{tags['compact_objective']}` within "
        f"{tags['compact_max_top1_drop']} top-1 point(s) of the parent.",
        "",
        "| | parent | compact |", "|---|---|---|",
        row("top-1", "top1", "{:.4f}"),
        row("file bytes", "size_bytes", "{:,}"),
        row("parameters", "params", "{:,}"),
        row("MACs / image", "macs", "{:,}"),
        row("CPU ms, batch 1 (own runtime)", "cpu_b1_ms", "{:.3f}"),
        row("CPU ms, batch 32 (own runtime)", "cpu_b32_ms", "{:.3f}"),
        "",
        f"Top-1 drop {entry['top1_drop_points']:+.2f} points; predictions agree with the parent "
        f"on {float(entry.get('agreement_with_fp32', 0)):.2%} of the test images.",
        "",
        "```python",
        "import mlflow, pandas as pd",
        f'model = mlflow.pyfunc.load_model("models:/{name}@{ALIAS}")',
        'model.predict(pd.DataFrame({"image": [open("some.png", "rb").read()]}))',
        "```",
    ]) + "\n"

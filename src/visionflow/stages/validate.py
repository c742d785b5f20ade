"""Stage 1, validate: manifest the dataset and gate it with a Great Expectations suite.

Writes under `outputs/validate/`: `manifest.csv`, `quarantine.csv`, `validation.json`,
`data_summary.json` (what drift is measured on) and GX Data Docs (`data_docs/index.html`),
and prints a table: expectation, observed value, pass/fail, example files.

Unusable files are quarantined with a reason code (never moved or deleted). The stage fails
only when a hard expectation fails, when the quarantined fraction exceeds
`validate.max_quarantine_fraction`, or (with `validate.drift: fail`) when the data drifted
from the champion's; the one-line error says which.

Speed: manifest rows are cached per file (see `manifest.RowCache`), and the suite's results
and Data Docs are memoised in `.cache/validate/suite/` under a hash of everything they
depend on (manifest content, suite, labels, GX version, this file), so unchanged data
re-validates in seconds without importing GX.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visionflow.config import Params
from visionflow.data import drift
from visionflow.data.manifest import (
    build_manifest_ex,
    class_counts,
    data_hash,
    usable_rows,
    write_manifest,
)
from visionflow.errors import ValidationFailed, VisionflowError
from visionflow.files import atomic_dir, atomic_path, write_json
from visionflow.layout import Layout


@dataclass
class Check:
    """One expectation: GX class name, kwargs, which table it runs on, plain description.

    kind "hard": any failure fails the gate; "budget": the quarantine budget (fails the
    gate when more than `validate.max_quarantine_fraction` of the files are unusable)."""

    table: str
    expectation: str
    kwargs: dict[str, Any]
    description: str
    kind: str = "hard"


@dataclass
class ValidateResult:
    success: bool
    summary: dict[str, Any]


def build_checks(params: Params, labels: list[str]) -> list[Check]:
    v = params.validate_
    budget = v.max_quarantine_fraction
    return [
        Check("files", "ExpectColumnValuesToBeInSet",
              {"column": "quarantine_reason", "value_set": [""], "mostly": 1.0 - budget},
              f"usable files (not quarantined) are at least {1 - budget:.2%} of all files "
              f"(validate.max_quarantine_fraction={budget})", "budget"),
        Check("files", "ExpectColumnValuesToBeInSet",
              {"column": "decodable", "value_set": [True], "mostly": 1.0 - budget},
              f"at least {1 - budget:.2%} of files decode as images", "budget"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "label", "value_set": labels},
              "every image carries a known label" + (
                  " (validate.labels)" if v.labels else " (the class folders of train)")),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "width", "min_value": v.min_width, "max_value": v.max_width},
              f"image width within {v.min_width}..{v.max_width} px"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "height", "min_value": v.min_height, "max_value": v.max_height},
              f"image height within {v.min_height}..{v.max_height} px"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "mode", "value_set": v.allowed_modes},
              f"image modes in {v.allowed_modes}"),
        Check("images", "ExpectColumnValuesToBeBetween",
              {"column": "bytes", "max_value": v.max_bytes},
              f"file size at most {v.max_bytes} bytes"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "splits_sharing_file", "value_set": [1]},
              "no file (by sha256) appears in two splits"),
        Check("images", "ExpectColumnValuesToBeInSet",
              {"column": "duplicate_in_split", "value_set": [False],
               "mostly": 1.0 - v.max_duplicate_rate},
              f"duplicates within a split at most {v.max_duplicate_rate:.2%}"),
        Check("classes", "ExpectColumnMinToBeBetween",
              {"column": "train_count", "min_value": v.min_images_per_class},
              f"at least {v.min_images_per_class} training images per class"),
        Check("classes", "ExpectColumnValuesToBeInSet",
              {"column": "in_train", "value_set": [True]},
              "every val/test class also appears in train"),
        Check("classes", "ExpectColumnMaxToBeBetween",
              {"column": "imbalance_ratio", "max_value": v.max_imbalance_ratio},
              f"largest/smallest class ratio at most {v.max_imbalance_ratio}"),
    ]


def _tables(rows: list[dict[str, Any]], labels: list[str], empty_classes: list[str]):
    import pandas as pd

    files = pd.DataFrame(rows)
    files["decodable"] = files["decodable"].astype(bool)
    # "images": what training would use (quarantined files, leaked copies included, are out)
    images = files[(files["quarantine_reason"] == "") & files["decodable"]].copy()
    for col in ("width", "height", "bytes"):
        images[col] = pd.to_numeric(images[col])
    images["splits_sharing_file"] = images.groupby("sha256")["split"].transform("nunique")
    images["duplicate_in_split"] = images.duplicated(["split", "sha256"], keep="first")
    train = Counter(r["label"] for r in usable_rows(rows) if r["split"] == "train")
    all_labels = sorted({r["label"] for r in usable_rows(rows)} | set(labels)
                        | set(empty_classes))
    smallest = max(1, min((train[c] for c in all_labels), default=1))
    biggest = max((train[c] for c in all_labels), default=0)
    classes = pd.DataFrame([
        {"label": c, "train_count": train[c], "in_train": train[c] > 0,
         "imbalance_ratio": biggest / smallest}
        for c in all_labels
    ], columns=["label", "train_count", "in_train", "imbalance_ratio"])
    return {"files": files, "images": images, "classes": classes}


_JINJA_CACHE: Any = None


def _share_jinja_bytecode() -> None:
    """GX builds a fresh jinja Environment per rendered page and recompiles every
    template (~2/3 of a Data Docs build); share one in-memory bytecode cache instead."""
    global _JINJA_CACHE
    if _JINJA_CACHE is not None:
        return
    try:
        import jinja2
        from great_expectations.render.view import view as gx_view

        class _Memory(jinja2.BytecodeCache):
            def __init__(self) -> None:
                self.store: dict[str, bytes] = {}

            def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
                if bucket.key in self.store:
                    bucket.bytecode_from_string(self.store[bucket.key])

            def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
                self.store[bucket.key] = bucket.bytecode_to_string()

        cache = _Memory()
        original = gx_view.DefaultJinjaView.__init__

        def init(self, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            env = getattr(self, "env", None)
            if isinstance(env, jinja2.Environment) and env.bytecode_cache is None:
                env.bytecode_cache = cache

        gx_view.DefaultJinjaView.__init__ = init
        _JINJA_CACHE = cache
    except Exception:  # another GX/jinja layout: build docs the slow way
        _JINJA_CACHE = False


def run_gx(checks: list[Check], tables: dict[str, Any], docs_dir: Path | None) -> list[dict]:
    """Run the suite with a real GX ephemeral context; optionally build Data Docs."""
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = {"globally": False}
    if docs_dir is not None:
        _share_jinja_bytecode()
        ctx.add_data_docs_site(site_name="local", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = ctx.data_sources.add_pandas("visionflow")
    results = []
    for table, df in tables.items():
        table_checks = [c for c in checks if c.table == table]
        suite = ctx.suites.add(gx.ExpectationSuite(name=f"visionflow_{table}"))
        for c in table_checks:
            suite.add_expectation(getattr(gx.expectations, c.expectation)(
                **c.kwargs, description=c.description, meta={"kind": c.kind}))
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(
            gx.ValidationDefinition(name=table, data=batch, suite=suite))
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["local"])] \
            if docs_dir is not None else []
        cp = ctx.checkpoints.add(gx.Checkpoint(
            name=f"cp_{table}", validation_definitions=[vd], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5}))
        run = cp.run(batch_parameters={"dataframe": df})
        for vr in run.run_results.values():
            for r in vr.results:
                results.append(_result_row(table, r, df))
    by_key = {(c.table, c.kwargs.get("column"), c.description): c for c in checks}
    for r in results:
        check = by_key.get((r["table"], r["column"], r["description"]))
        r["kind"] = check.kind if check else "hard"
        if not r["success"] and not r["examples"] and check is not None:
            r["examples"] = _aggregate_examples(check, tables[check.table])
    return results


def _aggregate_examples(check: Check, df: Any) -> list[str]:
    """Examples for the per-class aggregate expectations (GX lists none for them)."""
    if check.table != "classes" or df.empty:
        return []
    if check.kwargs.get("column") == "train_count":
        low = df[df["train_count"] < check.kwargs["min_value"]].sort_values("train_count")
        return [str(v) for v in low["label"][:5]]
    if check.kwargs.get("column") == "imbalance_ratio":
        ordered = df.sort_values(["train_count", "label"])
        return [f"{ordered['label'].iloc[-1]} ({ordered['train_count'].iloc[-1]})",
                f"{ordered['label'].iloc[0]} ({ordered['train_count'].iloc[0]})"]
    return []


def _result_row(table: str, r: Any, df: Any) -> dict[str, Any]:
    cfg = r.expectation_config
    res = r.result or {}
    examples: list[str] = []
    idx = res.get("partial_unexpected_index_list") or []
    if idx and "path" in df.columns:
        examples = [str(df.loc[i, "path"]) if i in df.index else str(i) for i in idx[:5]]
    elif idx and "label" in df.columns:
        examples = [str(df.loc[i, "label"]) for i in idx[:5] if i in df.index]
    elif not examples:
        examples = [str(v) for v in (res.get("partial_unexpected_list") or [])[:5]]
    observed = res.get("observed_value", res.get("unexpected_percent"))
    if res.get("unexpected_percent") is not None:
        observed = f"{res['unexpected_count']} unexpected ({res['unexpected_percent']:.2f}%)"
    return {
        "table": table,
        "expectation": cfg.type,
        "column": cfg.kwargs.get("column"),
        "description": cfg.description,
        "success": bool(r.success),
        "observed": observed if observed is None or isinstance(observed, str | int | float)
        else str(observed),
        "examples": examples,
    }


def _suite_key(layout: Layout, checks: list[Check], labels: list[str],
               empty_classes: list[str]) -> str:
    """Hash of everything the suite's results and Data Docs depend on."""
    from importlib.metadata import version

    h = hashlib.sha256()
    with layout.manifest.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    h.update(json.dumps([[asdict(c) for c in checks], labels, empty_classes,
                         version("great_expectations")], sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def run_suite(checks: list[Check], rows: list[dict[str, Any]], labels: list[str],
              empty_classes: list[str], layout: Layout, memo: bool) -> tuple[list[dict], dict]:
    """Results of the suite and Data Docs in `layout.data_docs`, memoised when `memo`."""
    memo_dir = layout.suite_memo
    key = _suite_key(layout, checks, labels, empty_classes) if memo else ""
    if memo:
        try:
            if (memo_dir / "key").read_text() == key:
                results = json.loads((memo_dir / "results.json").read_text())
                with atomic_dir(layout.data_docs) as docs:
                    shutil.copytree(memo_dir / "data_docs", docs, dirs_exist_ok=True)
                return results, {"memo": "hit", "key": key[:16]}
        except (OSError, ValueError):
            pass  # no or broken memo: run GX
    tables = _tables(rows, labels, empty_classes)
    with atomic_dir(layout.data_docs) as docs:
        results = run_gx(checks, tables, docs)
    if memo:
        try:
            with atomic_dir(memo_dir) as tmp:
                shutil.copytree(layout.data_docs, tmp / "data_docs")
                (tmp / "results.json").write_text(json.dumps(results))
                (tmp / "key").write_text(key)  # last: a memo without key is ignored
        except OSError:
            pass
    return results, {"memo": "miss" if memo else "off", "key": key[:16]}


def _drift_report(params: Params, layout: Layout, current: dict[str, Any]) -> dict[str, Any]:
    mode = params.validate_.drift
    if mode == "off":
        return {"mode": "off", "status": "off"}
    reg = params.register_
    reference, info = drift.champion_summary(layout, reg.model_name, reg.alias)
    if reference is None:
        return {"mode": mode, "status": "no_reference", "champion": info}
    report = drift.compare(current, reference, params.validate_)
    return {"mode": mode, **report, "champion": info, "message": drift.describe(report)}


def run(params: Params, layout: Layout) -> ValidateResult:
    try:
        return _run(params, layout)
    except ValidationFailed:
        raise
    except VisionflowError as err:  # no stale "success" may survive a failed run
        write_json(layout.validation, {"success": False, "error": str(err),
                                       "source": params.data.source})
        raise


def _run(params: Params, layout: Layout) -> ValidateResult:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    root, rows, empty_classes, cache_stats = build_manifest_ex(params, layout)
    timings["manifest"] = time.perf_counter() - t0
    labels = params.validate_.labels or sorted(
        {r["label"] for r in usable_rows(rows) if r["split"] == "train"})
    checks = build_checks(params, labels)

    write_manifest(layout.manifest, rows)
    _write_quarantine(layout.quarantine, rows)
    dhash = data_hash(rows)
    data_summary = {**drift.summarize(rows), "data_hash": dhash, "source": params.data.source}
    write_json(layout.data_summary, data_summary)
    timings["write"] = time.perf_counter() - t0 - timings["manifest"]

    t = time.perf_counter()
    results, suite_info = run_suite(checks, rows, labels, empty_classes, layout,
                                    params.validate_.cache)
    timings["suite"] = time.perf_counter() - t
    t = time.perf_counter()
    drift_report = _drift_report(params, layout, data_summary)
    timings["drift"] = time.perf_counter() - t

    failed = [r for r in results if not r["success"]]
    hard = [r for r in failed if r.get("kind", "hard") == "hard"]
    budget_failed = [r for r in failed if r.get("kind") == "budget"]
    quarantined = Counter(r["quarantine_reason"] for r in rows if r["quarantine_reason"])
    n_quarantined = sum(quarantined.values())
    drift_failed = drift_report.get("mode") == "fail" and drift_report.get("status") == "drift"
    summary = {
        "success": not failed and not drift_failed,
        "dataset_root": str(root),
        "source": params.data.source,
        "data_hash": dhash,
        "classes": labels,
        "counts": class_counts(rows),
        "files": len(rows),
        "usable": len(usable_rows(rows)),
        "quarantined": dict(quarantined),
        "quarantine": {
            "files": n_quarantined,
            "fraction": round(n_quarantined / len(rows), 6) if rows else 0.0,
            "budget": params.validate_.max_quarantine_fraction,
            "exceeded": bool(budget_failed),
            "examples": _quarantine_examples(rows),
        },
        "empty_classes": empty_classes,
        "failed_expectations": [r["description"] for r in failed],
        "hard_failures": [r["description"] for r in hard],
        "expectations": results,
        "drift": drift_report,
        "data_summary": data_summary,
        "cache": {**{k: v for k, v in cache_stats.as_dict().items() if k != "timings"},
                  "suite": suite_info["memo"]},
        "timings": {**cache_stats.timings, **{k: round(v, 3) for k, v in timings.items()}},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(layout.validation, summary)
    print_report(summary)
    _log_to_active_run(layout)
    if not summary["success"]:
        raise ValidationFailed(failure_message(summary))
    return ValidateResult(True, summary)


def _quarantine_examples(rows: list[dict[str, Any]], per_reason: int = 3) -> dict[str, list]:
    out: dict[str, list[str]] = {}
    for r in rows:
        reason = r["quarantine_reason"]
        if reason and len(out.setdefault(reason, [])) < per_reason:
            out[reason].append(r["path"])
    return out


def failure_line(failed: list[dict[str, Any]]) -> str:
    parts = []
    for r in failed[:3]:
        ex = f" e.g. {', '.join(r['examples'][:3])}" if r["examples"] else ""
        parts.append(f"{r['expectation']}({r['column']}): {r['description']}: "
                     f"observed {r['observed']}{ex}")
    more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
    return f"{'; '.join(parts)}{more}"


def failure_message(summary: dict[str, Any]) -> str:
    """One line: which gate failed (quarantine budget, hard expectations, drift) and why."""
    parts = []
    q = summary["quarantine"]
    if q["exceeded"]:
        reasons = ", ".join(f"{k}: {', '.join(v)}" for k, v in q["examples"].items())
        parts.append(
            f"quarantine budget exceeded: {q['files']} of {summary['files']} files "
            f"({q['fraction']:.2%}) quarantined > validate.max_quarantine_fraction="
            f"{q['budget']} ({reasons}; see outputs/validate/quarantine.csv)")
    hard = [r for r in summary["expectations"]
            if not r["success"] and r.get("kind", "hard") == "hard"]
    if hard:
        parts.append(f"hard expectation failed: {failure_line(hard)}")
    d = summary.get("drift", {})
    if d.get("mode") == "fail" and d.get("status") == "drift":
        champ = d.get("champion", {})
        parts.append(f"data drift against {champ.get('model')} v{champ.get('version')} "
                     f"@{champ.get('alias')}: {d.get('message')} (validate.drift=fail)")
    return "data gate failed: " + "; ".join(parts)


def _cell(value: Any, width: int = 40) -> str:
    text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_report(summary: dict[str, Any], file: Any = None) -> None:
    """The console table: expectation, observed value, pass/fail, example files."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stderr, width=160)
    table = Table(title=f"data gate: {summary['source']} ({summary['files']} files, "
                        f"{summary['usable']} usable)", title_justify="left")
    table.add_column("expectation", overflow="fold", max_width=60)
    table.add_column("observed", max_width=32)
    table.add_column("result")
    table.add_column("examples", overflow="fold", max_width=50)
    for r in summary["expectations"]:
        if r["success"]:
            result = "[green]pass[/]"
        else:
            result = "[red]FAIL[/]" if r.get("kind", "hard") == "hard" else "[red]OVER BUDGET[/]"
        table.add_row(r["description"], _cell(r["observed"], 32), result,
                      ", ".join(r["examples"][:3]))
    d = summary.get("drift", {})
    if d.get("checks"):
        champ = d.get("champion", {})
        for name, c in d["checks"].items():
            value = c.get("psi", c.get("max_shift", c.get("note")))
            bad = "[red]FAIL[/]" if d["mode"] == "fail" else "[yellow]WARN[/]"
            table.add_row(f"drift vs {champ.get('model')} v{champ.get('version')}: {name} "
                          f"(threshold {c.get('threshold')})", _cell(value, 32),
                          bad if c["drift"] else "[green]pass[/]", "")
    console.print(table)
    q = summary["quarantine"]
    if q["files"]:
        console.print(f"quarantined {q['files']} file(s) ({q['fraction']:.2%}, budget "
                      f"{q['budget']:.2%}): " + ", ".join(
                          f"{k}={v}" for k, v in sorted(summary["quarantined"].items()))
                      + "  -> outputs/validate/quarantine.csv (files left in place)")
    if d.get("status") == "drift" and d.get("mode") == "warn":
        console.print(f"[yellow]warning: data drift against the champion: {d['message']}[/]")
    elif d.get("status") == "no_reference":
        console.print(f"drift: no reference ({d['champion'].get('status')})")


def _log_to_active_run(layout: Layout) -> None:
    mlflow = sys.modules.get("mlflow")  # not imported: no run can be active
    if mlflow is not None and mlflow.active_run() is not None:
        from visionflow.mlops.tracking import log_validation

        log_validation(layout)


def _write_quarantine(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "split", "label", "reason", "detail"])
        for r in rows:
            if r["quarantine_reason"]:
                w.writerow([r["path"], r["split"], r["label"], r["quarantine_reason"],
                            r["error"]])

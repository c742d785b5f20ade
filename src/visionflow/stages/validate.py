"""Stage 1, validate: manifest the dataset and gate it with a Great Expectations suite.

Writes under `outputs/validate/`: `manifest.csv`, `quarantine.csv`, `validation.json`,
`data_summary.json` (what drift is measured on) and GX Data Docs (`data_docs/index.html`),
and prints a table: expectation, observed value, pass/fail, example files.

Unusable files are quarantined with a reason code (never moved or deleted). The stage fails
only when a hard expectation fails, when the quarantined fraction exceeds
`validate.max_quarantine_fraction`, or (with `validate.drift: fail`) when the data drifted
from the champion's; the one-line error says which.

Speed: manifest rows are cached per file (see `data.survey.RowCache`), and the suite's
results and Data Docs are memoised (see `data.expectations`), so unchanged data re-validates
in seconds without importing GX.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionflow.core.config import Params
from visionflow.core.errors import ValidationFailed, VisionflowError
from visionflow.core.files import write_csv, write_json
from visionflow.core.layout import Layout
from visionflow.data import drift
from visionflow.data.expectations import build_checks, run_suite
from visionflow.data.manifest import (
    class_counts,
    data_hash,
    usable_rows,
    write_manifest,
)
from visionflow.data.quality_report import print_gate_table, split_rows, write_report
from visionflow.data.source import dvc_record
from visionflow.data.survey import survey_dataset
from visionflow.mlops.lineage import (
    champion_summary,
    no_summary_reason,
    split_against_champion,
)
from visionflow.mlops.tracking import log_validation
from visionflow.stages import main
from visionflow.tasks.segmentation import validate as segmentation

# task -> its own run (params.task; classification is this module's `run`)
TASKS = {"segmentation": segmentation.run}


@dataclass
class ValidateResult:
    success: bool
    summary: dict[str, Any]


def _drift_report(params: Params, layout: Layout, current: dict[str, Any]) -> dict[str, Any]:
    mode = params.validate_.drift
    if mode == "off":
        return {"mode": "off", "status": "off"}
    reg = params.register_
    reference, info = champion_summary(layout, reg.model_name, reg.alias)
    if reference is None:
        return {"mode": mode, "status": "no_reference", "champion": info}
    report = drift.compare(current, reference, params.validate_)
    return {"mode": mode, **report, "champion": info, "message": drift.describe(report)}


def run(params: Params, layout: Layout) -> ValidateResult:
    if params.task in TASKS:
        return TASKS[params.task](params, layout)
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
    found = survey_dataset(params, layout)
    root, rows, empty_classes, cache_stats = found.root, found.rows, found.empty, found.stats
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
    reg = params.register_
    split = split_against_champion(layout, found.scheme, reg.model_name, reg.alias)
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
        **dvc_record(params, layout),  # the .dvc file, its origin
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
        "ignored": found.ignored,
        "split_scheme": found.scheme,
        "split": split,
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
    write_report(summary, layout.data_docs)  # offline HTML + PNG for MLflow's viewer
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


def _class_changes(check: dict[str, Any]) -> str:
    """"; classes new since: x, y; gone: z" for the class-mix row (up to five names each)."""
    def names(key: str) -> str:
        found = check.get(key) or []
        return ", ".join(found[:5]) + (f" (+{len(found) - 5} more)" if len(found) > 5 else "")

    return "".join(f"; {label}: {names(key)}" for key, label in (
        ("added", "classes new since"), ("removed", "gone")) if check.get(key))


def print_report(summary: dict[str, Any], file: Any = None) -> None:
    """The console table: expectation, observed value, pass/fail, example files."""
    extra = []
    d = summary.get("drift", {})
    if d.get("checks"):
        champ = d.get("champion", {})
        for name, c in d["checks"].items():
            value = c.get("psi", c.get("max_shift", c.get("note")))
            bad = "[red]FAIL[/]" if d["mode"] == "fail" else "[yellow]WARN[/]"
            extra.append((f"drift vs {champ.get('model')} v{champ.get('version')}: {name} "
                          f"(threshold {c.get('threshold')}){_class_changes(c)}", value,
                          bad if c["drift"] else "[green]pass[/]"))
    split = summary.get("split") or {}
    extra += split_rows(split)
    console = print_gate_table(f"data gate: {summary['source']} ({summary['files']} files, "
                               f"{summary['usable']} usable)", summary["expectations"], extra,
                               file)
    q = summary["quarantine"]
    if q["files"]:
        console.print(f"quarantined {q['files']} file(s) ({q['fraction']:.2%}, budget "
                      f"{q['budget']:.2%}): " + ", ".join(
                          f"{k}={v}" for k, v in sorted(summary["quarantined"].items()))
                      + "  -> outputs/validate/quarantine.csv (files left in place)")
    if split.get("status") == "new_split":
        console.print(f"[yellow]{split['message']}[/]")
    if summary.get("ignored"):
        console.print(f"ignored (no images): {', '.join(summary['ignored'])}")
    if d.get("status") == "drift" and d.get("mode") == "warn":
        console.print(f"[yellow]warning: data drift against the champion: {d['message']}[/]")
    elif d.get("status") == "no_reference":
        console.print(f"drift: nothing to compare with ({no_summary_reason(d['champion'])})")


def _log_to_active_run(layout: Layout) -> None:
    mlflow = sys.modules.get("mlflow")  # not imported: no run can be active
    if mlflow is not None and mlflow.active_run() is not None:
        log_validation(layout)


def _write_quarantine(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv(path, ([r["path"], r["split"], r["label"], r["quarantine_reason"], r["error"]]
                     for r in rows if r["quarantine_reason"]),
              header=["path", "split", "label", "reason", "detail"])


if __name__ == "__main__":
    main("validate", run)

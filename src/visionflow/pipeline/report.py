"""The run summary the `retrain` flow publishes as Prefect artifacts (markdown, table, links).

Pure functions over a plain `report` dict the flow fills in as it goes, so the summary of a
skipped or failed run is built the same way as a full one.
"""

from __future__ import annotations

from typing import Any

# a compressed variant is "chosen" when it is the smallest within this top-1 drop
CHOICE_MAX_TOP1_DROP = 0.01
HEADLINE = ("top1", "top3", "top5", "f1_macro", "miou", "n_test")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if v is None:
        return ""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the table artifact: the scalar test metrics, then per-class IoU."""
    rows = [{"metric": k, "value": round(v, 6) if isinstance(v, float) else v}
            for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    iou = metrics.get("iou_per_class")
    if isinstance(iou, dict):
        rows += [{"metric": f"iou[{c}]", "value": round(float(v), 6)} for c, v in iou.items()]
    elif isinstance(iou, list):
        rows += [{"metric": f"iou[{i}]", "value": round(float(v), 6)} for i, v in enumerate(iou)]
    return rows


def compression_choice(report: dict[str, Any] | None) -> tuple[str, str]:
    """(variant, why): the report's own choice if it names one, else the smallest variant
    whose top-1 drop is at most CHOICE_MAX_TOP1_DROP, else the original."""
    if not report:
        return "", "compress did not run"
    for key in ("choice", "chosen", "selected", "recommended"):
        if report.get(key):
            choice = report[key]
            name = choice.get("name", str(choice)) if isinstance(choice, dict) else str(choice)
            return name, str(report.get(f"{key}_reason", "chosen by the compress stage"))
    ok = [(v.get("size_bytes", 0), name) for name, v in (report.get("variants") or {}).items()
          if (_drop_points(v) if _drop_points(v) is not None else 100) <= CHOICE_MAX_TOP1_DROP
          * 100 and v.get("size_bytes", 1 << 62) < report.get("original", {}).get(
              "size_bytes", 0)]
    if not ok:
        return "original", (f"no variant is smaller within {CHOICE_MAX_TOP1_DROP:.0%} top-1 "
                            "of the original")
    size, name = min(ok)
    v = report["variants"][name]
    return name, (f"smallest variant within {CHOICE_MAX_TOP1_DROP:.0%} top-1: "
                  f"{size / 1e6:.2f} MB ({v.get('size_ratio', 0):.2f}x), top-1 drop "
                  f"{_drop_points(v):+.2f} points")


def _drop_points(v: dict[str, Any]) -> float | None:
    """Top-1 drop against the original in points (reports carry points or a fraction)."""
    if v.get("top1_drop_points") is not None:
        return float(v["top1_drop_points"])
    if v.get("top1_drop") is not None:
        return float(v["top1_drop"]) * 100
    return None


def mlflow_links(ui_url: str, run: dict[str, Any] | None, model_name: str,
                 version: str | None) -> dict[str, str]:
    base = ui_url.rstrip("/")
    links = {}
    if run and run.get("run_id"):
        links["mlflow-run"] = (f"{base}/#/experiments/{run.get('experiment_id', '0')}"
                               f"/runs/{run['run_id']}")
    if version:
        links["model-version"] = f"{base}/#/models/{model_name}/versions/{version}"
    return links


def summary_markdown(r: dict[str, Any]) -> str:
    """The whole run on one page: headline, data, validation, metrics, gate, compression."""
    out = [f"# retrain: {r.get('headline', r.get('status', ''))}", ""]
    flags = [f"force={r.get('force', False)}", f"only_new_data={r.get('only_new_data', False)}"]
    out += [f"Run parameters: {', '.join(flags)}; root `{r.get('root', '')}`", ""]

    if r.get("error"):
        e = r["error"]
        out += ["## Failure", "",
                f"Stage **{e.get('stage', '?')}** failed: `{_fmt(e.get('message', ''))}`", "",
                "Nothing was registered and no alias moved.", ""]

    data = r.get("data") or {}
    out += ["## Data", ""]
    rows = [["source", f"`{data.get('source', '')}`"],
            ["data_hash (manifest)", f"`{data.get('data_hash', '') or 'not computed'}`"],
            ["dvc md5 (data.dvc)", f"`{data.get('dvc_md5', '') or '-'}`"],
            ["refresh", data.get("refresh", "not run")],
            ["new data?", data.get("decision", "")]]
    v = r.get("validation") or {}
    if v:
        rows += [["files / usable", f"{v.get('files', '?')} / {v.get('usable', '?')}"],
                 ["quarantined", ", ".join(f"{k}: {n}" for k, n in
                                           (v.get("quarantined") or {}).items()) or "none"],
                 ["classes", len(v.get("classes") or [])]]
        drift = v.get("drift")
        if isinstance(drift, dict) and drift.get("status"):
            msg = drift.get("message") or ""
            rows.append(["drift", f"{drift['status']}: {msg}" if msg else drift["status"]])
    out += [_table(["", ""], rows), ""]

    exps = v.get("expectations") or []
    if exps:
        out += ["## Validation", "",
                _table(["expectation", "column", "ok", "observed", "what it checks"],
                       [[e.get("expectation"), e.get("column") or "",
                         "yes" if e.get("success") else "**NO**", e.get("observed"),
                         e.get("description")] for e in exps]), ""]

    m = r.get("metrics") or {}
    if m:
        out += ["## Metrics (test split)", "",
                _table(["metric", "value"], [[k, m[k]] for k in HEADLINE if k in m]), ""]

    gate = r.get("gate") or {}
    if gate:
        out += ["## Gate", "",
                f"**{gate.get('decision', '')}**: {gate.get('reason', '')}", "",
                _table(["", ""], [["model version", f"{r.get('model_name', '')} "
                                   f"v{gate.get('version', '?')}"],
                                  ["champion before", gate.get("champion_before") or "none"],
                                  ["champion after", gate.get("champion_after") or "none"],
                                  ["test images", gate.get("test_images") or "-"]]),
                ""]

    comp = r.get("compress")
    if comp:
        choice, why = compression_choice(comp)
        orig = comp.get("original") or {}
        rows = [["original", orig.get("format") or orig.get("runtime", ""),
                 (orig.get("size_bytes") or 0) / 1e6, 1.0, orig.get("top1"), 0.0]]
        rows += [[name, x.get("format") or x.get("runtime", ""), (x.get("size_bytes") or 0)
                  / 1e6, x.get("size_ratio"), x.get("top1"), _drop_points(x)]
                 for name, x in (comp.get("variants") or {}).items()]
        compact = r.get("compact") or {}
        registered = (f"Registered as version {compact['version']}"
                      + (f" `@{compact['alias']}`" if compact.get("alias") else "")
                      if compact.get("version") else "Not registered as a `compact` version")
        out += ["## Compression", "", f"Choice: **{choice}** ({why}). {registered}.", "",
                _table(["variant", "format", "MB", "size ratio", "top-1", "top-1 drop (points)"],
                       rows), ""]

    links = r.get("links") or {}
    if links:
        out += ["## Links", ""] + [f"- [{k}]({u})" for k, u in links.items()] + [""]

    stages = r.get("stages") or []
    if stages:
        out += ["## Stages", "",
                _table(["stage", "state", "seconds"],
                       [[s["name"], s["state"], s.get("seconds")] for s in stages]), ""]
    return "\n".join(out)

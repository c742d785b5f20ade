"""The run summary the `retrain` flow publishes as Prefect artifacts (markdown, table, links).

Pure functions over a plain `report` dict the flow fills in as it goes, so the summary of a
skipped or failed run is built the same way as a full one.
"""

from __future__ import annotations

from typing import Any

# a compressed variant is "chosen" when it is the smallest within this top-1 drop
CHOICE_MAX_TOP1_DROP = 0.01
HEADLINE = ("top1", "top3", "top5", "f1_macro", "f1_weighted", "miou", "ece")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if v is None:
        return ""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _seconds(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f}"


def _short(v: Any, limit: int = 60) -> str:
    text = "" if v is None else str(v)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def metric_rows(metrics: dict[str, Any], champion: dict[str, Any] | None = None
                ) -> list[dict[str, Any]]:
    """Rows for the table artifact: the headline test metrics, this run's beside the
    champion's before the run (its own version's metrics) and the change."""
    theirs = (champion or {}).get("metrics") or {}
    who = f"champion v{champion['version']}" if champion and champion.get("version") else \
        "champion"
    rows = []
    for k in HEADLINE:
        v = metrics.get(k)
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        c = theirs.get(k)
        rows.append({"metric": k, "this run": round(float(v), 4),
                     who: "-" if c is None else round(float(c), 4),
                     "change": "-" if c is None else f"{float(v) - float(c):+.4f}"})
    return rows


def outcome_message(version: str, decision: dict[str, Any]) -> str:
    """One line naming the outcome: "promoted v3: top-1 0.9833 > 0.9750 (v2)" (the gate's
    metric: mIoU for a segmenter)."""
    metric = decision.get("metric", "top-1")  # the gate's scores sit in its *_top1 keys
    score = decision.get("challenger_top1")
    champ, champ_v = decision.get("champion_top1"), decision.get("champion_version")
    if decision.get("promote"):
        if champ is not None and score is not None:
            return f"promoted v{version}: {metric} {score:.4f} > {champ:.4f} (v{champ_v})"
        top = f"{metric} {score:.4f}, " if score is not None else ""
        return f"promoted v{version}: {top}{decision.get('reason', '')}"
    return f"rejected v{version}: {decision.get('reason', '')}"


def _scored_by(report: dict[str, Any]) -> tuple[str, str]:
    """(key, label) of the metric a compress report scores variants by."""
    return ("miou", "mIoU") if report.get("task") == "segmentation" else ("top1", "top-1")


def headline(version: str, label: str, alias: str | None, champion_before: str | None) -> str:
    """The summary's title line: "v3 promoted to @champion", "v4 rejected, champion v3 kept"."""
    if alias:
        return f"v{version} {label} to @{alias}"
    return f"v{version} {label}, " + (f"champion {champion_before} kept" if champion_before
                                      else "no champion yet")


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


def _drop_points(v: dict[str, Any], key: str = "top1") -> float | None:
    """The metric's drop against the original in points (reports carry points or a
    fraction)."""
    if v.get(f"{key}_drop_points") is not None:
        return float(v[f"{key}_drop_points"])
    if v.get(f"{key}_drop") is not None:
        return float(v[f"{key}_drop"]) * 100
    return None


def mlflow_links(ui_url: str, run: dict[str, Any] | None, model_name: str,
                 version: str | None, compact: str | None = None) -> dict[str, dict[str, str]]:
    """{artifact key: {url, text}}: each link says what it opens."""
    base = ui_url.rstrip("/")
    links: dict[str, dict[str, str]] = {}
    if run and run.get("run_id"):
        links["mlflow-run"] = {
            "url": f"{base}/#/experiments/{run.get('experiment_id', '0')}/runs/{run['run_id']}",
            "text": f"MLflow run {run['run_id'][:8]} (all six stages)"}
    if version:
        links["model-version"] = {"url": f"{base}/#/models/{model_name}/versions/{version}",
                                  "text": f"{model_name} v{version} (model card)"}
    if compact:
        links["compact-version"] = {"url": f"{base}/#/models/{model_name}/versions/{compact}",
                                    "text": f"{model_name} v{compact} @compact (model card)"}
    return links


def summary_markdown(r: dict[str, Any]) -> str:
    """The whole run on one page: headline, data, validation, metrics, gate, compression."""
    out = [f"# retrain: {r.get('headline', r.get('status', ''))}", ""]
    if (r.get("outcome") or {}).get("message"):
        out += [f"**Outcome:** {r['outcome']['message']}", ""]
    flags = [f"force={r.get('force', False)}", f"only_new_data={r.get('only_new_data', False)}"]
    out += [f"Run parameters: {', '.join(flags)}; root `{r.get('root', '')}`", ""]

    if r.get("error"):
        e = r["error"]
        out += ["## Failure", "",
                f"Stage **{e.get('stage', '?')}** failed: `{_fmt(e.get('message', ''))}`", "",
                "Nothing was registered and no alias moved.", ""]

    data = r.get("data") or {}
    out += ["## Data", ""]
    md5 = data.get("dvc_md5") or ""
    rows = [["source", f"`{data.get('source', '')}`"],
            ["data_hash (manifest)", f"`{data.get('data_hash', '') or 'not computed'}`"],
            [f"dvc md5 ({data.get('dvc_file') or 'data.dvc'})",
             f"`{md5}`" if md5 else data.get("dvc_note") or "-"],
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
    out += [_table(["data", "value"], rows), ""]

    champ = r.get("champion") or {}
    if champ:
        out += ["## Champion (unchanged)", "",
                _table(["champion", "value"],
                       [["version", f"{r.get('model_name', '')} v{champ.get('version')} "
                                    f"@{champ.get('alias', 'champion')}"],
                        ["data_hash", f"`{champ.get('data_hash') or '-'}`"],
                        ["gate", champ.get("gate") or "-"]]), ""]

    exps = v.get("expectations") or []
    if exps:
        out += ["## Validation", "",
                _table(["expectation", "column", "ok", "observed", "what it checks"],
                       [[e.get("expectation"), e.get("column") or "",
                         "yes" if e.get("success") else "**NO**", _short(e.get("observed")),
                         e.get("description")] for e in exps]), ""]

    m = r.get("metrics") or {}
    if m:
        rows = metric_rows(m, r.get("champion_metrics"))
        header = list(rows[0]) if rows else ["metric", "this run"]
        out += ["## Metrics (test split)", "",
                _table(header, [list(row.values()) for row in rows]), ""]

    gate = r.get("gate") or {}
    if gate:
        out += ["## Gate", "",
                f"**{gate.get('decision', '')}**: {gate.get('reason', '')}", "",
                _table(["gate", "value"], [["model version", f"{r.get('model_name', '')} "
                                   f"v{gate.get('version', '?')}"],
                                  ["champion before", gate.get("champion_before") or "none"],
                                  ["champion after", gate.get("champion_after") or "none"],
                                  ["test images", gate.get("test_images") or "-"]]),
                ""]

    comp = r.get("compress")
    if comp:
        choice, why = compression_choice(comp)
        orig = comp.get("original") or {}
        key, label = _scored_by(comp)
        rows = [["original", orig.get("format") or orig.get("runtime", ""),
                 (orig.get("size_bytes") or 0) / 1e6, 1.0, orig.get(key), 0.0]]
        rows += [[name, x.get("format") or x.get("runtime", ""), (x.get("size_bytes") or 0)
                  / 1e6, x.get("size_ratio"), x.get(key), _drop_points(x, key)]
                 for name, x in (comp.get("variants") or {}).items()]
        compact = r.get("compact") or {}
        registered = (f"Registered as version {compact['version']}"
                      + (f" `@{compact['alias']}`" if compact.get("alias") else "")
                      if compact.get("version") else "Not registered as a `compact` version")
        out += ["## Compression", "", f"Choice: **{choice}** ({why}). {registered}.", "",
                _table(["variant", "format", "MB", "size ratio", label, f"{label} drop (points)"],
                       rows), ""]

    links = r.get("links") or {}
    if links:
        out += ["## Links", ""] + [f"- [{link['text']}]({link['url']})"
                                   for link in links.values()] + [""]

    stages = r.get("stages") or []
    if stages:
        out += ["## Stages", "",
                _table(["stage", "state", "seconds"],
                       [[s["name"], s["state"], _seconds(s.get("seconds"))]
                        for s in stages]), ""]
    return "\n".join(out)

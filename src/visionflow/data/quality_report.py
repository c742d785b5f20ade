"""The data-quality report as MLflow's artifact viewer can show it: one self-contained HTML
file (inline CSS, the summary chart inline as a data URI, no script, no link to leave the
page) and the same summary as a PNG.

GX's own Data Docs pull their CSS and JS from CDNs and link page to page, which the artifact
viewer (offline, one file at a time) cannot follow: `offline_data_docs` drops those remote
tags from the GX pages and inlines a small stylesheet, so they read too.

`print_gate_table` is the same gate on the console (classification's and segmentation's).
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

from visionflow.core.files import write_text, write_with

HTML_NAME = "data_quality.html"
PNG_NAME = "data_quality.png"
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 8px}
.muted{color:#59636e}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
table{border-collapse:collapse;margin:6px 0;font-size:13px;max-width:100%}
td{overflow-wrap:anywhere}
th,td{border:1px solid #d1d9e0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #d1d9e0}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff}
.badge.ok{background:#1a7f37}.badge.bad{background:#cf222e}
"""
_REMOTE = re.compile(r"<(?:link|script)\b[^>]*(?:href|src)=[\"']?(?:https?:)?//[^>]*>"
                     r"(?:\s*</script>)?", re.IGNORECASE)


def _cell(value: Any, width: int = 40) -> str:
    """A console cell: floats to 4 significant digits, cut to `width` characters."""
    text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _gate_result(r: dict[str, Any]) -> str:
    """An expectation's verdict as rich markup (a failed budget check says so)."""
    if r["success"]:
        return "[green]pass[/]"
    return "[red]FAIL[/]" if r.get("kind", "hard") == "hard" else "[red]OVER BUDGET[/]"


def split_rows(split: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The gate table's row for validate's split comparison (none without one)."""
    if not split:
        return []
    verdict = {"same": "[green]same split[/]", "new_split": "[yellow]NEW SPLIT[/]"}.get(
        split.get("status"), "no reference")
    return [(f"splits: {split.get('scheme')}", split.get("fingerprint", ""), verdict)]


def print_gate_table(title: str, expectations: list[dict[str, Any]],
                     extra: list[tuple[str, str, str]] = (), file: Any = None) -> Any:
    """The console table (stderr): each expectation's description, observed value, verdict
    and up to three example files; `extra` rows (description, observed, verdict markup)
    after them. Returns the console, for the lines that follow."""
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stderr, width=160)
    table = Table(title=title, title_justify="left")
    table.add_column("expectation", overflow="fold", max_width=60)
    table.add_column("observed", max_width=32)
    table.add_column("result")
    table.add_column("examples", overflow="fold", max_width=50)
    for r in expectations:
        table.add_row(r["description"], _cell(r["observed"], 32), _gate_result(r),
                      ", ".join((r.get("examples") or [])[:3]))
    for description, observed, verdict in extra:
        table.add_row(description, _cell(observed, 32), verdict, "")
    console.print(table)
    return console


def summary_png(summary: dict[str, Any]) -> bytes:
    """Two panels: expectations passed/failed, images per class and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = summary.get("expectations") or []
    passed = sum(bool(e.get("success")) for e in exps)
    counts = summary.get("counts") or {}
    classes = list(summary.get("classes") or [])[:40]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1, 3]})
    a.bar(["passed", "failed"], [passed, len(exps) - passed], color=["#1a7f37", "#cf222e"])
    a.set_title(f"expectations ({len(exps)})")
    bottom = [0] * len(classes)
    for split, color in (("train", "#0969da"), ("val", "#8250df"), ("test", "#bf8700")):
        per = [int((counts.get(split) or {}).get(c, 0)) for c in classes]
        b.bar(range(len(classes)), per, bottom=bottom, label=split, color=color)
        bottom = [x + y for x, y in zip(bottom, per, strict=True)]
    b.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 12 else 0,
                 fontsize=8)
    b.set_title(f"usable images per class: {summary.get('usable', '?')} of "
                f"{summary.get('files', '?')} files")
    b.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def report_html(summary: dict[str, Any], png: bytes) -> str:
    exps = summary.get("expectations") or []
    ok = bool(summary.get("success"))
    counts = summary.get("counts") or {}
    splits = [s for s in ("train", "val", "test") if s in counts]
    rows = "".join(
        f"<tr><td>{_e(e.get('expectation'))}</td><td>{_e(e.get('column'))}</td>"
        f"<td class='{'ok' if e.get('success') else 'bad'}'>"
        f"{'pass' if e.get('success') else 'FAIL'}</td><td>{_e(e.get('observed'))}</td>"
        f"<td>{_e(e.get('description'))}</td>"
        f"<td>{_e(', '.join(map(str, (e.get('examples') or [])[:3])))}</td></tr>"
        for e in exps)
    class_rows = "".join(
        f"<tr><td>{_e(c)}</td>" + "".join(
            f"<td class='n'>{int((counts.get(s) or {}).get(c, 0))}</td>" for s in splits)
        + "</tr>" for c in summary.get("classes") or [])
    quarantined = ", ".join(f"{_e(k)}: {v}" for k, v in
                            (summary.get("quarantined") or {}).items()) or "none"
    img = base64.b64encode(png).decode()
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>data quality: {_e(summary.get('source'))}</title><style>{CSS}</style></head><body>
<h1>Data quality <span class="badge {'ok' if ok else 'bad'}">{'passed' if ok else 'failed'}
</span></h1>
<div class="muted">source <code>{_e(summary.get('source'))}</code> &middot; data hash
<code>{_e(summary.get('data_hash'))}</code> &middot; {_e(summary.get('usable'))} usable of
{_e(summary.get('files'))} files &middot; quarantined: {quarantined}</div>
<h2>Summary</h2><img alt="summary" src="data:image/png;base64,{img}">
<h2>Expectations (Great Expectations)</h2>
<table><tr><th>expectation</th><th>column</th><th>result</th><th>observed</th>
<th>what it checks</th><th>examples</th></tr>{rows}</table>
<h2>Images per class and split</h2>
<table><tr><th>class</th>{''.join(f'<th>{s}</th>' for s in splits)}</tr>{class_rows}</table>
</body></html>
"""


def write_report(summary: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """`data_quality.html` and `data_quality.png` in `folder`; GX's pages made offline."""
    png = summary_png(summary)
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / PNG_NAME, lambda p: p.write_bytes(png))
    write_text(folder / HTML_NAME, report_html(summary, png))
    offline_data_docs(folder)
    return folder / HTML_NAME, folder / PNG_NAME


def offline_data_docs(folder: Path) -> int:
    """Drop the CDN stylesheets and scripts from GX's pages and inline CSS; returns how
    many pages changed."""
    changed = 0
    for page in folder.rglob("*.html"):
        if page.name == HTML_NAME:
            continue
        text = page.read_text(encoding="utf-8", errors="replace")
        new = _REMOTE.sub("", text)
        if "</head>" in new and f"<style>{CSS}" not in new:
            new = new.replace("</head>", f"<style>{CSS}</style></head>", 1)
        if new != text:
            write_text(page, new)
            changed += 1
    return changed

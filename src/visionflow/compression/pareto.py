"""The automatic choice: objective values, the Pareto front, the pick under an accuracy budget,
and the Pareto table (CSV) and plot (PNG) the compress stage writes.

Rows are the compress report's entries (plain dicts): `top1` (fraction), `top1_drop_points`,
`size_bytes`, `macs`, `cpu_b1_ms` (batch-1 median of the runtime the row deploys with),
`deployable`, `candidate` (False for the original and reference rows).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from visionflow.core import files

OBJECTIVES = {"size": "size_bytes", "macs": "macs", "cpu_latency": "cpu_b1_ms"}
UNITS = {"size": "bytes on disk", "macs": "MACs per image", "cpu_latency": "CPU batch-1 ms"}

TABLE_COLUMNS = (
    "name", "family", "recipe", "format", "runtime", "deployable", "candidate", "top1",
    "top1_drop_points", "size_bytes", "size_ratio", "params", "macs", "mac_ratio", "cpu_b1_ms",
    "cpu_b32_ms", "speedup_b1_vs_fp32_eager", "gpu_b1_ms", "agreement_with_fp32",
    "onnx_agreement", "in_budget", "pareto_size", "pareto_macs", "pareto_cpu_latency",
    "selected",
)


def objective_value(row: dict[str, Any], objective: str) -> float | None:
    value = row.get(OBJECTIVES[objective])
    return None if value is None else float(value)


def pareto_flags(rows: list[dict[str, Any]], objective: str) -> list[bool]:
    """For each row: no other row is at least as good on both top-1 (higher) and the
    objective (lower) and strictly better on one. Rows without the value are never on it."""
    points = [(objective_value(r, objective), r.get("top1")) for r in rows]
    flags = []
    for i, (cost, acc) in enumerate(points):
        if cost is None or acc is None:
            flags.append(False)
            continue
        dominated = any(
            c is not None and a is not None and c <= cost and a >= acc and (c < cost or a > acc)
            for j, (c, a) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def choose(
    rows: list[dict[str, Any]], original: dict[str, Any], objective: str, max_drop_points: float
) -> tuple[str | None, str]:
    """The best deployable candidate within the budget: lowest objective value, then highest
    top-1, then smallest file. It must improve on the original's objective value.
    Returns (name or None, reason)."""
    key = OBJECTIVES[objective]
    ref = objective_value(original, objective)
    fits, over, no_gain = [], [], []
    for r in rows:
        if not r.get("candidate") or not r.get("deployable"):
            continue
        value = objective_value(r, objective)
        if value is None:
            continue
        if r["top1_drop_points"] > max_drop_points + 1e-9:
            over.append(r["name"])
        elif ref is not None and value >= ref:
            no_gain.append(r["name"])
        else:
            fits.append(r)
    if not fits:
        why = [f"no deployable variant within {max_drop_points:g} top-1 point(s) improves "
               f"{UNITS[objective]} on the original"]
        if over:
            why.append(f"over budget: {', '.join(over)}")
        if no_gain:
            why.append(f"no gain: {', '.join(no_gain)}")
        return None, "; ".join(why)
    best = min(fits, key=lambda r: (objective_value(r, objective), -r["top1"],
                                    r.get("size_bytes") or math.inf))
    ratio = objective_value(best, objective) / ref if ref else float("nan")
    return best["name"], (
        f"lowest {UNITS[objective]} ({key} {objective_value(best, objective):.4g}, "
        f"{ratio:.3f}x the original) among {len(fits)} deployable variant(s) within "
        f"{max_drop_points:g} top-1 point(s): top-1 {best['top1']:.4f}, drop "
        f"{best['top1_drop_points']:+.2f} pt")


def mark(rows: list[dict[str, Any]], max_drop_points: float, selected: str | None) -> None:
    """Fill `in_budget`, `pareto_<objective>` and `selected` on every row (in place)."""
    for objective in OBJECTIVES:
        for row, flag in zip(rows, pareto_flags(rows, objective), strict=True):
            row[f"pareto_{objective}"] = flag
    for row in rows:
        drop = row.get("top1_drop_points")
        row["in_budget"] = drop is not None and drop <= max_drop_points + 1e-9
        row["selected"] = row["name"] == selected


def recipe_text(recipe: list[dict[str, Any]]) -> str:
    """`structured(ratio=0.5,steps=1,finetune_epochs=1) -> int8(...)`, for tables."""
    parts = []
    for step in recipe:
        args = ",".join(f"{k}={v}" for k, v in step.items() if k != "method")
        parts.append(f"{step['method']}({args})")
    return " -> ".join(parts) or "-"


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row = {c: r.get(c) for c in TABLE_COLUMNS}
        row["recipe"] = recipe_text(r.get("recipe") or [])
        out.append(row)
    return out


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """The Pareto table (`TABLE_COLUMNS`, floats to 6 places, None empty), atomically."""
    table = [{k: _cell(v) for k, v in row.items()} for row in table_rows(rows)]
    files.write_csv(path, table, header=TABLE_COLUMNS)


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6)
    return "" if v is None else v


def plot(path: str | Path, rows: list[dict[str, Any]], base_top1: float,
         max_drop_points: float, selected: str | None) -> None:
    """Two panels: top-1 against file size and against CPU batch-1 latency (log x), with
    the Pareto front, the budget line and the selected variant circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("size", "size_bytes", 1e-6, "file size (MB, log)"),
              ("cpu_latency", "cpu_b1_ms", 1.0, "CPU latency, batch 1 (ms, log)"))
    families = sorted({r.get("family", "") for r in rows})
    colors = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    for ax, (objective, key, scale, label) in zip(axes, panels, strict=True):
        pts = [r for r in rows if r.get(key) is not None and r.get("top1") is not None]
        for r in pts:
            x, y = r[key] * scale, r["top1"] * 100
            marker = "o" if r.get("deployable") or r.get("family") == "original" else "x"
            ax.scatter(x, y, color=colors[r.get("family", "")], marker=marker, s=36, zorder=3)
            ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
            if r["name"] == selected:
                ax.scatter(x, y, s=220, facecolors="none", edgecolors="red", linewidths=1.5,
                           zorder=4)
        front = sorted((r for r in pts if r.get(f"pareto_{objective}")), key=lambda r: r[key])
        if front:
            ax.step([r[key] * scale for r in front], [r["top1"] * 100 for r in front],
                    where="post", color="gray", lw=1, zorder=2, label="Pareto front")
        ax.axhline(base_top1 * 100 - max_drop_points, color="red", ls="--", lw=1,
                   label=f"budget: -{max_drop_points:g} pt")
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], color=colors[f], marker="o", ls="", label=f) for f in families]
    axes[0].legend(handles=handles + axes[0].get_legend_handles_labels()[0], fontsize=7,
                   loc="lower right")
    fig.suptitle("compress: accuracy vs size and latency (x = not deployable, red = selected)")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

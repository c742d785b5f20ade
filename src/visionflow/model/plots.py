"""Evaluation plots as PNG (matplotlib, Agg): confusion, reliability, per-class bars and the
most confident mistakes. DVC renders the CSVs too, but its HTML needs a CDN; these do not."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from visionflow.core.files import atomic_path
from visionflow.model.metrics import PER_CLASS, confident_mistakes

# Figures stay this size whatever the number of classes (a side grown with the classes made a
# 300-class confusion 15,200 px square: 131 s and 9.6 GB; BENCHMARKS, "Evaluation plots").
MAX_SIDE_IN = 12.0  # inches, at 100 dpi
MAX_NAMED = 40  # classes named on an axis; past it the bars show the lowest F1 of them


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def confusion_values(matrix: list[list[int]], normalize: bool = False):
    """The matrix as floats, or (normalize) each row divided by its total: recall on the
    diagonal; a row without test images stays zeros."""
    import numpy as np

    values = np.asarray(matrix, dtype=np.float64)
    return values / np.maximum(values.sum(axis=1, keepdims=True), 1) if normalize else values


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str],
                   normalize: bool = False) -> None:
    plt = _pyplot()
    n = len(classes)
    values = confusion_values(matrix, normalize)
    side = min(MAX_SIDE_IN, max(4, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None,
                   interpolation="nearest" if n <= 2 * MAX_NAMED else "antialiased")
    if n <= MAX_NAMED:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7 if n > 20 else None)
        ax.set_yticks(range(n), classes, fontsize=7 if n > 20 else None)
    where = "" if n <= MAX_NAMED else " (class index: names in confusion.csv)"
    ax.set_xlabel("predicted" + where)
    ax.set_ylabel("actual" + where)
    if n <= 20:
        peak = float(values.max(initial=0)) or 1
        for i, row in enumerate(values.tolist()):
            for j, v in enumerate(row):
                text = f"{v:.2f}" if normalize else str(int(v))
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if v > peak / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion matrix, normalised by row (test)" if normalize
                 else "confusion matrix (test)")
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(path: Path, bins: list[dict[str, float]], ece: float) -> None:
    plt = _pyplot()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    filled = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width,
           align="edge", edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
    ax.plot([(b["lower"] + b["upper"]) / 2 for b in filled], [b["confidence"] for b in filled],
            "o", color="tab:red", label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability diagram (test), ECE {ece:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    hx.bar([b["lower"] for b in bins], [b["count"] for b in bins], width=width, align="edge",
           color="grey", edgecolor="black")
    hx.set_xlabel("confidence (max softmax)")
    hx.set_ylabel("images")
    hx.set_xlim(0, 1)
    fig.tight_layout()
    _save(fig, path)


def lowest(rows: list[dict[str, Any]], metric: str, limit: int = MAX_NAMED,
           ) -> list[dict[str, Any]]:
    """The rows a per-class bar plot shows: all of them, or the `limit` with the lowest
    `metric` (a class without it, absent from the test set, last)."""
    if len(rows) <= limit:
        return rows
    return sorted(rows, key=lambda r: (r[metric] is None, r[metric] or 0.0,
                                       str(r["class"])))[:limit]


def plot_per_class(path: Path, rows: list[dict[str, Any]]) -> list[str]:
    import numpy as np

    plt = _pyplot()
    every = len(rows)
    rows = lowest(rows, "f1")
    n = len(rows)
    fig, ax = plt.subplots(figsize=(min(2 * MAX_SIDE_IN, max(6, 0.6 * n + 2)), 4))
    x = np.arange(n)
    w = 0.8 / len(PER_CLASS)
    for i, m in enumerate(PER_CLASS):
        ax.bar(x + (i - 1.5) * w, [np.nan if r[m] is None else r[m] for r in rows], width=w,
               label=m)
    ax.set_xticks(x, [r["class"] for r in rows], rotation=90 if n > 20 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("per-class precision, recall, F1 and IoU (test)" if n == every else
                 f"the {n} classes of {every} with the lowest F1 (test; all in per_class.csv)")
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return [str(r["class"]) for r in rows]  # the classes it shows


def plot_mistakes(path: Path, x_uint8: torch.Tensor, target, pred, conf, classes: list[str],
                  paths: list[str] | None, limit: int = 16) -> None:
    plt = _pyplot()
    idx = confident_mistakes(target, pred, conf, limit)
    cols = max(1, min(4, len(idx)))
    rows = max(1, math.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not idx:
        axes[0][0].text(0.5, 0.5, "no mistakes on the test split", ha="center", va="center")
    for ax, i in zip(axes.flat, idx, strict=False):
        img = x_uint8[i].permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray",
                  interpolation="nearest", vmin=0, vmax=255)
        title = f"true {classes[int(target[i])]}, pred {classes[int(pred[i])]} ({conf[i]:.2f})"
        if paths:
            title += f"\n{Path(paths[i]).name[:28]}"
        ax.set_title(title, fontsize=7)
    fig.suptitle("most confident mistakes (test)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)

"""Stage 4, evaluate: score the trained model on the test split with torchmetrics.

`score_logits` is the one scoring function: compress and register call it too, so every
number compared anywhere in the pipeline comes from the same code on the same split.
`model_logits` is the one prediction function (batched, optional flip-TTA): evaluate,
register (challenger and champion) and the pyfunc serving model all go through it.

Files written to `outputs/evaluate/` (the names are stable, so `dvc metrics diff` and
`dvc plots diff` between commits line up):

- `metrics.json`: top-1/top-k, F1 (macro, micro, weighted), mean IoU, ECE, and per class
  precision, recall, F1, IoU and support;
- `predictions.csv`: one row per test image;
- `confusion.csv` (long form, DVC confusion templates), `confusion.png`,
  `confusion_normalized.png` (rows sum to 1);
- `reliability.csv`, `reliability.png`: the reliability diagram behind the ECE;
- `per_class.csv`, `per_class.png`: per-class bars;
- `mistakes.png`: the most confident mistakes, with true and predicted labels.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from visionflow.atomic import atomic_path, write_json
from visionflow.config import Params
from visionflow.layout import Layout

PER_CLASS = ("precision", "recall", "f1", "iou")

# Files next to metrics.json (the Layout holds the original four).
RELIABILITY_CSV = "reliability.csv"
RELIABILITY_PNG = "reliability.png"
PER_CLASS_CSV = "per_class.csv"
PER_CLASS_PNG = "per_class.png"
CONFUSION_NORM_PNG = "confusion_normalized.png"
MISTAKES_PNG = "mistakes.png"


def capped_topk(topk: list[int], num_classes: int) -> list[int]:
    """The k values to report: 1 and each requested k, capped at the class count."""
    return sorted({min(k, num_classes) for k in {1, *topk}})


def model_logits(model: torch.nn.Module, x_uint8: torch.Tensor, batch_size: int = 512,
                 device: torch.device | str = "cpu", tta: bool = False,
                 temperature: float = 1.0) -> torch.Tensor:
    """Logits / `temperature` for uint8 N×C×H×W images. With `tta`, the log of the mean
    softmax of the image and its horizontal mirror (so softmax of the result is the averaged
    probability)."""
    from visionflow.train import predict_logits

    logits = predict_logits(model, x_uint8, batch_size, device) / temperature
    if not tta or len(x_uint8) == 0:
        return logits
    mirrored = predict_logits(model, x_uint8.flip(-1), batch_size, device) / temperature
    probs = (logits.softmax(1) + mirrored.softmax(1)) / 2
    return probs.clamp_min(1e-12).log()


def score_logits(logits: torch.Tensor, target: torch.Tensor, classes: list[str],
                 topk: list[int], calibration_bins: int = 15) -> dict[str, Any]:
    """Every test metric, from torchmetrics.

    Scalars (floats): `top{k}` for k in `capped_topk`, `f1_macro`, `f1_micro`, `f1_weighted`,
    `precision_macro`, `recall_macro`, `miou`, `ece`. Also `n` (int), per-class dicts
    `precision`, `recall`, `f1`, `iou` and `support`, and `confusion` (rows = actual).
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_jaccard_index,
        multiclass_precision,
        multiclass_recall,
    )

    n = len(classes)
    logits = logits.float()
    probs = logits.softmax(1)  # explicit: torchmetrics guesses "logits or probs" per batch
    out: dict[str, Any] = {"n": int(len(target))}
    for k in capped_topk(topk, n):
        out[f"top{k}"] = float(multiclass_accuracy(probs, target, n, average="micro", top_k=k))
    for avg in ("macro", "micro", "weighted"):
        out[f"f1_{avg}"] = float(multiclass_f1_score(probs, target, n, average=avg))
    out["precision_macro"] = float(multiclass_precision(probs, target, n, average="macro"))
    out["recall_macro"] = float(multiclass_recall(probs, target, n, average="macro"))
    per = {
        "precision": multiclass_precision(probs, target, n, average="none"),
        "recall": multiclass_recall(probs, target, n, average="none"),
        "f1": multiclass_f1_score(probs, target, n, average="none"),
        "iou": multiclass_jaccard_index(probs, target, n, average="none"),
    }
    out["miou"] = float(per["iou"].mean())
    out["ece"] = float(multiclass_calibration_error(probs, target, n, n_bins=calibration_bins,
                                                    norm="l1"))
    for name, values in per.items():
        out[name] = {c: float(v) for c, v in zip(classes, values, strict=True)}
    support = torch.bincount(target, minlength=n)
    out["support"] = {c: int(v) for c, v in zip(classes, support, strict=True)}
    out["confusion"] = multiclass_confusion_matrix(probs, target, n).tolist()
    return out


def headline(scores: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics (what goes to MLflow and DVC metrics)."""
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def metrics_json(scores: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The stable `metrics.json` layout: headline scalars, `n_test`, `per_class`, and
    `iou_per_class` (the spine's key, kept for readers such as the flow report)."""
    per_class = {c: {**{m: scores[m][c] for m in PER_CLASS}, "support": scores["support"][c]}
                 for c in classes}
    return {**headline(scores), "n_test": scores["n"], "per_class": per_class,
            "iou_per_class": dict(scores["iou"])}


def reliability_bins(probs: torch.Tensor, target: torch.Tensor,
                     n_bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins (torchmetrics' binning): the reliability diagram's data.

    ECE = sum(count / N * |accuracy - confidence|) over the bins.
    """
    conf, pred = probs.max(1)
    correct = (pred == target).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        m = idx == b
        count = int(m.sum())
        rows.append({
            "bin": b, "lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6),
            "confidence": float(conf[m].mean()) if count else 0.0,
            "accuracy": float(correct[m].mean()) if count else 0.0,
            "count": count,
        })
    return rows


def run_evaluate(params: Params, layout: Layout) -> dict[str, Any]:
    from visionflow import tracking
    from visionflow.augment import load_cache
    from visionflow.classifier import load_classifier
    from visionflow.train import pick_device

    cfg = params.evaluate
    device = pick_device(params.train.device)
    model, arch = load_classifier(layout.model, device)
    cache = load_cache(layout.cache)
    logits = model_logits(model, cache["test_x"], cfg.batch_size, device, cfg.tta,
                          arch.temperature)
    target = cache["test_y"]
    classes = arch.classes
    scores = score_logits(logits, target, classes, cfg.topk, cfg.calibration_bins)

    metrics = metrics_json(scores, classes)
    if cfg.tta:
        plain = model_logits(model, cache["test_x"], cfg.batch_size, device, tta=False)
        metrics["top1_no_tta"] = float((plain.argmax(1) == target).float().mean())
    write_json(layout.metrics, metrics)

    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    out = layout.evaluate_dir
    _write_predictions(layout.predictions, cache["test_paths"], target, pred, conf, classes)
    _write_confusion_csv(layout.confusion_csv, target, pred, classes)
    plot_confusion(layout.confusion_png, scores["confusion"], classes)
    plot_confusion(out / CONFUSION_NORM_PNG, scores["confusion"], classes, normalize=True)
    bins = reliability_bins(probs, target, cfg.calibration_bins)
    _write_rows(out / RELIABILITY_CSV, bins)
    plot_reliability(out / RELIABILITY_PNG, bins, scores["ece"])
    per_rows = [{"class": c, **{m: round(scores[m][c], 6) for m in PER_CLASS},
                 "support": scores["support"][c]} for c in classes]
    _write_rows(out / PER_CLASS_CSV, per_rows)
    plot_per_class(out / PER_CLASS_PNG, per_rows)
    plot_mistakes(out / MISTAKES_PNG, cache["test_x"], target, pred, conf, classes,
                  cache.get("test_paths"), cfg.mistakes)

    with tracking.stage_run(layout):
        import mlflow

        mlflow.log_metrics({f"test_{k}": v for k, v in headline(scores).items()})
        for f in artifact_files(layout):
            mlflow.log_artifact(str(f), "evaluate")
    return metrics


def artifact_files(layout: Layout) -> list[Path]:
    d = layout.evaluate_dir
    return [layout.metrics, layout.predictions, layout.confusion_csv, layout.confusion_png,
            d / CONFUSION_NORM_PNG, d / RELIABILITY_CSV, d / RELIABILITY_PNG,
            d / PER_CLASS_CSV, d / PER_CLASS_PNG, d / MISTAKES_PNG]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def _write_predictions(path: Path, paths, target, pred, conf, classes) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "actual", "predicted", "confidence"])
        for p, t, y, c in zip(paths, target.tolist(), pred.tolist(), conf.tolist(), strict=True):
            w.writerow([p, classes[t], classes[y], f"{c:.4f}"])


def _write_confusion_csv(path: Path, target, pred, classes) -> None:
    """Long form (one row per test image), as DVC's confusion template expects."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for t, y in zip(target.tolist(), pred.tolist(), strict=True):
            w.writerow([classes[t], classes[y]])


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


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str],
                   normalize: bool = False) -> None:
    """Counts, or (normalize) each row divided by its total: recall on the diagonal."""
    plt = _pyplot()
    n = len(classes)
    values: list[list[float]] = [list(map(float, r)) for r in matrix]
    if normalize:
        values = [[v / (sum(r) or 1) for v in r] for r in values]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(n), classes, rotation=90)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if n <= 20:
        peak = max((max(r) for r in values), default=0) or 1
        for i, row in enumerate(values):
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


def plot_per_class(path: Path, rows: list[dict[str, Any]]) -> None:
    import numpy as np

    plt = _pyplot()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * n + 2), 4))
    x = np.arange(n)
    w = 0.8 / len(PER_CLASS)
    for i, m in enumerate(PER_CLASS):
        ax.bar(x + (i - 1.5) * w, [r[m] for r in rows], width=w, label=m)
    ax.set_xticks(x, [r["class"] for r in rows], rotation=90 if n > 20 else 0)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("per-class precision, recall, F1 and IoU (test)")
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def confident_mistakes(target: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor,
                       limit: int) -> list[int]:
    """Indices of wrong predictions, most confident first (ties: lower index first)."""
    wrong = (pred != target).nonzero().flatten()
    if limit <= 0 or len(wrong) == 0:
        return []
    order = sorted(wrong.tolist(), key=lambda i: (-float(conf[i]), i))
    return order[:limit]


def plot_mistakes(path: Path, x_uint8: torch.Tensor, target, pred, conf, classes: list[str],
                  paths: list[str] | None, limit: int = 16) -> None:
    import math

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

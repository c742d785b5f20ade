"""Registering a segmenter: logging it to MLflow "from code" (the weights file of
`save_segmenter`, served by `pyfunc_segmenter`: masks at any size), scoring a registered
version on the test pairs, and its model card (mIoU, pixel accuracy, Dice, per-class IoU)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from visionflow.core.config import Params
from visionflow.core.env import hardware
from visionflow.core.layout import Layout
from visionflow.mlops.card import _md_table, data_section, lineage_section, metrics_section
from visionflow.mlops.gate import Decision
from visionflow.mlops.publish import log_own_model
from visionflow.mlops.publish_segmentation import log_segmenter_pyfunc
from visionflow.mlops.scoring import version_weights
from visionflow.model.segmentation import load_segmenter
from visionflow.model.segmentation_fit import evaluate_segmenter
from visionflow.model.segmentation_metrics import SegmentationScores

HEADLINE = ("miou", "pixel_accuracy", "mean_dice")


def headline(scores: SegmentationScores) -> dict[str, float]:
    return {"miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy,
            "mean_dice": scores.mean_dice}


def log_segmenter(layout: Layout, model_name: str, params: Params):
    """Log the segmenter as its serving pyfunc (masks at any size) and register it as a new
    version of `model_name`."""
    return log_own_model("model", lambda model_id: log_segmenter_pyfunc(
        layout.model, model_name, params, model_id=model_id))


TestPairs = Callable[[], Iterable[tuple[Tensor, Tensor]]]  # a fresh pass over the test pairs


def score(model: Any, test_pairs: TestPairs, keep: list[bool], k: int):
    """(scores, per-image IoU) of `model` on the kept test pairs, each at its own size."""
    device = next(model.parameters()).device
    pairs = ((x.to(device), y.to(device).long()) for (x, y), ok in
             zip(test_pairs(), keep, strict=True) if ok)
    return evaluate_segmenter(model, pairs, k)


def version_scores(name: str, version: str, classes: list[str], test_pairs: TestPairs,
                   keep: list[bool], device: torch.device) -> tuple[Any, str]:
    """((scores, per-image IoU) of a registered segmenter, "") or (None, why not)."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, why = version_weights(name, version, Path(tmp))
        if weights is None:
            return None, why
        model, arch = load_segmenter(weights, device)
    if arch.classes != classes:
        return None, f"champion v{version} was trained on other classes"
    return score(model, test_pairs, keep, arch.num_classes), ""


def segmentation_card(name: str, version: str, params: Params, layout: Layout, arch: Any,
                      model: Any, scores: SegmentationScores, n_test: int, validation: dict,
                      tags: dict[str, str], decision: Decision, run: Any) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    per_class = scores.as_dict(arch.classes)
    run_tags = dict(getattr(getattr(run, "data", None), "tags", {}) or {})
    s = params.segmentation
    lines = [
        f"# {name} v{version}: {arch.name} (segmentation)", "",
        f"**Gate: {decision.label}.** {decision.reason}", "",
        "## Model",
        *_md_table([
            ("task", "segmentation"),
            ("architecture", f"{' '.join(map(str, filter(None, (arch.name, arch.kwargs))))}, "
                             f"{n_params:,} parameters"),
            ("input", "RGB images of any size (trained on "
                      f"{s.image_size}x{s.image_size} crops)"),
            ("classes", f"{arch.num_classes}: {', '.join(arch.classes)[:1500]}"),
            ("output", "a mask of class indices at the image's size (255 = ignore in labels)"),
        ]), "",
        *data_section(tags, validation, params.data.source),
        *metrics_section(headline(scores), n_test, "Test metrics (pixels, images at their "
                                                     "own size)"),
        "## Per-class IoU", "| class | IoU | Dice |", "|---|---|---|",
        *[f"| {c} | {_f(per_class['iou'][c])} | {_f(per_class['dice'][c])} |"
          for c in arch.classes], "",
        "## Training",
        *_md_table([("epochs", s.epochs), ("augmentation", f"joint crop {list(s.crop_scale)}, "
                     f"hflip {s.hflip}, vflip {s.vflip}; colour on the image only"),
                    ("training device", run_tags.get("device", "-")),
                    ("hardware (registering host)", hardware())]), "",
        *lineage_section(tags, run.info.run_id, run.info.experiment_id),
        decision.markdown(name, version),
        "## Use", "```bash", f"vflow predict --model models:/{name}/{version} IMAGE.png",
        "```", "",
    ]
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"

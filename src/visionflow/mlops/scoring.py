"""Scoring for the champion gate: the challenger (the workspace's trained model) and a
registered version on the same test images, by the same code (`model.inference.model_logits`,
with each model's own softmax temperature and the evaluate settings)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch

from visionflow.core.config import Params
from visionflow.core.layout import Layout
from visionflow.mlops import tracking
from visionflow.model.classifier import load_classifier
from visionflow.model.inference import model_logits, pick_device


def trained_logits(layout: Layout, x_uint8: torch.Tensor, params: Params):
    """(logits, model, arch) of the model the train stage wrote, on `x_uint8`."""
    device = pick_device(params.train.device)
    model, arch = load_classifier(layout.model, device)
    cfg = params.evaluate
    logits = model_logits(model, x_uint8, cfg.batch_size, device, cfg.tta, arch.temperature)
    return logits, model, arch


def version_weights(name: str, version: str, dest: Path) -> tuple[Path | None, str]:
    """(the `model.pt` of a registered version downloaded under `dest`, "") or (None, why
    not). An artifact-store outage raises: it never reads as "no champion"."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))
    except Exception as err:  # artifacts gone (deleted store folder, ...)
        if why := tracking.artifact_store_error(err):
            raise tracking.ArtifactStoreUnavailable(why) from None
        return None, f"champion v{version} artifacts cannot be read ({type(err).__name__})"
    weights = next(local.rglob("model.pt"), None)
    return (weights, "") if weights else (None, f"champion v{version} has no weights artifact")


def version_predictions(name: str, version: str, cache: dict[str, Any], params: Params
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """A registered version's test-split predictions as indices into the data's classes (-1:
    a class the data no longer has), and which of the data's classes it was trained on (a
    class added since is not one). None, None and why, if it cannot be scored."""
    with tempfile.TemporaryDirectory() as tmp:
        weights, why = version_weights(name, version, Path(tmp))
        if weights is None:
            return None, None, why
        device = pick_device(params.train.device)
        model, arch = load_classifier(weights, device)
    ours, theirs = list(cache["classes"]), set(arch.classes)
    known = torch.tensor([c in theirs for c in ours], dtype=torch.bool)
    if not known.any():
        return None, None, f"champion v{version} was trained on other classes, none of these"
    if (arch.image_size, arch.in_channels) != (cache["image_size"], cache["channels"]):
        return None, None, f"champion v{version} takes other inputs ({arch.image_size}px)"
    cfg = params.evaluate
    logits = model_logits(model, cache["test_x"], cfg.batch_size, device, cfg.tta,
                          arch.temperature)
    index = {c: i for i, c in enumerate(ours)}
    to_ours = torch.tensor([index.get(c, -1) for c in arch.classes])
    return to_ours[logits.argmax(1).cpu()], known, ""

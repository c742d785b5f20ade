"""A training run as the train stage builds it, shared with the hyperparameter search.

From the uint8 training images and a `train:` config (duck-typed: `config.TrainConfig` or any
object with its attributes): the classifier for the images (normalised by their channel
statistics), pretrained weights, the data placed on the device (or pinned host memory when it
does not fit) and the `FitRun`; plus the top-1 accuracy an epoch callback reports.
torch only, like the fit loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visionflow.model import engine
from visionflow.model.augment_ops import AugmentPolicy
from visionflow.model.classifier import Arch, build_classifier, channel_stats
from visionflow.model.fit import FitRun, Recipe, Stream
from visionflow.model.inference import device_logits
from visionflow.model.pretrained import load_pretrained


@dataclass
class Prepared:
    run: FitRun
    arch: Arch
    streaming: bool  # the images stay in pinned host memory, batches stream to the device


def prepare_fit(train_x: torch.Tensor, train_y: torch.Tensor, classes: Sequence[str],
                train_cfg: Any, policy: AugmentPolicy, *, device: torch.device, seed: int,
                dist: engine.Dist | None = None, stream: Stream | None = None,
                decode: Any = None) -> Prepared:
    """The classifier, its weights and data, and the `FitRun` that trains it. The caller seeds
    torch's global generator first (it draws the initial weights). With a `stream` (shards),
    `train_x` is a sample of the training images: channel statistics and whitening."""
    channels, size = train_x.shape[1], train_x.shape[-1]
    mean, std = channel_stats(train_x)
    arch = Arch(train_cfg.model, len(classes), size, channels, mean, std, list(classes))
    model = build_classifier(arch)
    backbone = (load_pretrained(model, train_cfg.pretrained, train_cfg.model)
                if train_cfg.pretrained else set())
    if backbone:
        engine.say(dist or engine.Dist(), f"pretrained: {len(backbone)} of "
                   f"{len(list(model.parameters()))} parameter tensors from "
                   f"{train_cfg.pretrained}; the others (the head) start fresh")
    x, y, streaming = place(train_x, train_y, device)
    run = FitRun(model, x, y, Recipe.from_params(train_cfg), policy, num_classes=len(classes),
                 device=device, seed=seed, dist=dist, backbone=backbone, stream=stream,
                 decode=decode)
    return Prepared(run, arch, streaming)


def place(x: torch.Tensor, y: torch.Tensor, device: torch.device):
    """Whole dataset on the device when it fits, else pinned host memory (streaming)."""
    if engine.fits_on_device(x.numel() * x.element_size(), device):
        return x.to(device), y.to(device), False
    return x.pin_memory(), y.pin_memory(), True


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 on the device: bf16 on CUDA, large batches, one number back."""
    logits = device_logits(model, x, 1024, tta=0, amp=True)
    return float((logits.argmax(1) == y.to(logits.device)).float().mean())

"""A trained classifier on disk: architecture config + state dict, never a pickled object.

The network takes float32 N×C×H×W in [0, 1]; normalisation is its first module,
so every consumer (evaluate, ONNX export, the MLflow pyfunc) feeds the same input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.core.files import torch_save
from visionflow.model.zoo import create_model


@dataclass
class Arch:
    name: str
    num_classes: int
    image_size: int
    in_channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    classes: list[str] = field(default_factory=list)
    temperature: float = 1.0  # softmax(logits / T): fitted on the val split (calibration.py)
    resize_size: int | None = None  # shard-trained: inputs resized (shorter side) + centre crop


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def channel_stats(x: torch.Tensor, sample: int = 8192) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 N×C×H×W images in [0, 1] units, from about `sample`
    images spread over the whole set (caches are often sorted by class)."""
    xf = x[:: max(1, len(x) // sample)][:sample].float().div_(255)
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def build_classifier(arch: Arch) -> Classifier:

    net = create_model(arch.name, arch.num_classes, arch.image_size, arch.in_channels)
    return Classifier(net, arch.mean, arch.std)


def save_classifier(path: str | Path, model: nn.Module, arch: Arch, **extra: Any) -> None:
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    torch_save({"arch": asdict(arch), "state_dict": state, **extra}, path)


def load_classifier(path: str | Path,
                    device: str | torch.device = "cpu") -> tuple[Classifier, Arch]:
    blob = torch.load(path, map_location=device, weights_only=True)
    arch = Arch(**blob["arch"])
    model = build_classifier(arch)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), arch


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP

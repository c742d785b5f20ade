"""Inference: the device to run on, batched logits for uint8 images, flip-TTA.

Every prediction in the pipeline (evaluate, compress, register's champion and challenger,
the served pyfunc, `vflow predict`) goes through `model_logits`.
"""

from __future__ import annotations

import torch
from torch import nn

from visionflow.errors import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when present), `cpu` or `cuda`; a one-line error for what cannot be."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {name!r}: choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda': no CUDA device is available")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def as_input(x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """A batch as the models take it: float32 in [0, 1] (uint8 is divided by 255)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits for N×C×H×W images (uint8, or float in [0, 1]), batched, on `device` (default:
    the model's); returns float32 on CPU."""
    model.eval()
    device = model_device(model) if device is None else device
    out = [model(as_input(x[i:i + batch_size], device)).float().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def model_logits(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 512,
                 device: torch.device | str | None = None, tta: bool = False,
                 temperature: float = 1.0) -> torch.Tensor:
    """Logits / `temperature` for uint8 N×C×H×W images. With `tta`, the log of the mean
    softmax of the image and its horizontal mirror (so softmax of the result is the averaged
    probability)."""
    logits = predict_logits(model, x_uint8, batch_size, device) / temperature
    if not tta or len(x_uint8) == 0:
        return logits
    mirrored = predict_logits(model, x_uint8.flip(-1), batch_size, device) / temperature
    probs = (logits.softmax(1) + mirrored.softmax(1)) / 2
    return probs.clamp_min(1e-12).log()

"""Inference: the device to run on, batched logits for uint8 images, test-time augmentation.

Every prediction in the pipeline (evaluate, compress, register's champion and challenger,
the served pyfunc, `vflow predict`) goes through `model_logits`; training-time evaluation
(`fit` callbacks, benchmarks) uses `device_logits` directly. Both keep the images and the
logits on the device and move the result once.

TTA levels (as published for the CIFAR-10 speed records): 0 none; 1 the image and its mirror;
2 level 1, averaged half-and-half with level 1 of the image translated by one pixel (reflect
padding) down-right and up-left. Averages are of softmax probabilities; the result is their
log, so softmax of it is the averaged probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visionflow.core.errors import ConfigError

TTA_LEVELS = (0, 1, 2)


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


def tta_level(tta: bool | int) -> int:
    """`True`/`False` (the old flip switch) or a level 0/1/2."""
    level = int(tta)
    if level not in TTA_LEVELS:
        raise ConfigError(f"tta={tta!r}: choose a level 0, 1 or 2")
    return level


def _translate1(x: torch.Tensor, d: int) -> torch.Tensor:
    """Shift by `d` (+1 or -1) pixels in both directions, reflect-padded."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    o = 1 - d
    return padded[..., o:o + h, o:o + w]


def _log_probs(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Log of the TTA-averaged softmax of one float batch (level >= 1)."""
    def mirror_pair(v: torch.Tensor) -> torch.Tensor:
        n = len(v)
        logits = model(torch.cat([v, v.flip(-1)])).float()
        p = logits.softmax(1)
        return (p[:n] + p[n:]) / 2

    probs = mirror_pair(x)
    if level == 2:
        shifted = (mirror_pair(_translate1(x, 1)) + mirror_pair(_translate1(x, -1))) / 2
        probs = (probs + shifted) / 2
    return probs.clamp_min(1e-12).log()


@torch.inference_mode()
def device_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
                  device: torch.device | str | None = None, tta: bool | int = 0,
                  amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits (TTA: log-probabilities) of N×C×H×W images, uint8 or float in [0, 1], computed
    on `device` (default: the model's) and returned there as float32: one transfer of the
    images in (batch by batch above 1 GiB), none out. `amp`: bf16 autocast on CUDA (fp32
    elsewhere)."""
    model.eval()
    device = torch.device(model_device(model) if device is None else device)
    level = tta_level(tta)
    if x.numel() * x.element_size() <= 2**30:  # larger sets move batch by batch
        x = x.to(device, non_blocking=True)
    use_amp = amp and device.type == "cuda"
    outs = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        for i in range(0, len(x), batch_size):
            xb = as_input(x[i:i + batch_size], device)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            outs.append(model(xb).float() if level == 0 else _log_probs(model, xb, level))
    if not outs:
        return torch.zeros(0, 0, device=device)
    return torch.cat(outs)


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Logits for N×C×H×W images (uint8, or float in [0, 1]), batched, on `device` (default:
    the model's); returns float32 on CPU."""
    return device_logits(model, x, batch_size, device).cpu()


def model_logits(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 512,
                 device: torch.device | str | None = None, tta: bool | int = False,
                 temperature: float = 1.0) -> torch.Tensor:
    """Logits / `temperature` for uint8 N×C×H×W images, float32 on the CPU. With `tta` (a level,
    or True for level 1) the log of the averaged softmax of the augmented views of the
    tempered logits (so softmax of the result is the averaged probability)."""
    net = model if temperature == 1.0 else _Tempered(model, temperature)
    return device_logits(net, x_uint8, batch_size, device, tta).cpu()


class _Tempered(nn.Module):
    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


@torch.inference_mode()
def stream_logits(model: nn.Module, batches, device: torch.device | str | None = None,
                  tta: bool | int = 0, amp: bool = False,
                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) on the CPU for an iterable of (uint8 images, labels) batches: a split
    streamed from shards, one batch on the device at a time."""
    net = model if temperature == 1.0 else _Tempered(model, temperature)
    logits, labels = [], []
    for x, y in batches:
        logits.append(device_logits(net, x, len(x) or 1, device, tta, amp).cpu())
        labels.append(y.cpu())
    if not logits:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)

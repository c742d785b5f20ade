"""Segmentation models (torch only: they run where the GPU is): a U-Net and torchvision's
FCN / DeepLabV3 / LR-ASPP heads, behind one zoo like the classifiers' `zoo`.

Every model maps float32 N x C x H x W in [0, 1] (normalisation is its first step, as for
`Classifier`) to N x K x H x W logits at the input's size, for any H x W. Transfer learning
copies the tensors of a local weights file whose names and shapes match
(`load_segmentation_weights`): a saved segmenter, a torchvision segmentation state dict, or
a classification backbone (ResNet, MobileNetV3).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import segmentation as tvseg

from visionflow.core.errors import ConfigError
from visionflow.core.files import torch_save

IGNORE_INDEX = 255  # label of pixels that count nowhere (data.segmentation_masks agrees)
TASK = "segmentation"  # saved with the model; a file without it is a classifier
SegModelFn = Callable[..., nn.Module]
_SEG_ZOO: dict[str, SegModelFn] = {}


def segmentation_zoo_model(name: str) -> Callable[[SegModelFn], SegModelFn]:
    """Decorator registering `fn(num_classes, in_channels, **kwargs) -> nn.Module`."""

    def deco(fn: SegModelFn) -> SegModelFn:
        if name in _SEG_ZOO:
            raise ValueError(f"segmentation model '{name}' is already registered")
        _SEG_ZOO[name] = fn
        return fn

    return deco


def list_segmentation_models() -> list[str]:
    return sorted(_SEG_ZOO)


def create_segmentation_model(name: str, num_classes: int, in_channels: int = 3,
                              **kwargs) -> nn.Module:
    """A freshly initialised network (no normalisation; see `build_segmenter`)."""
    if name not in _SEG_ZOO:
        raise ValueError(f"unknown segmentation model '{name}', choose one of "
                         f"{', '.join(list_segmentation_models())}")
    if num_classes < 2 or in_channels < 1:
        raise ValueError(f"segmentation needs num_classes >= 2 and in_channels >= 1, got "
                         f"{num_classes}, {in_channels}")
    return _SEG_ZOO[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


# --------------------------------------------------------------------------- U-Net


class _DoubleConv(nn.Sequential):
    """(conv3x3 -> BN -> ReLU) x 2."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )  # fmt: skip


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with 'same' convolutions and BatchNorm.

    `depth` down-samplings (2x2 max-pool, ceil mode: odd and tiny sizes never vanish), the
    channels doubling from `width` up to `max_width`; the decoder up-samples bilinearly to
    the exact size of each skip connection, so any H x W works without padding.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32,
                 depth: int = 4, max_width: int = 512) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"UNet needs depth >= 1 and width >= 1, got {depth}, {width}")
        chans = [min(width * 2**i, max_width) for i in range(depth + 1)]
        self.stem = _DoubleConv(in_channels, chans[0])
        self.down = nn.ModuleList(_DoubleConv(a, b) for a, b in pairwise(chans))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.up = nn.ModuleList(_DoubleConv(chans[i] + chans[i + 1], chans[i])
                                for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(self.pool(skips[-1])))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([skip, y], dim=1))
        return self.head(y)


@segmentation_zoo_model("unet")
def unet(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    return UNet(num_classes, in_channels, **kwargs)


# --------------------------------------------------------------------------- torchvision


class TorchvisionSegmentation(nn.Module):
    """A torchvision segmentation model returning its "out" logits (already at input size);
    a 1-channel input is repeated to the backbone's 3 channels."""

    def __init__(self, net: nn.Module, in_channels: int) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"torchvision backbones take 1 or 3 channels, got {in_channels}")
        self.net, self.in_channels = net, in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)["out"]


def _torchvision(builder: Callable[..., nn.Module], aux: bool) -> SegModelFn:
    def make(num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
        extra = {"aux_loss": False} if aux else {}
        net = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                      **extra, **kwargs)
        return TorchvisionSegmentation(net, in_channels)

    return make


for _name, _builder, _aux in (
    ("fcn_resnet50", tvseg.fcn_resnet50, True),
    ("fcn_resnet101", tvseg.fcn_resnet101, True),
    ("deeplabv3_resnet50", tvseg.deeplabv3_resnet50, True),
    ("deeplabv3_resnet101", tvseg.deeplabv3_resnet101, True),
    ("deeplabv3_mobilenet_v3_large", tvseg.deeplabv3_mobilenet_v3_large, True),
    ("lraspp_mobilenet_v3_large", tvseg.lraspp_mobilenet_v3_large, False),
):
    segmentation_zoo_model(_name)(_torchvision(_builder, _aux))


# --------------------------------------------------------------------------- normalised model


@dataclass
class SegArch:
    name: str
    num_classes: int
    in_channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    classes: list[str] = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)  # e.g. {"width": 16, "depth": 3}


class Segmenter(nn.Module):
    """Normalisation, then the network: [0, 1] images in, N x K x H x W logits out."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)


# oneDNN, behind PyTorch's CPU convolutions, keeps a kernel with its buffers for every input
# shape it has run, 1,024 of them by default. A segmenter runs each image at its own size
# (evaluation, the gate's paired test, serving), so that cache grew a process by 1.0 GB for a
# small U-Net at 288-384 px and by 2.4 GB at 640-800 px. 256 kernels hold about half of that
# (64: a third) and cost no time on the suite's 32-40 px images, where 64 made the segmentation
# pipeline test 10% slower (kernels made again): BENCHMARKS, "oneDNN's kernel cache".
KERNEL_CACHE_ENV, KERNEL_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY", 256


def build_segmenter(arch: SegArch) -> Segmenter:
    """A segmenter; caps oneDNN's kernel cache for the process (`KERNEL_CACHE`, unless the
    environment sets it: oneDNN reads it once, at the process's first CPU convolution)."""
    os.environ.setdefault(KERNEL_CACHE_ENV, str(KERNEL_CACHE))
    net = create_segmentation_model(arch.name, arch.num_classes, arch.in_channels,
                                    **arch.kwargs)
    return Segmenter(net, arch.mean, arch.std)


def save_segmenter(path: str | Path, model: nn.Module, arch: SegArch, **extra) -> None:
    """Architecture + state dict + the task, never a pickled object (atomic write)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save({"task": TASK, "arch": asdict(arch), "state_dict": state, **extra}, path)


def load_segmenter(path: str | Path, device: str | torch.device = "cpu"
                   ) -> tuple[Segmenter, SegArch]:
    """A saved segmenter in eval mode; a classifier's file is a one-line ConfigError."""
    blob = torch.load(path, map_location=device, weights_only=True)
    task = blob.get("task", "classification") if isinstance(blob, dict) else "unknown"
    if task != TASK or "arch" not in blob:
        raise ConfigError(f"{path}: a {task} model, not a {TASK} model")
    arch = SegArch(**blob["arch"])
    model = build_segmenter(arch)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval(), arch


def saved_task(path: str | Path) -> str:
    """The task a saved model file was trained for: "segmentation" (its `task` tag) or
    "classification" (no tag: the classifiers' files predate it)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return str(blob.get("task", "classification")) if isinstance(blob, dict) else "unknown"


def _candidates(key: str) -> list[str]:
    """Where a tensor of a weights file may live in a Segmenter: the same name, under
    `net.`, or a classification backbone's layer under torchvision's `net.net.backbone.`
    (MobileNetV3's `features.` is the backbone itself there)."""
    bare = key.removeprefix("module.")
    tail = bare.removeprefix("features.")
    return [bare, f"net.{bare}", f"net.net.{bare}", f"net.net.backbone.{bare}",
            f"net.net.backbone.{tail}"]


def load_segmentation_weights(model: Segmenter, path: str | Path) -> set[str]:
    """Copy the tensors of a local weights file (read with weights_only=True) whose names
    and shapes match; returns the parameter names loaded. The normalisation stays the new
    data's; a head of another class count does not match and starts fresh."""
    key = f"train.pretrained={str(path)!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{key}: file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{key}: not a weights file ({' '.join(str(err).split())[:120]})"
                          ) from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else {}
    own = model.state_dict()
    matched: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            continue
        for target in _candidates(str(name)):
            if (target in own and target not in ("mean", "std")
                    and own[target].shape == tensor.shape):
                matched[target] = tensor
                break
    if not matched:
        raise ConfigError(f"{key}: no tensor matches the model")
    model.load_state_dict(matched, strict=False)
    return {n for n, _ in model.named_parameters() if n in matched}

"""The model zoo (timm-style): `create_model(name, num_classes, image_size, in_channels)`.

Every model takes float32 N x C x H x W input (C = `in_channels`, 1 or 3) and works at 16..64 px
and above (`alexnet` down to 8 px), in contiguous or channels_last memory format.
Small images (<= 64 px) get a stride-1 3x3 stem without the stem max-pool (CIFAR-style).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor, nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ModelFn = Callable[..., nn.Module]

_ZOO: dict[str, ModelFn] = {}
SMALL_IMAGE_MAX = 64  # inputs up to this size get the CIFAR-style stem


def zoo_model(name: str) -> Callable[[ModelFn], ModelFn]:
    """Decorator registering `fn(num_classes, image_size, in_channels, **kwargs) -> nn.Module`."""

    def deco(fn: ModelFn) -> ModelFn:
        if name in _ZOO:
            raise ValueError(f"model '{name}' is already registered")
        _ZOO[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_ZOO)


def create_model(
    name: str, num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs
) -> nn.Module:
    """Build a freshly initialised (no pretrained weights) model from the zoo."""
    if name not in _ZOO:
        raise ValueError(f"unknown model '{name}', choose one of {', '.join(list_models())}")
    if num_classes < 1 or image_size < 1 or in_channels < 1:
        raise ValueError(
            f"num_classes, image_size and in_channels must be >= 1, got "
            f"{num_classes}, {image_size}, {in_channels}"
        )
    return _ZOO[name](
        num_classes=num_classes, image_size=image_size, in_channels=in_channels, **kwargs
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _kaiming(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _stem_conv(in_channels: int, out_channels: int, image_size: int) -> nn.Conv2d:
    """3x3/s1 conv for small images, else the ImageNet 7x7/s2 conv."""
    if image_size <= SMALL_IMAGE_MAX:
        return _kaiming(nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False))
    return _kaiming(nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False))


# --------------------------------------------------------------------------- AlexNet


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky et al. 2012) scaled to small inputs.

    5 conv + ReLU (overlapping 3x3/s2 max-pool after conv1, conv2, conv5), optional local response
    norm after conv1/conv2, then dropout + 3 FC layers. Kernels 5/5/3/3/3 at stride 1 replace
    11/5/3/3/3 at stride 4; an adaptive pool makes any input >= 8 px work.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, ...] = (64, 192, 384, 256, 256),
        hidden: int = 1024,
        dropout: float = 0.5,
        lrn: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths

        def norm() -> nn.Module:
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0) if lrn else nn.Identity()

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), norm(), pool(),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), norm(), pool(),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), pool(),
        )  # fmt: skip
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c5 * 16, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@zoo_model("alexnet")
def alexnet(num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs) -> nn.Module:
    return AlexNet(num_classes, in_channels, **kwargs)


# --------------------------------------------------------------------------- ResNet


class _BasicBlock(BasicBlock):
    """torchvision BasicBlock with one ReLU module per call site (quantization-friendly)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class _Bottleneck(Bottleneck):
    """torchvision Bottleneck with one ReLU module per call site (quantization-friendly)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.relu2 = nn.ReLU(inplace=True)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: list[int],
    num_classes: int,
    image_size: int,
    in_channels: int,
    **kwargs,
) -> ResNet:
    model = ResNet(block, layers, num_classes=num_classes, **kwargs)
    if image_size <= SMALL_IMAGE_MAX:
        model.maxpool = nn.Identity()
    if image_size <= SMALL_IMAGE_MAX or in_channels != 3:
        model.conv1 = _stem_conv(in_channels, model.conv1.out_channels, image_size)
    return model


@zoo_model("resnet18")
def resnet18(num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs) -> nn.Module:
    return _resnet(_BasicBlock, [2, 2, 2, 2], num_classes, image_size, in_channels, **kwargs)


@zoo_model("resnet34")
def resnet34(num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs) -> nn.Module:
    return _resnet(_BasicBlock, [3, 4, 6, 3], num_classes, image_size, in_channels, **kwargs)


@zoo_model("resnet50")
def resnet50(num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs) -> nn.Module:
    return _resnet(_Bottleneck, [3, 4, 6, 3], num_classes, image_size, in_channels, **kwargs)


# --------------------------------------------------------------------------- DenseNet


def _densenet(
    num_classes: int,
    image_size: int,
    in_channels: int,
    growth_rate: int,
    block_config: tuple[int, ...],
    num_init_features: int,
    **kwargs,
) -> DenseNet:
    kwargs.setdefault("bn_size", 4)
    model = DenseNet(
        growth_rate=growth_rate,
        block_config=block_config,
        num_init_features=num_init_features,
        num_classes=num_classes,
        **kwargs,
    )
    feats = model.features
    if image_size <= SMALL_IMAGE_MAX:
        feats.pool0 = nn.Identity()
    if image_size <= SMALL_IMAGE_MAX or in_channels != 3:
        feats.conv0 = _stem_conv(in_channels, num_init_features, image_size)
    return model


@zoo_model("densenet121")
def densenet121(
    num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs
) -> nn.Module:
    return _densenet(num_classes, image_size, in_channels, 32, (6, 12, 24, 16), 64, **kwargs)


@zoo_model("densenet_bc")
def densenet_bc(
    num_classes: int,
    image_size: int = 32,
    in_channels: int = 3,
    growth_rate: int = 12,
    block_config: tuple[int, ...] = (16, 16, 16),
    **kwargs,
) -> nn.Module:
    """DenseNet-BC (Huang et al.), default L=100, k=12: bottleneck 1x1 convs (bn_size=4) and
    transitions halving the channels (compression 0.5); 2k stem features."""
    return _densenet(
        num_classes, image_size, in_channels, growth_rate, block_config, 2 * growth_rate, **kwargs
    )


# --------------------------------------------------------------------------- fast (airbench-style)


def _bn(channels: int, momentum: float, weight: bool) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-12)
    bn.weight.requires_grad_(weight)  # frozen at 1: the BN scale adds nothing before a conv
    return bn


def _conv(c_in: int, c_out: int, dirac: bool) -> nn.Conv2d:
    """3x3 'same' conv, PyTorch's default init; with `dirac` its first c_in filters pass their
    input channel through unchanged (an identity start)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    if dirac:
        _dirac(conv)
    return conv


@torch.no_grad()
def _dirac(conv: nn.Conv2d) -> None:
    nn.init.dirac_(conv.weight[: min(conv.in_channels, conv.out_channels)])


def dirac_init(model: FastNet) -> FastNet:
    """Re-start the 3x3 convs of a `fast` net as identities where their shapes allow (the
    first c_in filters of each), the rest keeping their random init.

    Off by default: it trains CIFAR-10 faster, but the identity channels carry the whitened
    input's large range into the pre-BatchNorm activations, which per-tensor int8
    quantization (the compress stage) then resolves poorly."""
    if not isinstance(model, FastNet):
        raise TypeError(f"dirac_init needs the 'fast' model, got {type(model).__name__}")
    for m in model.layers.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            _dirac(m)
    return model


class _ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool2 -> BN -> act -> conv3x3 -> BN -> act."""

    def __init__(self, c_in: int, c_out: int, act: type[nn.Module], bn_momentum: float,
                 bn_weight: bool, dirac: bool) -> None:
        super().__init__(
            _conv(c_in, c_out, dirac),
            nn.MaxPool2d(2),
            _bn(c_out, bn_momentum, bn_weight),
            act(),
            _conv(c_out, c_out, dirac),
            _bn(c_out, bn_momentum, bn_weight),
            act(),
        )


class _Scale(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FastNet(nn.Module):
    """Small, wide VGG-like net for CIFAR time-to-accuracy, after the airbench/hlb speedruns.

    A 2x2 'whitening' conv (2 * C * 4 filters, set from data by `init_whitening`), three conv
    groups with max-pool downsampling (widths 64/256/256 by default), global max-pool and a
    bias-free linear head with scaled-down logits. BatchNorm scales are frozen at 1 (biases
    train; `bn_weight=True` trains both). `dirac` (or `dirac_init` later, as `fit` does for
    the cifar10-fast recipe) starts the 3x3 convs as identities where their shapes allow.
    Needs inputs >= 16 px.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (64, 256, 256),
        act: str = "gelu",
        bn_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
        bn_weight: bool = False,
        dirac: bool = False,
    ) -> None:
        super().__init__()
        act_cls = {"gelu": nn.GELU, "relu": nn.ReLU}[act]
        c_white = 2 * in_channels * 4
        self.whiten = nn.Conv2d(in_channels, c_white, 2, padding=0, bias=True)
        self.act0 = act_cls()
        chans = (c_white, *widths)
        self.layers = nn.Sequential(
            *(_ConvGroup(a, b, act_cls, bn_momentum, bn_weight, dirac) for a, b in pairwise(chans))
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.scale = _Scale(logit_scale)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.act0(self.whiten(x)))
        return self.scale(self.head(torch.flatten(self.pool(x), 1)))


@zoo_model("fast")
def fast(num_classes: int, image_size: int = 32, in_channels: int = 3, **kwargs) -> nn.Module:
    if image_size < 16:
        raise ValueError(f"model 'fast' needs image_size >= 16, got {image_size}")
    return FastNet(num_classes, in_channels, **kwargs)


@torch.no_grad()
def init_whitening(
    model: FastNet, images: Tensor, eps: float = 5e-4, freeze: bool = True
) -> FastNet:
    """Set `model.whiten` to a ZCA-like patch-whitening filter bank estimated from `images`.

    `images`: N x C x H x W, uint8 (scaled to [0, 1] like `augment_batch` output) or float, in the
    same form the model will receive. Filters are the patch-covariance eigenvectors scaled by
    1/sqrt(eigenvalue + eps), plus their negatives; the bias centres the outputs. With `freeze` the
    filter weights stop receiving gradients (the bias still trains).
    """
    if not isinstance(model, FastNet):
        raise TypeError(f"init_whitening needs the 'fast' model, got {type(model).__name__}")
    conv = model.whiten
    kh, kw = conv.kernel_size
    x = images.to(conv.weight.device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    c = x.shape[1]
    if c != conv.in_channels:
        raise ValueError(f"images have {c} channels, model expects {conv.in_channels}")
    patches = nn.functional.unfold(x, (kh, kw)).transpose(1, 2).reshape(-1, c * kh * kw)
    # float32 sums on the device, the small covariance and its eigenvectors in float64 on the CPU
    n = len(patches)
    mean = (patches.sum(0).double() / n).cpu()
    cov = (patches.T @ patches).double().cpu() / n - torch.outer(mean, mean)
    cov = cov * n / max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    filters = (evecs.T / (evals.clamp_min(0) + eps).sqrt()[:, None]).flip(0)  # strongest first
    weight = torch.cat([filters, -filters])  # (2 * C*kh*kw, C*kh*kw)
    conv.weight.copy_(weight.reshape(conv.weight.shape).to(conv.weight))
    conv.bias.copy_((-weight @ mean).to(conv.bias))
    conv.weight.requires_grad_(not freeze)
    return model

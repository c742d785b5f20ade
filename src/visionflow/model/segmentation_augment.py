"""Joint image + mask augmentation on the training device (torch only, batched).

One affine sampling grid per sample carries the geometry (random resized crop with a scale
range that may zoom out past the image, aspect ratio, horizontal / vertical flip) to both the
image (bilinear) and its mask (nearest: class indices stay indices); pixels sampled from
outside the image are 0 in the image and IGNORE_INDEX (255) in the mask. Photometric
changes (brightness, contrast, saturation) touch the image only. All randomness comes from
one draw of the optional `torch.Generator` on the data's device: the same seed gives the
same batch, on CPU or CUDA, and nothing is read back to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from visionflow.model.segmentation import IGNORE_INDEX

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision
_DRAWS = 9  # random numbers per sample, always all drawn (the stream does not depend on policy)


@dataclass(frozen=True)
class JointPolicy:
    """`scale`: the crop's area as a fraction of the image's (above 1 zooms out and pads);
    `ratio`: the crop's width / height range (log-uniform); `out_size`: (H, W) of the
    output, None = the input's; photometric factors are drawn from [1 - x, 1 + x]."""

    out_size: tuple[int, int] | None = None
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be 0 < lo <= hi, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be 0 < lo <= hi, got {self.ratio}")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def _to_unit_float(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32).mul_(1 / 255)
    return x.to(torch.float32)


def affine_grid(policy: JointPolicy, u: Tensor, in_hw: tuple[int, int],
                out_hw: tuple[int, int]) -> Tensor:
    """The N x H' x W' x 2 sampling grid (normalised input coordinates, align_corners=False)
    for the uniform draws `u` (N x _DRAWS)."""
    h, w = in_hw
    n = u.shape[0]
    lo, hi = policy.scale
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(policy.ratio[0]) + (math.log(policy.ratio[1]) - math.log(policy.ratio[0])
                                         ) * u[:, 1]
    ratio = torch.exp(log_r)
    # crop size as a fraction of the image's sides; the aspect is relative to the image's
    fw = torch.sqrt(area * ratio)
    fh = torch.sqrt(area / ratio)
    # centre (in [-1, 1]): inside the image when the crop fits, else the crop covers it
    cx = (1 - fw).abs() * (2 * u[:, 2] - 1)
    cy = (1 - fh).abs() * (2 * u[:, 3] - 1)
    sx = torch.where(u[:, 4] < policy.hflip, -fw, fw)
    sy = torch.where(u[:, 8] < policy.vflip, -fh, fh)
    theta = torch.zeros(n, 2, 3, device=u.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    return F.affine_grid(theta, [n, 1, *out_hw], align_corners=False)


def _photometric(x: Tensor, policy: JointPolicy, u: Tensor) -> Tensor:
    n = x.shape[0]
    if policy.brightness:
        x = x * (1 + policy.brightness * (2 * u[:, 5] - 1)).view(n, 1, 1, 1)
    if policy.contrast:
        mean = (_gray(x) if x.shape[1] == 3 else x).mean(dim=(1, 2, 3), keepdim=True)
        c = (1 + policy.contrast * (2 * u[:, 6] - 1)).view(n, 1, 1, 1)
        x = mean + c * (x - mean)
    if policy.saturation and x.shape[1] == 3:
        s = (1 + policy.saturation * (2 * u[:, 7] - 1)).view(n, 1, 1, 1)
        gray = _gray(x)
        x = gray + s * (x - gray)
    return x.clamp_(0, 1)


def _gray(x: Tensor) -> Tensor:
    weights = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def joint_augment(images: Tensor, masks: Tensor, policy: JointPolicy,
                  generator: torch.Generator | None = None,
                  image_mode: Literal["bilinear", "nearest"] = "bilinear"
                  ) -> tuple[Tensor, Tensor]:
    """Augment a batch: images N x C x H x W (uint8, or float in [0, 1]), masks N x H x W
    (integer class indices, 255 = ignore) -> (float32 images in [0, 1], int64 masks) of
    `policy.out_size`."""
    if images.ndim != 4 or masks.ndim != 3 or images.shape[0] != masks.shape[0] \
            or images.shape[-2:] != masks.shape[-2:]:
        raise ValueError(f"images N x C x H x W and masks N x H x W of the same N, H, W "
                         f"expected, got {tuple(images.shape)} and {tuple(masks.shape)}")
    n, _, h, w = images.shape
    out_hw = policy.out_size or (h, w)
    u = torch.rand(n, _DRAWS, generator=generator, device=images.device)
    grid = affine_grid(policy, u, (h, w), out_hw)
    x = F.grid_sample(_to_unit_float(images), grid, mode=image_mode, padding_mode="zeros",
                      align_corners=False)
    # mask + 1 sampled with zero padding: 0 marks "outside the image" -> ignore
    shifted = (masks.to(torch.float32) + 1).unsqueeze(1)
    y = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros",
                      align_corners=False).squeeze(1).round_().to(torch.int64) - 1
    y = torch.where(y < 0, torch.full_like(y, IGNORE_INDEX), y)
    return _photometric(x, policy, u), y

"""Per-sample batch augmentation on the training device (CPU or CUDA, same code).

All ops are vectorised over the batch (no Python loop over samples), draw their randomness from
an optional `torch.Generator` on the same device as the data (same seed -> same output) and never
read device values back to the host, so they do not stall a CUDA stream.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

PadMode = Literal["reflect", "zeros"]
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision




class AugmentPolicy(Protocol):
    """What the ops read from a policy: `config.AugmentConfig` and `Policy` both fit."""

    hflip: float
    translate: int
    cutout: int
    cutout_p: float
    brightness: float
    contrast: float
    saturation: float
    mixup_alpha: float
    cutmix_alpha: float
    mix_p: float


@dataclass(frozen=True)
class Policy:
    """A plain policy for callers without pydantic (benchmarks, the GPU machine)."""

    hflip: float = 0.0
    translate: int = 0
    cutout: int = 0
    cutout_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_p: float = 0.0
    alternate_flip: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        """The `augment:` section of params.yaml (unknown keys are an error)."""
        return cls(**d)


# --------------------------------------------------------------------------- helpers


def _rand(n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator, device=x.device)


def _to_unit_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is assumed to be in [0, 1] already."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).mul_(1 / 255)  # mixed-dtype torch.mul is ~20x slower on CPU
    return x.to(torch.float32)


def _reflect(idx: Tensor, size: int) -> Tensor:
    """Map indices in [-(size-1), 2*(size-1)] into [0, size) by mirroring (no edge repeat)."""
    idx = idx.abs()
    return torch.where(idx > size - 1, 2 * (size - 1) - idx, idx)


def _flip_translate(
    x: Tensor,
    p_flip: float,
    max_shift: int,
    generator: torch.Generator | None,
    pad_mode: PadMode = "reflect",
    flip: Tensor | None = None,
) -> Tensor:
    """Random horizontal flip then pad-and-random-crop translation as ONE gather (any dtype).

    Output pixel (i, j) of a sample shifted by (dy, dx) reads source pixel (i + dy, j + dx),
    out-of-range indices mirrored (reflect) or masked to 0 (zeros); the flip just reverses j.
    `flip` (bool, one per sample) replaces the random flip draw when given.
    """
    n, c, h, w = x.shape
    dev = x.device
    cols = torch.arange(w, device=dev).expand(n, w)
    if flip is None and p_flip > 0:
        flip = _rand(n, x, generator) < p_flip
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    if max_shift <= 0:  # flip only: a gather along W with an (N, W) index is cheaper
        return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if pad_mode == "reflect" and max_shift >= min(h, w):
        raise ValueError(f"reflect translate needs max_shift < {min(h, w)}, got {max_shift}")
    shift = torch.randint(-max_shift, max_shift + 1, (2, n, 1), generator=generator, device=dev)
    rows = torch.arange(h, device=dev) + shift[0]
    cols = cols + shift[1]
    valid = None
    if pad_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    return out if valid is None else out.masked_fill_(~valid[:, None], 0)


def _cutout_keep(x: Tensor, size: int, p: float, generator: torch.Generator | None) -> Tensor:
    """(N, 1, H, W) float32 mask, 0 inside one size x size square (fully inside) w.p. `p`, else 1.

    Built as a float outer product: bool broadcasting ops are several times slower on CPU.
    """
    n, _, h, w = x.shape
    size = min(size, h, w)
    u = torch.rand(3, n, 1, generator=generator, device=x.device)
    y0 = (u[0] * (h - size + 1)).floor_().clamp_(max=h - size)
    x0 = (u[1] * (w - size + 1)).floor_().clamp_(max=w - size)
    rows = torch.arange(h, device=x.device, dtype=torch.float32)
    cols = torch.arange(w, device=x.device, dtype=torch.float32)
    rmask = ((rows >= y0) & (rows < y0 + size) & (u[2] < p)).to(torch.float32)
    cmask = ((cols >= x0) & (cols < x0 + size)).to(torch.float32)
    return torch.mul(rmask[:, :, None], cmask[:, None, :]).neg_().add_(1)[:, None]


@functools.cache
def _gray_weights(device: torch.device) -> Tensor:
    return torch.tensor(_GRAY, device=device)  # copied to the device once, then cached


def _uniform_around_1(u: Tensor, strength: float) -> Tensor:
    """Map U[0, 1) to U[max(0, 1 - s), 1 + s) as torchvision's ColorJitter."""
    lo = max(0.0, 1 - strength)
    return u.mul(1 + strength - lo).add_(lo).view(-1, 1, 1, 1)


def _jitter_coeffs(
    x: Tensor, brightness: float, contrast: float, saturation: float, g: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample affine colour map: out = x * k + gray * k_gray + t, with (N,1,1,1) factors.

    brightness (x * b), contrast (blend with the mean gray) and saturation (blend with the
    per-pixel gray) compose to one affine map of (x, gray); one clamp at the end instead of
    torchvision's clamp after each step.
    """
    n, c, h, w = x.shape
    u = torch.rand(3, n, generator=g, device=x.device)
    b = _uniform_around_1(u[0], brightness)
    k = _uniform_around_1(u[1], contrast)
    s = _uniform_around_1(u[2], saturation)
    if c == 3:
        gray = torch.matmul(_gray_weights(x.device), x.reshape(n, c, h * w)).view(n, 1, h, w)
    else:
        gray, s = x, torch.ones_like(s)
    m = gray.mean((2, 3), keepdim=True) if contrast > 0 else torch.zeros_like(b)
    a = b * k
    return gray, a * s, a * (1 - s), b * m * (1 - k)


# --------------------------------------------------------------------------- public ops


def hflip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each sample left-right with probability `p` (any dtype, same dtype out)."""
    return _flip_translate(x, p, 0, generator) if p > 0 else x.clone()


def translate(
    x: Tensor,
    max_shift: int,
    generator: torch.Generator | None = None,
    pad_mode: PadMode = "reflect",
) -> Tensor:
    """Pad by `max_shift` (reflect or zeros) and random-crop back: shift in [-s, s]^2 per sample."""
    return _flip_translate(x, 0.0, max_shift, generator, pad_mode) if max_shift > 0 else x.clone()


def cutout(
    x: Tensor,
    size: int,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    value: float = 0.0,
) -> Tensor:
    """With probability `p` per sample, fill a `size`-px square (fully inside) with `value`."""
    if size <= 0 or p <= 0:
        return x.clone()
    keep = _cutout_keep(x, size, p, generator)
    if not x.is_floating_point():
        return x.masked_fill(keep == 0, value)
    out = x * keep
    return out if value == 0 else out.add_(keep.neg().add_(1).mul_(value))


def color_jitter(
    x: Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample brightness/contrast/saturation jitter, factors ~ U[1-s, 1+s] as torchvision.

    Applied in that fixed order as one fused affine map, clamped to [0, 1] once. Returns float32.
    """
    x = _to_unit_float(x)
    if brightness <= 0 and contrast <= 0 and saturation <= 0:
        return x.clone()
    gray, k, k_gray, t = _jitter_coeffs(x, brightness, contrast, saturation, generator)
    return torch.addcmul(torch.addcmul(t, gray, k_gray), x, k).clamp_(0, 1)


def augment_batch(
    x: Tensor,
    policy: AugmentPolicy,
    generator: torch.Generator | None = None,
    flip: Tensor | None = None,
) -> Tensor:
    """flip -> translate -> colour jitter -> cutout, per sample. uint8/float in, float32 [0,1] out.

    Flip and translate run as one gather on the input dtype (uint8 moves 4x fewer bytes), cutout
    is folded into the uint8 -> float conversion when there is no colour jitter. `flip` (bool per
    sample) is the caller's flip decision (alternating flip), used instead of a random draw.
    """
    owned = False  # True once x is a tensor we created (safe to modify in place)
    if flip is not None or policy.hflip > 0 or policy.translate > 0:
        x = _flip_translate(x, policy.hflip, policy.translate, generator, flip=flip)
        owned = True
    keep = None
    if policy.cutout > 0 and policy.cutout_p > 0:
        keep = _cutout_keep(x, policy.cutout, policy.cutout_p, generator)
    if policy.brightness > 0 or policy.contrast > 0 or policy.saturation > 0:
        x = color_jitter(x, policy.brightness, policy.contrast, policy.saturation, generator)
        return x if keep is None else x.mul_(keep)
    if keep is not None:  # cutout folded into the to-float conversion
        if x.dtype == torch.uint8:
            return x.to(torch.float32).mul_(keep.mul_(1 / 255))
        return x.to(torch.float32) * keep
    out = _to_unit_float(x)
    return out.clone() if out is x and not owned else out


# --------------------------------------------------------------------------- mixup / cutmix


def _beta(alpha: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One Beta(alpha, alpha) sample as a 0-dim device tensor (ratio of two gammas)."""
    conc = torch.full((2,), float(alpha), device=x.device)
    g1, g2 = torch._standard_gamma(conc, generator=generator)  # public samplers take no generator
    return torch.nan_to_num(g1 / (g1 + g2), nan=0.5)


def _cutmix_box(lam: Tensor, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """(H, W) float mask of a box with area ~ (1 - lam) * H * W, centred uniformly, clipped."""
    h, w = x.shape[2:]
    cut = torch.sqrt(1 - lam)
    ch, cw = (cut * h).long(), (cut * w).long()
    u = torch.rand(2, generator=generator, device=x.device)
    cy, cx = (u[0] * h).long(), (u[1] * w).long()
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    rmask = (rows >= (cy - ch // 2).clamp(0, h)) & (rows < (cy + ch // 2).clamp(0, h))
    cmask = (cols >= (cx - cw // 2).clamp(0, w)) & (cols < (cx + cw // 2).clamp(0, w))
    return (rmask[:, None] & cmask[None, :]).to(torch.float32)


def one_hot(y: Tensor, num_classes: int) -> Tensor:
    """Float one-hot without the host-side range check of `F.one_hot` on CUDA."""
    out = torch.zeros(len(y), num_classes, device=y.device)
    return out.scatter_(1, y.long()[:, None], 1.0)


def mix_batch(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    policy: AugmentPolicy,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """MixUp or CutMix (50/50 when both alphas > 0) on the whole batch with probability `mix_p`.

    Partners come from a random permutation; one lam per batch. Returns float32 images and soft
    targets (N, num_classes) whose rows sum to 1; CutMix lam is the exact kept-area fraction.
    Branch-free on the device: an unmixed batch goes through the same kernels with weight 0.
    """
    x = _to_unit_float(x)
    targets = one_hot(y, num_classes)
    use_mixup, use_cutmix = policy.mixup_alpha > 0, policy.cutmix_alpha > 0
    if policy.mix_p <= 0 or not (use_mixup or use_cutmix):
        return x, targets
    perm = torch.randperm(len(x), generator=generator, device=x.device)
    u = torch.rand(2, generator=generator, device=x.device)
    if use_mixup:
        weight = (1 - _beta(policy.mixup_alpha, x, generator)).expand(x.shape[2:])
    if use_cutmix:
        box = _cutmix_box(_beta(policy.cutmix_alpha, x, generator), x, generator)
        weight = torch.where(u[1] < 0.5, box, weight) if use_mixup else box
    weight = weight * (u[0] < policy.mix_p)  # (H, W) share of the partner image per pixel
    lam = 1 - weight.mean()
    mixed = torch.lerp(x, x[perm], weight)
    return mixed, torch.lerp(targets, targets[perm], 1 - lam)


__all__ = [
    "AugmentPolicy",
    "Policy",
    "augment_batch",
    "color_jitter",
    "cutout",
    "hflip",
    "mix_batch",
    "one_hot",
    "translate",
]

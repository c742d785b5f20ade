"""Per-sample batch augmentation: geometry, cutout, colour, mixing, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visionflow.model.augment_ops import (
    Policy,
    augment_batch,
    color_jitter,
    cutout,
    hflip,
    mix_batch,
    translate,
)


def _policy(**kw) -> Policy:  # params.yaml's defaults, without pydantic
    return Policy(**{"translate": 2, "cutout": 4, "cutout_p": 0.5, **kw})


N, C, H, W = 16, 3, 12, 10  # non-square catches row/column mix-ups


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = N, c: int = C, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, H, W), generator=_gen(seed), dtype=torch.uint8)


POLICIES = {
    "default": _policy(hflip=0.5, translate=4, cutout=0),
    "cutout": _policy(cutout=4, cutout_p=1.0),
    "jitter": _policy(brightness=0.4, contrast=0.4, saturation=0.4, cutout=4),
    "off": _policy(hflip=0, translate=0, cutout=0),
}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_batch_shape_dtype_range(policy, channels, dtype) -> None:
    x = _images(c=channels)
    x = x if dtype == torch.uint8 else x.float() / 255
    before = x.clone()
    out = augment_batch(x, policy, _gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before), "input must not be modified"


def test_augment_off_is_scaling_only() -> None:
    x = _images()
    assert torch.allclose(augment_batch(x, POLICIES["off"]), x.float() / 255)


def test_augment_deterministic_per_generator() -> None:
    x = _images()
    policy = POLICIES["jitter"]
    a = augment_batch(x, policy, _gen(1))
    assert torch.equal(a, augment_batch(x, policy, _gen(1)))
    assert not torch.equal(a, augment_batch(x, policy, _gen(2)))


FLIP_ONLY = _policy(hflip=0.5, translate=0, cutout=0)


@pytest.mark.parametrize("policy", [POLICIES["jitter"], FLIP_ONLY])
def test_augment_channels_last_input(policy) -> None:
    x = _images()
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(augment_batch(cl, policy, _gen()), augment_batch(x, policy, _gen()))


def test_augment_is_per_sample() -> None:
    x = _images(1).expand(64, C, H, W)  # the same image 64 times
    out = augment_batch(x, _policy(hflip=0.5, translate=2, cutout=0), _gen())
    distinct = {out[i].numpy().tobytes() for i in range(len(out))}
    assert len(distinct) > 10


def test_hflip_all_none_and_involution() -> None:
    x = _images()
    flipped = hflip(x, 1.0, _gen())
    assert torch.equal(flipped, x.flip(3))
    assert torch.equal(hflip(flipped, 1.0, _gen()), x)
    assert torch.equal(hflip(x, 0.0, _gen()), x)


def test_hflip_half_flips_some() -> None:
    x = _images(64)
    out = hflip(x, 0.5, _gen())
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


def test_translate_zero_is_identity() -> None:
    x = _images()
    assert torch.equal(translate(x, 0, _gen()), x)


@pytest.mark.parametrize("pad_mode", ["reflect", "zeros"])
def test_translate_is_a_crop_of_the_padded_image(pad_mode: str) -> None:
    s = 3
    x = _images()
    out = translate(x, s, _gen(), pad_mode=pad_mode)
    padded = F.pad(x, (s, s, s, s), mode="reflect" if pad_mode == "reflect" else "constant")
    offsets = []
    for i in range(N):  # test-side loop: find the crop each sample came from
        hits = [
            (dy, dx)
            for dy in range(2 * s + 1)
            for dx in range(2 * s + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + H, dx : dx + W])
        ]
        assert hits, f"sample {i} is not a crop of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3, "shifts should vary per sample"


def test_translate_rejects_too_large_reflect_shift() -> None:
    with pytest.raises(ValueError, match="max_shift"):
        translate(_images(), W, _gen())


def test_cutout_zeroes_exactly_one_square() -> None:
    x = torch.ones(N, C, H, W)
    out = cutout(x, 4, 1.0, _gen())
    zeros = (out == 0).all(1)  # (N, H, W): all channels zeroed together
    assert ((out == 0) | (out == 1)).all()
    assert (zeros.flatten(1).sum(1) == 16).all()
    rows, cols = zeros.any(2), zeros.any(1)  # a square: 4 consecutive rows x 4 columns
    assert (rows.sum(1) == 4).all() and (cols.sum(1) == 4).all()


def test_cutout_probability_and_clipping() -> None:
    x = torch.ones(64, 1, H, W)
    assert torch.equal(cutout(x, 4, 0.0, _gen()), x)
    some = (cutout(x, 4, 0.5, _gen()) == 0).flatten(1).any(1)
    assert 10 < some.sum() < 54
    whole = cutout(x, 100, 1.0, _gen())  # larger than the image: clipped to min(H, W)
    assert ((whole == 0).flatten(1).sum(1) == min(H, W) ** 2).all()


def test_cutout_uint8() -> None:
    x = torch.full((N, C, H, W), 200, dtype=torch.uint8)
    out = cutout(x, 3, 1.0, _gen())
    assert out.dtype == torch.uint8 and ((out == 0).flatten(1).sum(1) == 3 * 3 * C).all()


def test_color_jitter_off_is_identity() -> None:
    x = torch.rand(N, C, H, W, generator=_gen())
    assert torch.equal(color_jitter(x, 0, 0, 0, _gen()), x)


def test_brightness_scales_each_sample() -> None:
    x = torch.rand(N, C, H, W, generator=_gen()) * 0.5 + 0.1  # no clipping at 1 + 0.4
    out = color_jitter(x, brightness=0.4, generator=_gen())
    ratio = (out / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert ratio.min() >= 0.6 - 1e-5 and ratio.max() <= 1.4 + 1e-5
    assert ratio[:, 0].std() > 0.05


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)


def test_saturation_keeps_luma_and_contrast_keeps_mean() -> None:
    x = torch.rand(N, C, H, W, generator=_gen()) * 0.4 + 0.3
    sat = color_jitter(x, saturation=0.5, generator=_gen())
    assert torch.allclose(_gray(sat), _gray(x), atol=1e-5)
    assert not torch.allclose(sat, x)
    con = color_jitter(x, contrast=0.5, generator=_gen())
    assert torch.allclose(_gray(con).mean((1, 2)), _gray(x).mean((1, 2)), atol=1e-5)
    gray_img = x[:, :1].expand(N, C, H, W)
    assert torch.allclose(color_jitter(gray_img, saturation=0.9, generator=_gen()), gray_img)


def test_color_jitter_single_channel() -> None:
    out = color_jitter(_images(c=1), 0.3, 0.3, 0.3, _gen())
    assert out.shape == (N, 1, H, W) and out.dtype == torch.float32


def _constant_batch(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is a constant image of value (i + 1) / n, label i."""
    values = (torch.arange(n) + 1.0) / n
    return values.view(n, 1, 1, 1).expand(n, C, H, W).contiguous(), torch.arange(n)


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "both"])
def test_mix_soft_targets_match_images(mode: str) -> None:
    x, y = _constant_batch()
    alphas = {"mixup": (1.0, 0.0), "cutmix": (0.0, 1.0), "both": (1.0, 1.0)}[mode]
    policy = _policy(mixup_alpha=alphas[0], cutmix_alpha=alphas[1], mix_p=1.0)
    for seed in range(8):
        xm, t = mix_batch(x, y, N, policy, _gen(seed))
        assert xm.shape == x.shape and t.shape == (N, N)
        assert torch.allclose(t.sum(1), torch.ones(N)) and (t >= 0).all()
        values = x[:, 0, 0, 0]
        # pixel mean of the mixed image = label-weighted mean of the source values
        assert torch.allclose(xm.mean((1, 2, 3)), t @ values, atol=1e-5)


def test_cutmix_lam_is_pasted_area() -> None:
    x, y = _constant_batch()
    policy = _policy(cutmix_alpha=1.0, mix_p=1.0)
    partial = 0
    for seed in range(8):
        xm, t = mix_batch(x, y, N, policy, _gen(seed))
        own = (xm == x).all(1).flatten(1).float().mean(1)  # fraction of pixels kept
        assert torch.allclose(own, t.diagonal(), atol=1e-6)
        partner = (t - torch.diag(t.diagonal())).argmax(1)  # the other label of each row
        pasted = (xm != x).any(1, keepdim=True)
        assert torch.equal(xm[pasted.expand_as(xm)], x[partner][pasted.expand_as(xm)])
        partial += int(((own > 0) & (own < 1)).sum())
    assert partial > 0


def test_mix_both_modes_get_picked() -> None:
    x, y = _constant_batch()
    policy = _policy(mixup_alpha=1.0, cutmix_alpha=1.0, mix_p=1.0)
    values = set(x[:, 0, 0, 0].tolist())
    modes = set()
    for seed in range(16):
        xm, _ = mix_batch(x, y, N, policy, _gen(seed))
        modes.add("cutmix" if set(xm.unique().tolist()) <= values else "mixup")
    assert modes == {"cutmix", "mixup"}


def test_mix_off_gives_one_hot() -> None:
    x, y = _constant_batch()
    for policy in (_policy(mixup_alpha=1.0, mix_p=0.0), _policy(mix_p=1.0)):
        xm, t = mix_batch(x, y, N, policy, _gen())
        assert torch.equal(xm, x) and torch.equal(t, torch.eye(N))


def test_mix_probability_and_determinism() -> None:
    x, y = _constant_batch()
    policy = _policy(mixup_alpha=0.4, cutmix_alpha=1.0, mix_p=0.5)
    runs = [mix_batch(x, y, N, policy, _gen(seed)) for seed in range(40)]
    mixed = sum(not torch.equal(t, torch.eye(N)) for _, t in runs)
    assert 8 < mixed < 32
    again = mix_batch(x, y, N, policy, _gen(3))
    assert torch.equal(again[0], runs[3][0]) and torch.equal(again[1], runs[3][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync_and_matches_shapes() -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = _images(64).to(dev)
    y = torch.arange(64, device=dev) % 10
    policy = _policy(cutout=4, brightness=0.2, contrast=0.2, saturation=0.2)
    mix = _policy(mixup_alpha=0.2, cutmix_alpha=1.0, mix_p=0.5)
    augment_batch(x, policy, gen)  # warm-up (cached constants are copied once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment_batch(x, policy, gen)
        xm, t = mix_batch(out, y, 10, mix, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and xm.shape == x.shape and t.shape == (64, 10)


def test_params_policy_and_plain_policy_agree() -> None:
    """`config.AugmentConfig` (pydantic) and `Policy` drive the ops identically."""
    config = pytest.importorskip("visionflow.core.config")
    kw = {"hflip": 0.5, "translate": 3, "cutout": 4, "cutout_p": 0.5, "brightness": 0.2}
    x = _images()
    a = augment_batch(x, config.AugmentConfig(**kw), _gen(1))
    b = augment_batch(x, Policy.from_dict(config.AugmentConfig(**kw).model_dump()), _gen(1))
    assert torch.equal(a, b)


def test_given_flip_mask_replaces_the_random_draw() -> None:
    x = _images()
    mask = torch.arange(N) % 2 == 0
    out = augment_batch(x, Policy(hflip=0.5), _gen(), flip=mask)
    ref = x.float() / 255
    torch.testing.assert_close(out[mask], ref[mask].flip(-1))
    torch.testing.assert_close(out[~mask], ref[~mask])

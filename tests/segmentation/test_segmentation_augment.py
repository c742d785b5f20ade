"""Joint augmentation (#19): the same geometry on image and mask, nearest for masks, 255
where the crop leaves the image, photometric changes on the image only, deterministic."""

from __future__ import annotations

import pytest
import torch

from visionflow.model.segmentation_augment import JointPolicy, joint_augment


def _batch(n=6, h=24, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, 3, h // 4, w // 4), generator=g, dtype=torch.uint8)
    images = blocks.repeat_interleave(4, 2).repeat_interleave(4, 3)
    masks = images[:, 0].long() // 64  # the mask is a function of the image's pixels
    return images, masks


GEOMETRY = JointPolicy(out_size=(20, 28), scale=(0.3, 1.8), ratio=(0.6, 1.6), hflip=0.5,
                       vflip=0.5)


def test_mask_stays_aligned_with_the_image():
    images, masks = _batch()
    x, y = joint_augment(images, masks, GEOMETRY, torch.Generator().manual_seed(1),
                         image_mode="nearest")
    assert x.shape == (6, 3, 20, 28) and y.shape == (6, 20, 28) and y.dtype == torch.int64
    inside = y != 255
    assert inside.float().mean() > 0.5 and (~inside).any()  # zoomed out somewhere: padded
    recomputed = (x[:, 0] * 255).round().long() // 64
    assert torch.equal(recomputed[inside], y[inside])
    assert (x.permute(1, 0, 2, 3)[:, ~inside] == 0).all()  # padding: black image, ignored mask


def test_bilinear_image_agrees_away_from_edges():
    """With the default bilinear image the mask matches wherever the image is locally flat."""
    images, masks = _batch(n=8, seed=3)
    x, y = joint_augment(images, masks, GEOMETRY, torch.Generator().manual_seed(2))
    recomputed = (x[:, 0] * 255).round().long() // 64
    agree = (recomputed == y)[y != 255].float().mean()
    assert agree > 0.8


def test_full_crop_with_flip_is_an_exact_flip():
    images, masks = _batch(n=2)
    policy = JointPolicy(scale=(1, 1), ratio=(1, 1), hflip=1.0)
    x, y = joint_augment(images, masks, policy, torch.Generator().manual_seed(0))
    assert torch.allclose(x, images.flip(-1).float() / 255, atol=1e-5)
    assert torch.equal(y, masks.flip(-1))
    x, y = joint_augment(images, masks, JointPolicy(scale=(1, 1), ratio=(1, 1), hflip=0,
                                                    vflip=1.0))
    assert torch.equal(y, masks.flip(-2))


def test_ignore_index_and_classes_survive_nearest():
    images, masks = _batch()
    masks[:, :4] = 255  # already ignored pixels stay 255, no new values appear
    _, y = joint_augment(images, masks, GEOMETRY, torch.Generator().manual_seed(5))
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_photometric_changes_the_image_only_and_seeds_repeat():
    images, masks = _batch()
    colour = JointPolicy(scale=(0.5, 1), brightness=0.4, contrast=0.4, saturation=0.4)
    plain = JointPolicy(scale=(0.5, 1))
    x1, y1 = joint_augment(images, masks, colour, torch.Generator().manual_seed(7))
    x2, y2 = joint_augment(images, masks, plain, torch.Generator().manual_seed(7))
    assert torch.equal(y1, y2) and not torch.allclose(x1, x2)
    assert x1.min() >= 0 and x1.max() <= 1
    x3, y3 = joint_augment(images, masks, colour, torch.Generator().manual_seed(7))
    assert torch.equal(x1, x3) and torch.equal(y1, y3)
    x4, _ = joint_augment(images, masks, colour, torch.Generator().manual_seed(8))
    assert not torch.equal(x1, x4)


def test_bad_shapes_and_policy():
    images, masks = _batch()
    with pytest.raises(ValueError, match="same N, H, W"):
        joint_augment(images, masks[:, :-1], GEOMETRY)
    with pytest.raises(ValueError, match="scale"):
        JointPolicy(scale=(1.0, 0.5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_batch_on_cuda():
    images, masks = _batch()
    g = torch.Generator(device="cuda").manual_seed(1)
    x, y = joint_augment(images.cuda(), masks.cuda(), GEOMETRY, g, image_mode="nearest")
    inside = y != 255
    assert torch.equal(((x[:, 0] * 255).round().long() // 64)[inside], y[inside])

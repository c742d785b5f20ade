"""GpuBatchTransform (issue #18): decode + RandomResizedCrop/flip or resize/centre crop on the
device. Runs on the CPU; the `gpu` tests check the nvJPEG path. Imports only torch,
torchvision, numpy and Pillow, so `bench/gpu_bench.sh` runs it on the GPU machine."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image
from torchvision.transforms import v2

from visionflow.core.errors import ConfigError, DataError
from visionflow.model.gpu_decode import (
    GpuBatchTransform,
    jpeg_frame,
    nvjpeg_can_decode,
    to_channels,
)

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with some texture: JPEG keeps it close to the original."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * xx / w, 255 * yy / h, 128 + 60 * np.sin(xx / 7 + yy / 11)], -1)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> torch.Tensor:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _batch(n: int = 6) -> list[torch.Tensor]:
    sizes = [(75, 100), (100, 75), (60, 90), (75, 100), (120, 80), (75, 100)]
    return [_encode(_photo(*sizes[i % len(sizes)], seed=i), quality=92) for i in range(n)]


def _transform(train: bool = True, device: str = "cpu", **kw) -> GpuBatchTransform:
    args = {"train": train, "size": 32, "resize_size": 36, "scale": SCALE, "ratio": RATIO,
            "hflip": True, "channels": 3, "device": torch.device(device), "seed": 7} | kw
    return GpuBatchTransform(**args)


def _formats() -> dict[str, torch.Tensor]:
    photo = _photo(48, 64, seed=3)
    # high byte: the grey image; low byte: noise (so dropping the high byte shows)
    low = np.random.default_rng(1).integers(0, 256, (48, 64), dtype=np.uint16)
    grey16 = (np.asarray(photo.convert("L"), dtype=np.uint16) * 256 + low).astype(np.uint16)
    return {"jpeg": _encode(photo, quality=95),
            "grey_jpeg": _encode(photo.convert("L"), quality=95),
            "cmyk_jpeg": _encode(photo.convert("CMYK"), quality=95),
            "progressive_jpeg": _encode(photo, quality=95, progressive=True),
            "png": _encode(photo, "PNG"),
            "rgba_png": _encode(photo.convert("RGBA"), "PNG"),
            "png16": _encode(Image.fromarray(grey16), "PNG")}


@pytest.mark.parametrize("crop_op", ["roi_align", "interpolate"])
def test_train_batch_shape_and_determinism_per_seed_epoch_step(crop_op):
    data = _batch()
    t = _transform(crop_op=crop_op)
    out = t(data, epoch=1, step=3)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.uint8 and out.device.type == "cpu"
    assert torch.equal(out, _transform(crop_op=crop_op)(data, epoch=1, step=3))
    assert not torch.equal(out, t(data, epoch=1, step=4))
    assert not torch.equal(out, t(data, epoch=2, step=3))
    assert not torch.equal(out, _transform(crop_op=crop_op, seed=8)(data, epoch=1, step=3))


def test_eval_equals_torchvision_resize_and_centre_crop():
    data = _batch()
    out = _transform(train=False, channels=3)(data, epoch=0, step=0)
    ref = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])
    want = torch.stack([ref(decode_image(d)) for d in data])
    assert out.shape == want.shape
    assert (out.int() - want.int()).abs().max() <= 1


def test_crop_boxes_respect_scale_and_ratio_and_stay_inside():
    t = _transform()
    shapes = [(375, 500), (500, 375), (64, 64), (120, 300)] * 500
    boxes, _ = t.sample_boxes(shapes, epoch=0, step=0)
    hw = torch.tensor(shapes, dtype=torch.float64)
    top, left, h, w = boxes.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= hw[:, 0]).all() and (left + w <= hw[:, 1]).all()
    # rounding w and h to whole pixels moves area and ratio by at most half a pixel each side
    area = (h * w) / (hw[:, 0] * hw[:, 1])
    area_lo = ((h - 0.5) * (w - 0.5)) / (hw[:, 0] * hw[:, 1])
    area_hi = ((h + 0.5) * (w + 0.5)) / (hw[:, 0] * hw[:, 1])
    assert (area_hi >= SCALE[0]).all() and (area_lo <= SCALE[1]).all()
    assert ((w + 0.5) / (h - 0.5) >= RATIO[0]).all() and ((w - 0.5) / (h + 0.5) <= RATIO[1]).all()
    assert area.min() < 0.15 and area.max() > 0.9  # the whole range is used
    # the same distribution as torchvision's RandomResizedCrop (scale uniform, ratio log-uniform)
    rrc = v2.RandomResizedCrop(32, scale=SCALE, ratio=RATIO)
    torch.manual_seed(0)
    img = torch.zeros(3, 375, 500, dtype=torch.uint8)
    ref = [rrc.make_params([img]) for _ in range(3000)]
    ref_area = np.mean([p["height"] * p["width"] / (375 * 500) for p in ref])
    ref_ratio = np.mean([p["width"] / p["height"] for p in ref])
    ours = t.sample_boxes([(375, 500)] * 3000, epoch=0, step=1)[0].double()
    assert abs((ours[:, 2] * ours[:, 3]).mean().item() / (375 * 500) - ref_area) < 0.02
    assert abs((ours[:, 3] / ours[:, 2]).mean().item() - ref_ratio) < 0.012


def test_crop_falls_back_to_the_centre_as_torchvision_does():
    t = _transform(scale=(0.9, 1.0))
    boxes, _ = t.sample_boxes([(10, 400), (400, 10)], epoch=0, step=0)
    # too wide: full height, width at the largest ratio, centred (and the transposed case)
    assert boxes.tolist() == [[0, 193, 10, 13], [193, 0, 13, 10]]


def test_flip_half_the_time_and_mirrors_the_same_crop():
    _, flips = _transform().sample_boxes([(75, 100)] * 4000, epoch=0, step=0)
    assert 0.46 < flips.double().mean().item() < 0.54
    assert not _transform(hflip=False).sample_boxes([(75, 100)] * 100, 0, 0)[1].any()
    data = _batch()
    flipped = _transform(hflip=True)(data, epoch=0, step=5)
    plain = _transform(hflip=False)(data, epoch=0, step=5)
    mask = _transform().sample_boxes([(1, 1)] * len(data), 0, 5)[1]
    assert 0 < mask.sum() < len(data), "choose a step with both flipped and plain samples"
    for i in range(len(data)):
        assert torch.equal(flipped[i], plain[i].flip(-1) if mask[i] else plain[i])


def test_roi_align_crops_match_torchvision_resized_crop():
    data = _batch()
    fast = _transform(crop_op="roi_align", hflip=False, size=48)(data, epoch=0, step=2)
    ref = _transform(crop_op="interpolate", hflip=False, size=48)(data, epoch=0, step=2)
    diff = (fast.float() - ref.float()).abs()
    assert diff.mean() < 1.0 and diff.max() < 12


def test_every_format_decodes_grey_cmyk_progressive_png_16bit():
    formats = _formats()
    assert {k: nvjpeg_can_decode(v) for k, v in formats.items()} == {
        "jpeg": True, "grey_jpeg": True, "cmyk_jpeg": False, "progressive_jpeg": True,
        "png": False, "rgba_png": False, "png16": False}
    assert jpeg_frame(formats["progressive_jpeg"])[0] == 0xC2
    t = _transform(train=False, size=48, resize_size=48)
    for channels in (3, 1):
        imgs = _transform(channels=channels).decode(list(formats.values()))
        for name, img in zip(formats, imgs, strict=True):
            assert img.dtype == torch.uint8 and img.shape == (channels, 48, 64), name
            pil = Image.open(io.BytesIO(formats[name].numpy().tobytes()))
            if pil.mode == "I;16":
                pil = Image.fromarray((np.asarray(pil) >> 8).astype(np.uint8))
            want = torch.from_numpy(np.array(pil.convert("RGB" if channels == 3 else "L")))
            got = img.permute(1, 2, 0)[..., 0] if channels == 1 else img.permute(1, 2, 0)
            assert (got.float() - want.float()).abs().mean() < 3, name
    assert t(list(formats.values()), 0, 0).shape == (7, 3, 48, 48)


def test_decode_threads_give_the_same_batch_and_the_same_errors():
    import pickle

    data = _batch()
    threaded = _transform(decode_threads=3)
    assert torch.equal(threaded(data, 0, 4), _transform()(data, 0, 4))
    assert threaded._pool is not None
    clone = pickle.loads(pickle.dumps(threaded))  # a DataLoader worker may get a copy
    assert clone._pool is None and torch.equal(clone(data, 0, 4), threaded(data, 0, 4))
    bad = data[:2] + [torch.tensor([1, 2, 3], dtype=torch.uint8)] + data[2:]
    with pytest.raises(DataError, match=r"^image 2 of the batch cannot be decoded"):
        threaded(bad, 0, 0)


def test_channel_conversions_grey_rgb_alpha_16bit():
    grey = torch.randint(0, 256, (1, 5, 6), dtype=torch.uint8)
    assert torch.equal(to_channels(grey, 3), grey.expand(3, -1, -1))
    rgb = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    assert torch.equal(to_channels(rgb, 1), v2.functional.rgb_to_grayscale(rgb))
    rgba = torch.cat([rgb, torch.zeros(1, 5, 6, dtype=torch.uint8)])
    assert torch.equal(to_channels(rgba, 3), rgb)
    wide = rgb.to(torch.int32) * 256 + 7  # a 16-bit image: its high byte is kept
    assert torch.equal(to_channels(wide.to(torch.uint16), 3), rgb)


def test_a_corrupt_image_raises_one_line_naming_its_index():
    data = _batch(3) + [torch.tensor([0xFF, 0xD8, 0xFF, 0x00, 1, 2], dtype=torch.uint8)]
    with pytest.raises(DataError, match=r"^image 3 of the batch cannot be decoded") as err:
        _transform()(data, 0, 0)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="image 1 of the batch: expected a 1-D uint8"):
        _transform()([data[0], data[1].float()], 0, 0)


def test_auto_crop_op_is_interpolate_on_the_cpu_roi_align_on_cuda():
    assert _transform().crop_op == "interpolate"
    assert _transform(device="cuda").crop_op == "roi_align"  # constructing touches no GPU


def test_nonsense_settings_are_one_line_config_errors():
    for kw, word in [({"scale": (0.5, 0.2)}, "scale"), ({"ratio": (0.0, 1.0)}, "ratio"),
                     ({"channels": 2}, "channels"), ({"size": 0}, "size"),
                     ({"crop_op": "nearest"}, "crop_op"),
                     ({"decode_threads": -1}, "decode_threads")]:
        with pytest.raises(ConfigError, match=word):
            _transform(**kw)


def test_step_seeds_differ_and_stay_63_bit():
    from visionflow.model.gpu_decode import step_seed

    seeds = {step_seed(s, e, k) for s in range(3) for e in range(3) for k in range(50)}
    assert len(seeds) == 450 and max(seeds) < 2**63 and step_seed(-1, 0, 0) >= 0
    assert math.isfinite(float(step_seed(0, 0, 0)))


@pytest.mark.gpu
@CUDA
def test_nvjpeg_decode_equals_the_cpu_decoder():
    data = _batch()
    gpu = _transform(device="cuda")
    imgs = gpu.decode(data)
    assert gpu.cpu_decoded == 0 and all(im.device.type == "cuda" for im in imgs)
    for im, d in zip(imgs, data, strict=True):
        assert (im.cpu().float() - decode_image(d).float()).abs().mean() < 1.5
    out = _transform(train=False, device="cuda")(data, 0, 0)
    ref = _transform(train=False)(data, 0, 0)
    assert (out.cpu().float() - ref.float()).abs().mean() < 1.5
    train = _transform(device="cuda")(data, 0, 0)
    assert train.device.type == "cuda" and train.shape == (6, 3, 32, 32)


@pytest.mark.gpu
@CUDA
def test_cuda_falls_back_to_the_cpu_for_cmyk_png_and_16bit():
    formats = _formats()
    gpu = _transform(device="cuda", train=False, size=48, resize_size=48)
    out = gpu(list(formats.values()), 0, 0)
    assert gpu.cpu_decoded == 4  # cmyk, png, rgba png, 16-bit png
    ref = _transform(train=False, size=48, resize_size=48)(list(formats.values()), 0, 0)
    assert out.device.type == "cuda"
    assert (out.cpu().float() - ref.float()).abs().mean() < 2


@pytest.mark.gpu
@CUDA
def test_cuda_without_nvjpeg_decodes_on_cpu_threads():
    data = _batch()
    gpu = _transform(device="cuda", train=False, nvjpeg=False, decode_threads=2)
    out = gpu(data, 0, 0)
    assert gpu.cpu_decoded == len(data) and out.device.type == "cuda"
    ref = _transform(train=False)(data, 0, 0)
    assert (out.cpu().float() - ref.float()).abs().mean() < 1.0


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("crop_op", ["roi_align", "interpolate"])
def test_cuda_crops_equal_the_cpu_crops(crop_op):
    decoded = _transform().decode(_batch())
    cpu = _transform(crop_op=crop_op).crop(decoded, epoch=3, step=1)
    gpu = _transform(crop_op=crop_op, device="cuda").crop([d.cuda() for d in decoded], 3, 1)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 1.0

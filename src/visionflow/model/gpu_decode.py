"""Encoded images -> a uint8 N x C x S x S batch on the training device (issue #18).

On CUDA the JPEGs nvJPEG can take (8-bit, 1 or 3 components, sequential or progressive) are
decoded in one batched `torchvision.io.decode_jpeg(..., device=cuda)` call; everything else
(PNG, 16-bit PNG, CMYK JPEG, whatever nvJPEG rejects) goes through the CPU decoder
(`torchvision.io.decode_image`) and is moved over, never a crash. On the CPU, the CPU decoder
for all. Then on the device, without per-pixel Python:

- train: per-sample RandomResizedCrop (torchvision's sampling of scale and log-ratio, 10 tries,
  then the centre fallback) and a horizontal flip with p=0.5, drawn from a `torch.Generator`
  seeded by (seed, epoch, step), so a resumed epoch sees the same crops;
- eval: resize the shorter side to `resize_size` (antialias) and centre crop `size`, as
  torchvision's classification references do.

Crops are resized by one `v2.functional.resized_crop` per image (`crop_op="interpolate"`,
exactly v2's antialiased bilinear) or by `torchvision.ops.roi_align` batched over the images
of the same size (`crop_op="roi_align"`, adaptive sampling: an area average when shrinking,
bilinear when enlarging; one kernel per size group instead of a few per image). `"auto"`:
interpolate on the CPU, where `bench/bench_gpu_decode.py` measured it several times faster
than roi_align; roi_align on CUDA, to be confirmed by `bench/gpu_scale.py` (b vs b_interpolate).
Images of many sizes make one roi_align call per distinct size (no worse than one
resized_crop each). EXIF orientation is not read: pack stores EXIF-turned photos upright.
`nvjpeg=False` decodes everything on the CPU (then crops on the device); `decode_threads`
runs the CPU decoder in that many threads (it releases the GIL).
Torch and torchvision only: it runs on the GPU machine.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from visionflow.core.errors import ConfigError, DataError, one_line

_TRIES = 10  # RandomResizedCrop's attempts before its centre-crop fallback
_NVJPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
_MASK64 = (1 << 64) - 1


def jpeg_frame(data: torch.Tensor) -> tuple[int, int, int] | None:
    """(SOF marker, sample precision, components) of a JPEG byte tensor; None when the bytes
    are not a JPEG or no frame header is found (the CPU decoder then has the last word)."""
    buf = memoryview(data.numpy())
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            return None
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (marker, buf[pos + 4], buf[pos + 9]) if pos + 10 <= n else None
        pos += 2 + (buf[pos + 2] << 8 | buf[pos + 3])
    return None


def nvjpeg_can_decode(data: torch.Tensor) -> bool:
    """An 8-bit grey or YCbCr JPEG, sequential or progressive: what goes to the GPU decoder."""
    frame = jpeg_frame(data)
    return frame is not None and frame[0] in _NVJPEG_FRAMES and frame[1] == 8 and frame[2] in (1, 3)


def step_seed(seed: int, epoch: int, step: int) -> int:
    """One 63-bit generator seed per (seed, epoch, step) (splitmix64 of the three)."""
    x = 0
    for part in (seed, epoch, step):
        x = (x ^ (part & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


def to_channels(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 C x H x W with `channels` channels: 16-bit scaled down, grey expanded to RGB,
    RGB to grey (ITU-R 601 weights, as v2.Grayscale), alpha dropped."""
    if img.dtype != torch.uint8:
        img = TF.to_dtype(img, torch.uint8, scale=True)
    if img.shape[0] in (2, 4):  # grey+alpha, RGBA
        img = img[: img.shape[0] - 1]
    if img.shape[0] == channels:
        return img
    if channels == 3:
        return img.expand(3, -1, -1).contiguous()
    return TF.rgb_to_grayscale(img)


class GpuBatchTransform:
    """`transform(encoded, epoch, step)` -> uint8 N x channels x size x size on `device`."""

    def __init__(self, train: bool, size: int, resize_size: int,
                 scale: tuple[float, float], ratio: tuple[float, float], hflip: bool,
                 channels: int, device: torch.device, seed: int,
                 crop_op: str = "auto", nvjpeg: bool = True, decode_threads: int = 0) -> None:
        if size < 1 or resize_size < 1:
            raise ConfigError(f"image sizes must be >= 1: size={size}, resize_size={resize_size}")
        if not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"crop scale must satisfy 0 < min <= max: {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"crop ratio must satisfy 0 < min <= max: {tuple(ratio)}")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, not {channels}")
        if decode_threads < 0:
            raise ConfigError(f"decode_threads must be >= 0, not {decode_threads}")
        if crop_op not in ("auto", "roi_align", "interpolate"):
            raise ConfigError(f"crop_op must be auto, roi_align or interpolate, not {crop_op!r}")
        self.train, self.size, self.resize_size = train, size, resize_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip, self.channels, self.seed, self.crop_op = hflip, channels, seed, crop_op
        self.device = torch.device(device)
        if crop_op == "auto":
            self.crop_op = "interpolate" if self.device.type == "cpu" else "roi_align"
        self.mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        self.nvjpeg, self.decode_threads = nvjpeg, decode_threads
        self._pool: ThreadPoolExecutor | None = None  # made on first use, never pickled
        self.cpu_decoded = 0  # images the CPU decoder took on a CUDA device (for the bench)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_pool"} | {"_pool": None}

    def __call__(self, encoded: list[torch.Tensor], epoch: int, step: int) -> torch.Tensor:
        return self.crop(self.decode(encoded), epoch, step)

    def crop(self, images: list[torch.Tensor], epoch: int, step: int) -> torch.Tensor:
        """Decoded uint8 C x H x W images (on the device) -> the batch: train crops and flips,
        or eval resize + centre crop."""
        out = torch.empty((len(images), self.channels, self.size, self.size),
                          dtype=torch.uint8, device=self.device)
        if not self.train:
            for idx, group in _same_size_groups(images):
                batch = TF.resize(group, [self.resize_size], antialias=True)
                out[idx] = TF.center_crop(batch, [self.size, self.size])
            return out
        boxes, flips = self.sample_boxes([tuple(im.shape[-2:]) for im in images], epoch, step)
        if self.crop_op == "interpolate":
            for i, (im, (top, left, h, w)) in enumerate(zip(images, boxes.tolist(), strict=True)):
                out[i] = TF.resized_crop(im, top, left, h, w, [self.size, self.size],
                                         antialias=True)
        else:
            for idx, group in _same_size_groups(images):
                out[idx] = self._roi_crops(group, boxes[idx])
        if flips.any():
            flips = flips.to(self.device)[:, None, None, None]
            out = torch.where(flips, out.flip(-1), out)
        return out

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image as uint8 channels x H x W on the device, in the order given."""
        for i, data in enumerate(encoded):
            if data.dtype != torch.uint8 or data.dim() != 1 or data.device.type != "cpu":
                raise DataError(f"image {i} of the batch: expected a 1-D uint8 CPU tensor of "
                                f"encoded bytes, got {data.dtype} {tuple(data.shape)} on "
                                f"{data.device}")
        images: list[torch.Tensor | None] = [None] * len(encoded)
        if self.device.type == "cuda" and self.nvjpeg:
            on_gpu = [i for i, data in enumerate(encoded) if nvjpeg_can_decode(data)]
            if on_gpu:
                for i, img in zip(on_gpu, self._nvjpeg([encoded[i] for i in on_gpu]),
                                  strict=True):
                    images[i] = img
        rest = [i for i, img in enumerate(images) if img is None]
        if self.device.type == "cuda":
            self.cpu_decoded += len(rest)
        if self.decode_threads and len(rest) > 1:  # the decoder releases the GIL
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.decode_threads, "decode")
            decoded = self._pool.map(self._decode_cpu, [encoded[i] for i in rest], rest)
        else:
            decoded = map(self._decode_cpu, [encoded[i] for i in rest], rest)
        for i, img in zip(rest, decoded, strict=True):
            images[i] = img.to(self.device, non_blocking=True)
        return [to_channels(img, self.channels) for img in images]  # type: ignore[arg-type]

    def sample_boxes(self, shapes: list[tuple[int, int]], epoch: int,
                     step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RandomResizedCrop boxes (N x 4 int64: top, left, height, width) and flips (N bool)
        for images of the given (H, W), drawn as torchvision does from (seed, epoch, step)."""
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch, step))
        n = len(shapes)
        f64 = torch.float64
        hw = torch.tensor(shapes, dtype=f64).reshape(n, 2)
        H, W = hw[:, 0], hw[:, 1]
        u_scale = torch.rand(n, _TRIES, generator=g, dtype=f64)
        u_ratio = torch.rand(n, _TRIES, generator=g, dtype=f64)
        u_top = torch.rand(n, generator=g, dtype=f64)
        u_left = torch.rand(n, generator=g, dtype=f64)
        flips = torch.rand(n, generator=g) < 0.5
        if not (self.hflip and self.train):
            flips = torch.zeros(n, dtype=torch.bool)
        (s0, s1), (r0, r1) = self.scale, self.ratio
        target = (H * W)[:, None] * (s0 + (s1 - s0) * u_scale)
        aspect = torch.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * u_ratio)
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
        found = ok.any(1)
        # torchvision's fallback: the whole image, or its centre at the nearest allowed ratio
        in_ratio = W / H
        fb_w = torch.where(in_ratio > r1, torch.round(H * r1), W)
        fb_h = torch.where(in_ratio < r0, torch.round(W / r0), H)
        crop_w = torch.where(found, w.gather(1, first)[:, 0], fb_w)
        crop_h = torch.where(found, h.gather(1, first)[:, 0], fb_h)
        top = torch.where(found, torch.floor(u_top * (H - crop_h + 1)),
                          torch.div(H - crop_h, 2, rounding_mode="floor"))
        left = torch.where(found, torch.floor(u_left * (W - crop_w + 1)),
                           torch.div(W - crop_w, 2, rounding_mode="floor"))
        boxes = torch.stack([top, left, crop_h, crop_w], 1).to(torch.int64)
        return boxes, flips

    def _nvjpeg(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Batched GPU decode; if the batch fails, each image alone, None for the ones the
        GPU decoder rejects (the CPU decoder takes them)."""
        try:
            return list(decode_jpeg(data, mode=self.mode, device=self.device))
        except RuntimeError:
            pass
        images: list[torch.Tensor | None] = []
        for one in data:
            try:
                images.append(decode_jpeg(one, mode=self.mode, device=self.device))
            except RuntimeError:
                images.append(None)
        return images

    def _decode_cpu(self, data: torch.Tensor, index: int) -> torch.Tensor:
        try:
            return decode_image(data, mode=self.mode)
        except (RuntimeError, ValueError) as err:
            why = re.sub(r"^\w+, \S+:\d+, ", "", one_line(err))  # torchvision's C++ location
            raise DataError(f"image {index} of the batch cannot be decoded: {why}") from None

    def _roi_crops(self, group: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One roi_align call for same-size images: box (top, left, h, w) -> size x size."""
        top, left, h, w = boxes.to(torch.float32).unbind(1)
        rois = torch.stack([torch.arange(len(boxes), dtype=torch.float32), left, top,
                            left + w, top + h], 1).to(self.device)
        crops = roi_align(group.to(torch.float32), rois, output_size=self.size,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        return crops.round_().clamp_(0, 255).to(torch.uint8)


def _same_size_groups(images: list[torch.Tensor]):
    """(indices, stacked images) per distinct image size, indices as a CPU tensor."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(i)
    for idx in by_shape.values():
        yield torch.tensor(idx), torch.stack([images[i] for i in idx])

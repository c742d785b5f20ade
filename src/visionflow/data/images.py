"""Decoding one image the way every consumer sees it (training cache, validation, serving).

Only the standard library, numpy and (lazily) Pillow are imported here, so the module loads
fast, works in worker processes, and is all the served model needs of `data/`.

Image normalisation (`load_image`, `decode_resized`):
  * EXIF orientation is applied (`ImageOps.exif_transpose`);
  * the first frame of animated images is used;
  * alpha (RGBA, LA, PA, palette transparency) is composited on black,
    i.e. colours are multiplied by alpha and the alpha channel is dropped;
  * 16/32-bit integer images are scaled to 8 bits (65535 -> 255), float images
    in 0..1 are scaled by 255; CMYK, YCbCr, palette, 1-bit ... go to RGB;
  * the result is RGB (channels=3) or L (channels=1, ITU-R 601 luma).
Input files are only ever read, never modified or deleted.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from visionflow.core.errors import DataError, one_line

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Pillow plugins we open (JPEG also yields "MPO", Pillow's name for many camera JPEGs);
# others (EPS, PSD, ...) are refused as not_an_image.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# name endings of those formats, and of files that are never images: a folder holding
# neither these images nor a file whose header Pillow knows holds no images
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib",
                            ".gif", ".tif", ".tiff"})
NOT_IMAGE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".sh", ".bat", ".ps1", ".txt", ".md",
                                ".rst", ".log", ".json", ".yaml", ".yml", ".xml", ".csv", ".tsv",
                                ".toml", ".cfg", ".ini", ".ipynb", ".html", ".pdf", ".iml",
                                ".lock", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".pkl"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS
REASONS = (
    "zero_byte",
    "not_an_image",
    "truncated",
    "undecodable",
    "too_small",
    "decompression_bomb",
)
READ_WHOLE_BELOW = 64 << 20  # files smaller than this are read into memory once


class ImageProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def looks_like_image(path: str | Path) -> bool:
    """An image by its name ending, or (unknown ending) by a header Pillow recognises."""
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix in NOT_IMAGE_SUFFIXES:
        return False
    from PIL import Image

    try:
        with Image.open(path, formats=_open_formats()):
            return True
    except Exception:  # noqa: BLE001 (anything Pillow cannot open is not an image here)
        return False


@cache
def _open_formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)  # e.g. WEBP may be missing


@contextmanager
def _pillow_guard(max_pixels: int) -> Iterator[None]:
    """Pillow limits for one decode. Mutates Pillow globals: not thread-safe."""
    from PIL import Image, ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def open_loaded(
    source: Path | io.BytesIO, max_pixels: int, draft: int | None = None
) -> PILImage.Image:
    """Open and fully decode the first frame; raise ImageProblem on failure."""
    from PIL import Image, UnidentifiedImageError

    with _pillow_guard(max_pixels):
        try:
            img = Image.open(source, formats=_open_formats())
        except UnidentifiedImageError:
            raise ImageProblem(
                "not_an_image", f"not a supported image ({', '.join(FORMATS)})"
            ) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageProblem("decompression_bomb", one_line(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # a recognised header that ends early is truncated, anything else is not an image
            cut = isinstance(e, EOFError) or "truncat" in str(e).lower()
            raise ImageProblem("truncated" if cut else "not_an_image", one_line(e)) from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageProblem(
                "decompression_bomb",
                f"image size {w}x{h} ({w * h} pixels) exceeds max_pixels={max_pixels}",
            )
        if w <= 0 or h <= 0:
            raise ImageProblem("undecodable", f"invalid image size {w}x{h}")
        if draft and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
            img.draft(img.mode, (draft, draft))  # DCT downscale, keeps size >= draft
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageProblem("decompression_bomb", one_line(e)) from None
        except EOFError as e:
            raise ImageProblem("truncated", one_line(e) or "unexpected end of file") from None
        except (OSError, SyntaxError, ValueError, TypeError, IndexError, zlib.error) as e:
            reason = "truncated" if "truncat" in str(e).lower() else "undecodable"
            raise ImageProblem(reason, one_line(e)) from None
        except MemoryError:
            raise ImageProblem("undecodable", "out of memory while decoding") from None
    return img


def _to_8bit(img: PILImage.Image) -> PILImage.Image:
    """High bit-depth single-channel modes (I;16*, I, F) -> L, scaled not clipped."""
    from PIL import Image

    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if np.nanmax(arr, initial=0) <= 1.0 else arr
    elif img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        arr = arr.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


# where Pillow's getexif() finds an orientation (TIFF keeps it in its own tags)
_ORIENTATION_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")


def turned_by_exif(data: bytes) -> bool:
    """Whether `normalise` turns or mirrors these image bytes (an EXIF or XMP orientation
    other than 1: portrait phone photos), so they are not stored as they are displayed."""
    from PIL import ExifTags, Image

    with suppress(Exception), Image.open(io.BytesIO(data)) as img:
        if any(k in img.info for k in _ORIENTATION_KEYS):
            return img.getexif().get(ExifTags.Base.Orientation, 1) != 1
    return False


def normalise(img: PILImage.Image, channels: int) -> PILImage.Image:
    from PIL import Image, ImageOps

    if img.format == "TIFF" or any(k in img.info for k in _ORIENTATION_KEYS):
        with suppress(Exception):  # broken EXIF: keep the pixels as stored
            img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        img = _to_8bit(img)
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("RGBa", "La"):  # premultiplied alpha
        img = img.convert("RGBA" if mode == "RGBa" else "LA")
    if img.mode in ("RGBA", "LA"):
        # composite on black: colour * alpha / 255, alpha dropped
        base, alpha = img.convert("RGB" if img.mode == "RGBA" else "L"), img.getchannel("A")
        img = Image.composite(base, Image.new(base.mode, base.size, 0), alpha)
    want = "L" if channels == 1 else "RGB"
    if img.mode != want:
        img = img.convert(want)
    return img


_LEVELS = np.arange(256, dtype=np.float64) / 255.0


def channel_stats(img: PILImage.Image) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in 0..1 from the (C-computed) histogram."""
    hist = np.asarray(img.histogram(), dtype=np.float64).reshape(-1, 256)
    n = hist.sum(axis=1)
    mean = hist @ _LEVELS / n
    var = np.maximum(hist @ (_LEVELS**2) / n - mean**2, 0.0)
    return (
        tuple(round(float(v), 6) for v in mean),
        tuple(round(float(v), 6) for v in np.sqrt(var)),
    )


def check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3: {channels}")


ImageSource = Path | str | bytes | bytearray | memoryview | IO[bytes]


def _decode(src: ImageSource, channels: int, max_pixels: int, draft: int | None = None) -> Any:
    """Normalised image or DataError naming the file and the reason code."""
    check_channels(channels)
    name: Any = ""  # bytes have no name: their caller says which image they are
    try:
        if isinstance(src, bytes | bytearray | memoryview):
            data: bytes | None = bytes(src)
        elif isinstance(src, str | os.PathLike):
            src = name = Path(src)
            # read small files at once: no file handle stays open with the image
            size = src.stat().st_size
            data = src.read_bytes() if size < READ_WHOLE_BELOW else None
        else:  # a binary stream, e.g. an upload
            name = getattr(src, "name", "<stream>")
            data = src.read()
        if data is not None and not data:
            raise ImageProblem("zero_byte", "file is empty")
        source = io.BytesIO(data) if data is not None else src
        return normalise(open_loaded(source, max_pixels, draft), channels)
    except ImageProblem as p:
        raise DataError(f"cannot load image{_named(name)}: {p.reason} ({p.detail})") from None
    except OSError as e:
        raise DataError(f"cannot read image{_named(name)}: {one_line(e)}") from None
    except (ValueError, SyntaxError, TypeError) as e:
        raise DataError(f"cannot load image{_named(name)}: undecodable ({one_line(e)})"
                        ) from None


def _named(name: Any) -> str:
    return f" {name}" if name else ""


def load_image(
    path: ImageSource, channels: int = 3, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PILImage.Image:
    """Decode a file (or bytes / binary stream) to a normalised RGB or L image."""
    return _decode(path, channels, max_pixels)


def decode_resized(
    path: ImageSource, size: int, channels: int = 3, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Normalised image resized to size x size (bilinear, antialiased) as uint8 (C, H, W).

    `path` may also be bytes or a binary stream (serving). Non-square images are
    stretched (aspect ratio not kept), as in the training cache.
    """
    from PIL import Image

    if size <= 0:
        raise DataError(f"image size must be positive: {size}")
    img = _decode(path, channels, max_pixels, draft=size)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def eval_crop(chw: np.ndarray, size: int, resize: int) -> np.ndarray:
    """Resize the shorter side to `resize`, then centre crop size x size: the evaluation
    transform of shard-trained models (torchvision's, as `data.stream` applies it)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    t = TF.resize(torch.from_numpy(np.ascontiguousarray(chw)), [resize], antialias=True)
    return TF.center_crop(t, [size, size]).numpy()


def decode_eval(path: ImageSource, size: int, channels: int = 3, resize: int | None = None,
                *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An image as the model was evaluated on it: stretched to size x size (tensor-cache
    models, `resize` None) or resized and centre-cropped (shard-trained models)."""
    if resize is None:
        return decode_resized(path, size, channels, max_pixels=max_pixels)
    arr = np.asarray(_decode(path, channels, max_pixels), dtype=np.uint8)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return eval_crop(arr, size, resize)

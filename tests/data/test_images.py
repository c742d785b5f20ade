"""Decoding and inspecting images: the defective-input catalogue, every format, EXIF,
alpha, bit depth, bombs; inputs never modified."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from builders import catalogue_files, encode, snapshot
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.data import image_checks, images


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict[str, Path]:
    return catalogue_files(tmp_path_factory.mktemp("catalogue"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero.jpg", "zero_byte"),
        ("text.jpg", "not_an_image"),
        ("random.png", "not_an_image"),
        ("ok.ppm", "not_an_image"),
        ("truncated.jpg", "truncated"),
        ("truncated_header.jpg", "truncated"),
        ("truncated.png", "truncated"),
        ("broken_stream.png", "undecodable"),
        ("bomb.png", "decompression_bomb"),
    ],
)
def test_defective_files_get_a_reason(catalogue, name, reason):
    info = image_checks.inspect_image(catalogue[name], 3, min_width=8, min_height=8)
    assert info.reason == reason
    assert not info.decodable
    assert info.error and "\n" not in info.error
    assert info.bytes == catalogue[name].stat().st_size
    with pytest.raises(DataError, match=name):
        images.load_image(catalogue[name])


def test_too_small_is_decodable_but_flagged(catalogue):
    info = image_checks.inspect_image(catalogue["small.png"], 3, min_width=8, min_height=8)
    assert (info.decodable, info.reason, info.width, info.height) == (True, "too_small", 4, 4)
    assert image_checks.inspect_image(catalogue["small.png"]).reason is None  # default limits


def test_max_pixels_limit(catalogue):
    info = image_checks.inspect_image(catalogue["ok.png"], max_pixels=100)
    assert info.reason == "decompression_bomb"
    assert "40x30" in info.error or "1200" in info.error
    assert image_checks.inspect_image(catalogue["ok.png"]).reason is None


def test_good_file_info(catalogue):
    info = image_checks.inspect_image(catalogue["ok.png"])
    data = catalogue["ok.png"].read_bytes()
    assert info.ok and info.decodable
    assert (info.width, info.height, info.mode, info.format) == (40, 30, "RGB", "PNG")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    arr = np.asarray(Image.open(catalogue["ok.png"]), dtype=np.float64) / 255
    assert np.allclose(info.mean, arr.reshape(-1, 3).mean(0), atol=1e-5)
    assert np.allclose(info.std, arr.reshape(-1, 3).std(0), atol=1e-5)
    gray = image_checks.inspect_image(catalogue["ok.png"], channels=1)
    assert len(gray.mean) == 1 and len(gray.std) == 1


def test_cmyk_jpeg_to_rgb(catalogue):
    info = image_checks.inspect_image(catalogue["cmyk.jpg"])
    assert info.ok and info.mode == "CMYK"
    img = images.load_image(catalogue["cmyk.jpg"])
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_palette_transparency_composited_on_black(catalogue):
    assert image_checks.inspect_image(catalogue["palette.png"]).mode == "P"
    img = images.load_image(catalogue["palette.png"])
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (0, 0, 0)  # transparent -> black
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_scaled_not_clipped(catalogue):
    info = image_checks.inspect_image(catalogue["sixteen.png"])
    assert info.ok and info.mode.startswith("I")
    arr = np.asarray(images.load_image(catalogue["sixteen.png"], channels=1))
    assert arr.dtype == np.uint8
    assert arr[0].tolist() == [0, 128, 255, 255]


def test_alpha_composited_on_black(catalogue):
    (la,) = set(images.load_image(catalogue["la.png"], channels=1).getdata())
    assert abs(la - 200 * 128 / 255) <= 1.5
    r, g, b = images.load_image(catalogue["rgba.png"]).getpixel((3, 3))
    assert abs(r - 100) <= 1.5 and abs(g - 50) <= 1.5 and abs(b - 25) <= 1.5


def test_animated_gif_first_frame(catalogue):
    info = image_checks.inspect_image(catalogue["anim.gif"])
    assert info.ok and info.format == "GIF" and info.frames == 2
    r, g, b = images.load_image(catalogue["anim.gif"]).getpixel((4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_applied(catalogue):
    assert Image.open(catalogue["rotated.jpg"]).size == (40, 20)
    assert images.load_image(catalogue["rotated.jpg"]).size == (20, 40)
    info = image_checks.inspect_image(catalogue["rotated.jpg"])
    assert (info.width, info.height) == (20, 40)
    assert images.decode_resized(catalogue["rotated.jpg"], 16, 3).shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("name", "fmt"), [("image.bmp", "BMP"), ("image.tiff", "TIFF"), ("image.webp", "WEBP")]
)
def test_other_formats(catalogue, name, fmt):
    if name not in catalogue:
        pytest.skip("Pillow built without WebP")
    info = image_checks.inspect_image(catalogue[name])
    assert info.ok and info.format == fmt and (info.width, info.height) == (12, 10)
    expected = np.asarray(Image.open(catalogue[name]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(
        np.asarray(images.load_image(catalogue[name])).transpose(2, 0, 1), expected
    )
    assert images.decode_resized(catalogue[name], 12, 3).shape == (3, 12, 12)  # stretched


def test_decode_resized_shapes(catalogue):
    arr = images.decode_resized(catalogue["ok.png"], 32, 3)
    assert arr.shape == (3, 32, 32) and arr.dtype == np.uint8 and arr.flags.c_contiguous
    assert images.decode_resized(catalogue["ok.png"], 8, 1).shape == (1, 8, 8)
    same = images.decode_resized(catalogue["small.png"], 4, 3)  # no resize needed
    assert np.array_equal(same, np.asarray(Image.open(catalogue["small.png"])).transpose(2, 0, 1))
    with pytest.raises(DataError, match="channels"):
        images.decode_resized(catalogue["ok.png"], 8, 2)


def test_decode_from_bytes_and_streams(catalogue):
    data = catalogue["rotated.jpg"].read_bytes()
    from_file = images.decode_resized(catalogue["rotated.jpg"], 16, 3)
    assert np.array_equal(images.decode_resized(data, 16, 3), from_file)
    assert np.array_equal(images.decode_resized(io.BytesIO(data), 16, 3), from_file)
    assert images.load_image(io.BytesIO(data)).size == (20, 40)
    with pytest.raises(DataError, match="zero_byte"):
        images.decode_resized(io.BytesIO(b""), 16, 3)
    with pytest.raises(DataError, match="not_an_image"):
        images.decode_resized(b"hello", 16, 3)


def test_inputs_never_modified(tmp_path):
    files = catalogue_files(tmp_path / "in")
    before = snapshot(tmp_path)
    paths = sorted(files.values())
    infos = image_checks.inspect_many(paths, 3, workers=1, min_width=8, min_height=8)
    for p in paths:
        try:
            images.load_image(p)
            images.decode_resized(p, 16, 1)
        except DataError:
            pass
    assert snapshot(tmp_path) == before
    assert [i.path for i in infos] == [str(p) for p in paths]


def test_inspect_many_pool_keeps_order(tmp_path):
    png = encode(Image.new("L", (9, 9), 7), "PNG")
    paths = []
    for i in range(520):  # above the in-process threshold
        p = tmp_path / f"{i:04d}.png"
        p.write_bytes(png if i % 100 else b"")
        paths.append(p)
    paths.reverse()
    infos = image_checks.inspect_many(paths, 1, workers=2, min_width=8, min_height=8)
    assert [i.path for i in infos] == [str(p) for p in paths]
    assert Counter(i.reason for i in infos) == {None: 514, "zero_byte": 6}



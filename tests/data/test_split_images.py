"""Issue #18, every consumer streams: evaluate, compress and register read a shards-mode
split through `SplitImages`, one batch at a time, never the whole split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data.feed import with_images
from visionflow.data.shards import pack_split, read_contents
from visionflow.data.split_images import SplitImages
from visionflow.data.stream import ShardStream, View
from visionflow.model.inference import model_logits

CLASSES = ["ants", "bees"]
VIEW = View(24, 28)


def packed(root: Path, n: int) -> tuple[Layout, dict]:
    """A project whose test split is `n` packed JPEGs, and its shards-mode cache."""
    rng = np.random.default_rng(n)
    rows = []
    for i in range(n):
        label = CLASSES[i % 2]
        path = root / "src" / label / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = (40, 30) if i % 3 else (30, 44)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"path": f"{label}/{i:04d}.jpg", "label": label, "format": "JPEG",
                     "mode": "RGB", "width": w, "height": h,
                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    layout = Layout.at(root)
    pack_split(rows, root / "src", layout.split_shards("test"), CLASSES, max_side=64,
               channels=3, shard_bytes=1 << 16, workers=1)
    order = read_contents(layout.split_shards("test"))["samples"]
    labels = torch.tensor([CLASSES.index(r["label"]) for r in order])
    cache = {"storage": "shards", "classes": CLASSES, "image_size": VIEW.size,
             "resize_size": VIEW.resize, "channels": 3, "test_y": labels}
    return layout, cache


def decoded(layout: Layout) -> torch.Tensor:
    stream = ShardStream(layout.split_shards("test"), "test", VIEW, batch_size=64,
                         workers=0, shuffle=False, drop_last=False)
    return torch.cat([x for x, _ in stream.epoch()])


@pytest.mark.parametrize("n", [40, 160])
def test_inference_reads_one_batch_at_a_time(tmp_path: Path, n: int):
    layout, cache = packed(tmp_path, n)
    cache = with_images(layout, cache, ("test",), cache_bytes=2**30, batch_size=16)
    images = cache["test_x"]
    assert isinstance(images, SplitImages) and images.passes == 0  # nothing read yet
    assert images.shape == (n, 3, 24, 24) and len(images) == n

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 2))
    streamed = model_logits(net, images, batch_size=16)
    whole = model_logits(net, decoded(layout), batch_size=16)
    assert torch.allclose(streamed, whole, atol=1e-5)
    # one pass, at most one stream batch held, whatever the split's size
    assert images.passes == 1 and images.peak_images <= 16


def test_a_subset_is_gathered_in_one_pass(tmp_path: Path):
    layout, cache = packed(tmp_path, 50)
    images = with_images(layout, cache, ("test",), cache_bytes=2**30, batch_size=8)["test_x"]
    idx = torch.tensor([41, 3, 3, 17, 0])
    assert torch.equal(images[idx], decoded(layout)[idx])
    assert images.passes == 1 and images.peak_images <= 8
    assert torch.equal(images[10:13], decoded(layout)[10:13])


def test_shards_that_no_longer_match_the_cache_stop_the_stage(tmp_path: Path):
    layout, cache = packed(tmp_path, 20)
    cache["test_y"] = 1 - cache["test_y"]
    images = with_images(layout, cache, ("test",), cache_bytes=2**30, batch_size=8)["test_x"]
    with pytest.raises(DataError, match="the test shards do not match the packed data"):
        images[0:8]

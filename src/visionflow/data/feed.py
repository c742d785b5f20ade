"""What a consumer reads from the pack stage: the tensor cache, or streams of the shards.

`training_feed` gives the train stage its images: in tensor mode the cache's tensors (as
before); in shards mode a `ShardStream` of the train split (RandomResizedCrop + flip per
sample, in DataLoader workers) plus a small sample of train images for the channel statistics
and a `fast` net's whitening, and the val split as an evaluation stream. `eval_stream` is the
resize + centre-crop stream of one split that evaluation, compression and the gate read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from visionflow.core.config import Params
from visionflow.core.errors import DataError
from visionflow.core.layout import Layout
from visionflow.data.stream import ShardStream, View

STATS_IMAGES = 512  # shards: train images (eval view) for channel statistics and whitening


def is_shards(cache: dict[str, Any]) -> bool:
    return cache.get("storage") == "shards"


def eval_view(cache: dict[str, Any]) -> View:
    return View(cache["image_size"], cache["resize_size"], cache["channels"])


def eval_stream(layout: Layout, cache: dict[str, Any], split: str, batch_size: int,
                workers: int) -> ShardStream:
    """One split in shard order, evaluation view, every sample once."""
    return ShardStream(layout.split_shards(split), split, eval_view(cache),
                       batch_size=batch_size, workers=workers, shuffle=False, drop_last=False)


@dataclass
class Feed:
    sample_x: torch.Tensor  # tensor mode: the whole train split
    sample_y: torch.Tensor
    stream: ShardStream | None = None
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    val_stream: ShardStream | None = None

    @property
    def has_val(self) -> bool:
        return self.val_stream is not None or self.val_x is not None

    def policy(self, augment: Any) -> Any:
        """The device-side policy: in shards mode the loader has flipped already."""
        if self.stream is None:
            return augment
        return augment.model_copy(update={"hflip": 0.0, "alternate_flip": False})


def tensor_feed(cache: dict[str, Any], device: torch.device, main: bool) -> Feed:
    val_x = cache["val_x"].to(device) if main and len(cache["val_x"]) else None
    return Feed(cache["train_x"], cache["train_y"], val_x=val_x,
                val_y=cache["val_y"].to(device) if val_x is not None else None)


def training_feed(params: Params, layout: Layout, cache: dict[str, Any], *, main: bool,
                  raw: bool = False) -> Feed:
    """Shards mode: the train stream (`raw`: encoded, for the GPU decoder), a stats sample
    and, on the main rank, the val stream."""
    d, size = params.data, cache["image_size"]
    view = View(size, cache["resize_size"], cache["channels"], train=True,
                crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio),
                hflip=params.augment.hflip, raw=raw)
    stream = ShardStream(layout.split_shards("train"), "train", view,
                         batch_size=params.train.batch_size, workers=d.workers,
                         seed=params.seed)
    sample = eval_stream(layout, cache, "train", 128, 0)
    xs, ys, have = [], [], 0
    for x, y in sample.epoch():
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= STATS_IMAGES:
            break
    val = None
    if main and len(cache["val_y"]):
        val = eval_stream(layout, cache, "val", params.evaluate.batch_size, 0)
    return Feed(torch.cat(xs)[:STATS_IMAGES], torch.cat(ys)[:STATS_IMAGES], stream=stream,
                val_stream=val)


def with_images(layout: Layout, cache: dict[str, Any], splits: tuple[str, ...],
                batch_size: int = 256) -> dict[str, Any]:
    """The cache with `<split>_x` filled in: in shards mode the split decoded through the
    evaluation view (resize + centre crop) into uint8 N×C×S×S, in shard order (the order of
    the cache's labels and paths). Memory: the split's decoded size. Decoded in this
    process: DataLoader workers forked from a Prefect flow's process exited with status 1
    at the end of an epoch."""
    if not is_shards(cache):
        return cache
    for split in splits:
        xs, ys = [], []
        for x, y in eval_stream(layout, cache, split, batch_size, 0).epoch():
            xs.append(x)
            ys.append(y)
        s, c = cache["image_size"], cache["channels"]
        cache[f"{split}_x"] = torch.cat(xs) if xs else torch.zeros(0, c, s, s, dtype=torch.uint8)
        labels = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
        if not torch.equal(labels, cache[f"{split}_y"]):
            raise DataError(f"the {split} shards do not match {layout.cache}: run the pack "
                            "stage again")
    return cache

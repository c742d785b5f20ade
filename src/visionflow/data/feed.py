"""What a consumer reads from the pack stage: the tensor cache, or streams of the shards.

`training_feed` gives the train stage its images: in tensor mode the cache's tensors (as
before); in shards mode a `ShardStream` of the train split (RandomResizedCrop + flip per
sample, in DataLoader workers) plus a small sample of train images for the channel statistics
and a `fast` net's whitening, and the val split as an evaluation stream. `eval_stream` is the
resize + centre-crop stream of one split that evaluation, compression and the gate read.
With `data.shards_url` (recorded by pack in the cache as `shards_url`) every stream reads
the split from S3 through a local cache capped by `data.shard_cache_bytes`
(`data.remote_shards`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from visionflow.core.config import Params
from visionflow.core.layout import Layout
from visionflow.data.remote_shards import RemoteSplit, remote_split
from visionflow.data.split_images import SplitImages
from visionflow.data.stream import ShardStream, View

STATS_IMAGES = 512  # shards: train images (eval view) for channel statistics and whitening


def is_shards(cache: dict[str, Any]) -> bool:
    return cache.get("storage") == "shards"


def eval_view(cache: dict[str, Any]) -> View:
    return View(cache["image_size"], cache["resize_size"], cache["channels"])


def shard_remote(layout: Layout, cache: dict[str, Any], split: str,
                 cache_bytes: int) -> RemoteSplit | None:
    """Where the split streams from when pack put it in S3 (None: the local shards)."""
    url = cache.get("shards_url")
    if not url:
        return None
    return remote_split(layout.split_shards(split), url, split, layout.shard_cache,
                        cache_bytes)


def eval_stream(layout: Layout, cache: dict[str, Any], split: str, batch_size: int,
                workers: int, cache_bytes: int) -> ShardStream:
    """One split in shard order, evaluation view, every sample once."""
    return ShardStream(layout.split_shards(split), split, eval_view(cache),
                       batch_size=batch_size, workers=workers, shuffle=False, drop_last=False,
                       remote=shard_remote(layout, cache, split, cache_bytes))


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
                         seed=params.seed,
                         remote=shard_remote(layout, cache, "train", d.shard_cache_bytes))
    sample = eval_stream(layout, cache, "train", 128, 0, d.shard_cache_bytes)
    xs, ys, have = [], [], 0
    for x, y in sample.epoch():
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= STATS_IMAGES:
            break
    sample.close()  # its read-ahead out of the cache before the epoch fills it
    val = None
    if main and len(cache["val_y"]):
        val = eval_stream(layout, cache, "val", params.evaluate.batch_size, 0,
                          d.shard_cache_bytes)
    return Feed(torch.cat(xs)[:STATS_IMAGES], torch.cat(ys)[:STATS_IMAGES], stream=stream,
                val_stream=val)


def with_images(layout: Layout, cache: dict[str, Any], splits: tuple[str, ...],
                cache_bytes: int, batch_size: int = 256) -> dict[str, Any]:
    """The cache with `<split>_x` filled in: in shards mode a `SplitImages` of the split (the
    evaluation view, resize + centre crop, in shard order: the order of the cache's labels
    and paths), read batch by batch when used, never whole; `batch_size` images at a time.
    Decoded in this process: DataLoader workers forked from a Prefect flow's process exited
    with status 1 at the end of an epoch."""
    if not is_shards(cache):
        return cache
    for split in splits:
        def open_stream(split: str = split) -> ShardStream:
            return eval_stream(layout, cache, split, batch_size, 0, cache_bytes)

        cache[f"{split}_x"] = SplitImages(open_stream, cache[f"{split}_y"], cache["channels"],
                                          cache["image_size"], split)
    return cache
